"""A decode actor whose KV pool holds one job's chunks and little more still answers every concurrent request, each
as the in-process engine does: jobs that find no room wait in the pool's line holding nothing, and the chunks of
finished jobs are evicted for the next."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
import torch
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.config import ClusterConfig
from pdllm.cluster.router.slots import control
from pdllm.cluster.runtime import start_cluster
from pdllm.decode_node.kv_pool import DEFAULT_PAGE_ROWS, RESERVED_PAGES, page_bytes

import pdllm
from pdllm.engine import generate
from pdllm.method import ChunkCache, MethodConfig
from pdllm.models.loader import load_model
from pdllm.sampler import SamplerConfig
from pdllm.tasks.facts import SUBJECTS

BUNDLED = Path(pdllm.__file__).parent / "assets" / "pdllm-tiny-llada"
METHOD = MethodConfig(chunk_size=64, top_k=2)
SAMPLER = SamplerConfig(gen_length=16, block_length=16, steps=16)
SUBJECTS = SUBJECTS[:12]
DOCS = [
    " ".join(f"The {s} is {(v * 7919 + i * 104729) % 90000 + 10000}." for i, s in enumerate(SUBJECTS)) for v in range(4)
]
QUESTIONS = [(d, f"What is the {SUBJECTS[i]}?") for d in range(4) for i in (2, 9)]


@pytest.mark.timeout(600)
def test_concurrent_requests_through_a_pool_that_holds_one_job_are_all_answered(tmp_path):
    lm = load_model(BUNDLED)
    chunk_pages = -(-(METHOD.chunk_size + 1) // DEFAULT_PAGE_ROWS)  # a chunk's rows: its tokens and the BOS
    pages = RESERVED_PAGES + METHOD.top_k * chunk_pages + 2  # one job's chunks and two pages to spare
    pool_bytes = pages * page_bytes(lm.spec, torch.float32, DEFAULT_PAGE_ROWS)
    want = [generate(lm, DOCS[d], q, SAMPLER, "sparse", method=METHOD, cache=ChunkCache()).answer for d, q in QUESTIONS]
    config = ClusterConfig(
        model_dir=str(BUNDLED), cpus_per_actor=0.5, chunk_size=64, top_k=2, decode_max_batch=8,
        decode_pool_bytes=pool_bytes,
    )  # fmt: skip
    limits = ClusterLimits(call_timeout_s=120, start_timeout_s=120, redis_data_dir=str(tmp_path / "kv"))
    with start_cluster(config, limits) as handle:
        for doc in DOCS:  # prefilled first, so the decode jobs arrive together
            handle.router.generate(doc, "What is the pass key?", METHOD, SAMPLER)
        with ThreadPoolExecutor(len(QUESTIONS)) as threads:
            got = list(threads.map(lambda dq: handle.router.generate(DOCS[dq[0]], dq[1], METHOD, SAMPLER), QUESTIONS))
        pool = ray.get(control(handle.decode_actors[0].status).remote(), timeout=30)["engine"]["pool"]
    assert [g["answer"] for g in got] == want
    assert pool["pages"] == pages and pool["evictions"] > 0  # too small to keep every document's chunks
    assert pool["jobs_waited_for_room"] > 0 and pool["jobs_waiting_for_room"] == 0  # the line was used, and is empty
    assert pool["pinned_chunks"] == 0
