"""The loader's packed batches: one buffer from worker to GPU, every field back as it was."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from pdllm.training.data import ExampleStream, curriculum, make_batch
from pdllm.training.packed import PackedBatch, PackedStream, host_and_device


def batch_of(seed: int = 0, chunked: float = 1.0):
    return make_batch(random.Random(seed), curriculum("recall_notes")[1], 1024, 8192, (chunked, 0.0))


def assert_same(a, b) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f.name


@pytest.mark.parametrize("chunked", [1.0, 0.0])
def test_a_packed_batch_unpacks_to_every_field_as_views_of_one_buffer(chunked):
    batch = batch_of(chunked=chunked)
    packed = PackedBatch.of(batch)
    back = packed.unpack()
    assert_same(batch, back)
    base = packed.data.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in vars(back).values() if t.numel())
    assert all(s.offset % 8 == 0 for s in packed.spans)
    moved = packed.to("cpu").unpack()  # the device side's path (one copy, then views)
    assert_same(batch, moved)


def test_packed_batches_cross_the_loaders_workers_whole():
    """Through a real DataLoader with two worker processes: the batches the run gets are the stream's own."""
    stream = ExampleStream(5, 8192, 1024, 0.5, 0, 0.0, 1, "recall_notes")
    loader = torch.utils.data.DataLoader(PackedStream(stream), batch_size=None, num_workers=2, prefetch_factor=2)
    got = []
    for packed in loader:
        got.append(packed.unpack())
        if len(got) == 3:
            break
    direct = iter(ExampleStream(5, 8192, 1024, 0.5, 0, 0.0, 1, "recall_notes"))
    first = next(direct)  # worker 0's first batch is the stream's step 0; worker 1's is step 1
    assert_same(first, got[0])
    assert_same(next(direct), got[1])


def test_a_field_wider_than_the_alignment_is_refused():
    batch = dataclasses.replace(batch_of(), full=torch.zeros(3, dtype=torch.complex128))
    with pytest.raises(ValueError, match="alignment"):
        PackedBatch.of(batch)


def test_the_loaders_pin_step_pins_a_packed_batchs_one_buffer():
    """The DataLoader's pin thread calls PackedBatch.pin_memory. Without CUDA pinning fails, which shows the call
    reached the buffer; with it the buffer comes back pinned and every field equal."""
    from torch.utils.data._utils.pin_memory import pin_memory

    batch = batch_of()
    packed = PackedBatch.of(batch)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="accelerator"):
            pin_memory(packed)
        return
    pinned = pin_memory(packed)
    assert pinned.data.is_pinned()
    assert_same(batch, pinned.unpack())


def test_host_and_device_gives_a_plain_or_packed_batchs_two_copies():
    batch = batch_of()
    for item in (batch, PackedBatch.of(batch)):
        host, dev = host_and_device(item, "cpu")
        assert_same(batch, host)
        assert_same(batch, dev)


@pytest.mark.timeout(120)
def test_a_run_with_packed_batches_trains_as_one_without(tmp_path):
    """train.py --packed-batches over a worker: the same batches, so the same losses step for step."""
    from pdllm.training.train import main

    logs = []
    for name, extra in (("plain", []), ("packed", ["--packed-batches"])):
        out = tmp_path / name
        args = ["--smoke", "--mix", "recall_notes", "--stage", "1", "--out", str(out), "--workers", "1"]
        assert main([*args, "--max-steps", "3", *extra]) == 0
        logs.append([e["loss"] for e in json.loads((out / "state.json").read_text())["log"]])
    assert len(logs[0]) == 3 and logs[0] == logs[1]
