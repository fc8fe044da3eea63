"""A decode engine lives as long as its model, not as long as the process: its pool (1 GiB on CPU by default) is
freed when the model's owner is done with it. Before, a process-wide table and the engine's own loop thread kept
every engine alive: a CI run of the test suite reserved ~50 GiB of pools and then could not fork a subprocess.
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

from pdllm.cluster.api.in_process import InProcessBackend
from pdllm.decode_node import engine as engine_mod
from pdllm.decode_node.engine import EngineConfig

from pdllm.cli import main
from pdllm.engine import engine_for, release_engine
from pdllm.models.loader import LoadedModel
from pdllm.models.tiny import random_model, tiny_spec

SMALL_POOL = EngineConfig(pool_bytes=1 << 20)
SMALL = ["--gen-length", "8", "--block-length", "8", "--steps", "8"]


def tiny_lm(seed: int = 0) -> LoadedModel:
    spec = tiny_spec("llada", layers=2)
    return LoadedModel(random_model(spec, seed), None, spec, Path("."), f"tiny-lifetime-{seed}")


def live_engine_ids() -> set[int]:
    return {id(e) for e in list(engine_mod._LIVE)}


def test_an_engine_whose_model_is_dropped_is_freed_and_its_loop_ends():
    lm = tiny_lm()
    engine = engine_for(lm, SMALL_POOL)
    assert engine_for(lm) is engine  # one engine per model, made once
    engine.start()
    thread, dead = engine._thread, weakref.ref(engine)
    assert thread.is_alive()
    del engine, lm
    for _ in range(100):  # the model and its engine hold each other: a cycle, freed by the collector unless the
        gc.collect()  # loop is between its check for work and its wait (it holds the engine for that moment)
        if dead() is None:
            break
        thread.join(timeout=0.01)
    assert dead() is None
    thread.join(timeout=30)  # the loop sees its engine gone when its wait ends
    assert not thread.is_alive()


def test_release_engine_stops_the_engine_now_and_a_later_call_makes_a_new_one():
    lm = tiny_lm(1)
    first = engine_for(lm, SMALL_POOL)
    first.start()
    release_engine(lm)
    assert first._stop.is_set() and not first._thread.is_alive()
    assert id(first) not in live_engine_ids()
    second = engine_for(lm, SMALL_POOL)
    assert second is not first and id(second) in live_engine_ids()
    release_engine(lm)
    release_engine(lm)  # releasing twice is harmless


def test_a_backend_frees_the_engine_of_the_model_it_loaded_and_leaves_a_shared_ones(tiny_llada):
    owner = InProcessBackend.from_directory(str(tiny_llada), name="tiny", engine=SMALL_POOL)
    guest = InProcessBackend(owner.lm, name="guest")  # a second backend on the same model shares its engine
    assert guest.engine is owner.engine and owner.owns_model and not guest.owns_model
    guest.close()
    assert not owner.engine._stop.is_set()  # the guest did not own the model: the engine serves on
    answer = owner.generate("The key is 7.", "Key?", {"gen_length": 8, "block_length": 8, "steps": 8}, "r1")
    assert isinstance(answer["answer"], str)
    owner.close()
    assert owner.engine._stop.is_set() and id(owner.engine) not in live_engine_ids()


def test_an_in_process_generate_leaves_no_engine_behind(tiny_llada, capsys):
    before = live_engine_ids()
    argv = ["generate", "--in-process", "--model", str(tiny_llada), "--context", "The key is 7. " * 4]
    assert main([*argv, "--question", "Key?", "--json", "--pool-bytes", str(1 << 20), *SMALL]) == 0
    assert "answer" in json.loads(capsys.readouterr().out)
    assert live_engine_ids() <= before
