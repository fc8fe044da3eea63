"""How much GPU memory a derived cache takes, for an actor that owns its GPU and for actors sharing one."""

import pytest
from pdllm.decode_node.engine import EngineConfig

from pdllm.devices import FREE_FRACTION, share_of_gpu

GIB = 1 << 30


def test_a_whole_gpu_takes_most_of_what_is_free():
    assert share_of_gpu(free=100 * GIB, total=140 * GIB, held=16 * GIB, fraction=1.0) == int(FREE_FRACTION * 100 * GIB)
    assert share_of_gpu(100 * GIB, 140 * GIB, 16 * GIB, 1.0, reserve=8 * GIB) == int(FREE_FRACTION * 92 * GIB)


def test_actors_sharing_a_gpu_stay_within_their_shares():
    total, weights, reserve = 140 * GIB, 16 * GIB, 8 * GIB
    # both actors have loaded their weights and see the same free memory at start-up
    free = total - 2 * weights
    store = share_of_gpu(free, total, weights, 0.5)
    pool = share_of_gpu(free, total, weights, 0.5, reserve)
    assert store == int(0.5 * total) - weights
    assert pool == int(0.5 * total) - weights - reserve
    assert 2 * weights + store + pool <= total  # left to themselves, each would have taken 90% of `free`
    assert share_of_gpu(free, total, weights, 0.5) < int(FREE_FRACTION * free)


def test_a_share_smaller_than_the_weights_leaves_no_cache():
    assert share_of_gpu(free=50 * GIB, total=140 * GIB, held=16 * GIB, fraction=0.1) == 0


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="fraction"):
        share_of_gpu(1, 1, 0, 0.0)
    with pytest.raises(ValueError, match="gpu_fraction"):
        EngineConfig(gpu_fraction=1.5).validate()
