"""Continuous batching through the real cluster: 16 concurrent requests on the one decode actor of the default
layout are all answered once, each equal to the in-process answer, and the actor's engine ran them in shared steps.

The bundled model answers from the document (its answers differ per question), so equal answers mean each job
read its own chunks and its own question inside a shared batch."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.config import ClusterConfig
from pdllm.cluster.router.slots import control
from pdllm.cluster.runtime import start_cluster

import pdllm
from pdllm.engine import generate
from pdllm.method import ChunkCache, MethodConfig
from pdllm.models.loader import load_model
from pdllm.sampler import SamplerConfig
from pdllm.tasks.facts import SUBJECTS

BUNDLED = Path(pdllm.__file__).parent / "assets" / "pdllm-tiny-llada"
METHOD = MethodConfig(chunk_size=64, top_k=2)
SAMPLER = SamplerConfig(gen_length=16, block_length=16, steps=16)
SUBJECTS = SUBJECTS[:12]  # facts keyed by subject, which the bundled model reads (keys that differ by a digit: not)
DOCS = [
    " ".join(f"The {s} is {(v * 7919 + i * 104729) % 90000 + 10000}." for i, s in enumerate(SUBJECTS)) for v in range(2)
]
QUESTIONS = [(d, f"What is the {SUBJECTS[i]}?") for d in range(2) for i in (1, 3, 4, 6, 7, 8, 10, 11)]


@pytest.fixture(scope="module")
def bundled():
    return load_model(BUNDLED)


def test_sixteen_concurrent_requests_share_steps_on_one_decode_actor(bundled, tmp_path):
    config = ClusterConfig(model_dir=str(BUNDLED), cpus_per_actor=0.5, chunk_size=64, top_k=2, decode_max_batch=16)
    limits = ClusterLimits(call_timeout_s=120, start_timeout_s=120, redis_data_dir=str(tmp_path / "kv"))
    want = [
        generate(bundled, DOCS[d], q, SAMPLER, "sparse", method=METHOD, cache=ChunkCache()).answer for d, q in QUESTIONS
    ]
    assert len(set(want)) > 4  # the answers depend on the question: a mixed-up batch would show
    with start_cluster(config, limits) as handle:
        for doc in DOCS:  # prefilled first, so the 16 decode jobs arrive together
            handle.router.generate(doc, "What is the pass key?", METHOD, SAMPLER)
        actor = handle.decode_actors[0]
        before = ray.get(control(actor.status).remote(), timeout=30)["engine"]
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda dq: handle.router.generate(DOCS[dq[0]], dq[1], METHOD, SAMPLER), QUESTIONS))
        after = ray.get(control(actor.status).remote(), timeout=30)["engine"]
    assert [g["answer"] for g in got] == want
    assert after["jobs_finished"] - before["jobs_finished"] == len(QUESTIONS)  # each answered once
    job_steps = sum(g["stats"]["steps"] for g in got)
    assert after["steps"] - before["steps"] < job_steps  # they shared steps
    assert max(g["stats"]["mean_batch"] for g in got) > 1
