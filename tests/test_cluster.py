"""The cluster on one machine, started the way users start it (`start_cluster`: private Ray on loopback, embedded
Valkey): answers equal the in-process sparse answer, a second question prefills nothing, duplicate prefill happens
once, back-pressure is a clear error, status reports actors, stores, index and queues."""

from __future__ import annotations

import threading

import pytest
import ray
from pdllm.cluster.common.errors import ClusterBusy
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.config import ClusterConfig
from pdllm.cluster.kv.jobs import PrefillJob
from pdllm.cluster.runtime import start_cluster

from pdllm.engine import generate
from pdllm.method import ChunkCache, MethodConfig, chunk_context, chunk_id
from pdllm.prompt import encode_request
from pdllm.sampler import SamplerConfig

METHOD = MethodConfig(chunk_size=32, top_k=3, keep_ratio=0.5)
SAMPLER = SamplerConfig(gen_length=16, block_length=16, steps=8)
DOC = " ".join(f"Record {i}: the code of box {i} is {1000 + 37 * i}." for i in range(8))


@pytest.fixture(scope="module")
def cluster(tiny_llada, tmp_path_factory):
    config = ClusterConfig(
        model_dir=str(tiny_llada),
        num_prefill_actors=2,
        num_decode_actors=2,
        cpus_per_actor=0.25,
        chunk_size=METHOD.chunk_size,
        top_k=METHOD.top_k,
        keep_ratio=METHOD.keep_ratio,
        store_capacity_bytes=64 << 20,
    )
    limits = ClusterLimits(call_timeout_s=60, start_timeout_s=90, redis_data_dir=str(tmp_path_factory.mktemp("kv")))
    handle = start_cluster(config, limits)
    yield handle
    redis = handle.embedded_redis
    handle.shutdown()
    assert not ray.is_initialized() and not redis.running  # everything we started is stopped


def test_answer_equals_the_in_process_sparse_answer(cluster, lm):
    question = "What is the code of box 5?"
    got = cluster.router.generate(DOC, question, METHOD, SAMPLER, request_id="r1")
    want = generate(lm, DOC, question, SAMPLER, mode="sparse", method=METHOD, cache=ChunkCache())
    assert got["answer"] == want.answer
    stats = got["stats"]
    assert stats["selected_chunk_indices"] == want.stats["selected_chunk_indices"]
    assert stats["selected_tokens"] == want.stats["selected_tokens"]
    assert stats["steps"] == want.stats["steps"]
    assert (
        stats["chunks"]
        == want.stats["chunks"]
        == len(chunk_context(lm.tokenizer, encode_request(lm.tokenizer, DOC, "q").context_ids, METHOD))
    )
    assert stats["prefill_chunks"] == stats["chunks"] and stats["reused_chunks"] == 0
    assert stats["selected_chunks"] == METHOD.top_k and stats["request_id"] == "r1"
    assert stats["decode_actor"].startswith("pdllm-decode-")
    # private Ray: prefill and decode share the node, so KV moved through Ray, not the network
    assert stats["fetched_same_node"] + stats["fetched_local_cache"] == METHOD.top_k


def test_second_question_on_the_same_document_prefills_nothing(cluster, lm):
    cluster.router.generate(DOC, "What is the code of box 1?", METHOD, SAMPLER)
    question = "What is the code of box 7?"
    got = cluster.router.generate(DOC, question, METHOD, SAMPLER)
    assert got["stats"]["prefill_chunks"] == 0 and got["stats"]["reused_chunks"] == got["stats"]["chunks"]
    want = generate(lm, DOC, question, SAMPLER, mode="sparse", method=METHOD, cache=ChunkCache())
    assert got["answer"] == want.answer


def test_concurrent_requests_for_one_new_document_prefill_each_chunk_once(cluster, lm):
    doc = " ".join(f"Line {i} says the password is {i * 7919 % 10007}." for i in range(9))
    results, errors = [], []

    def ask(q: str) -> None:
        try:
            results.append(cluster.router.generate(doc, q, METHOD, SAMPLER))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(f"What does line {i} say?",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 3
    chunks = chunk_context(lm.tokenizer, encode_request(lm.tokenizer, doc, "q").context_ids, METHOD)
    unique = {chunk_id(lm.model_id, c, METHOD.chunk_size, METHOD.use_bos) for c in chunks}
    assert sum(r["stats"]["prefill_chunks"] for r in results) == len(unique)


def test_two_prefill_actors_racing_on_the_same_chunks_encode_each_once(cluster, lm):
    tokens = encode_request(lm.tokenizer, "A brand new text about racing actors. " * 6, "q").context_ids
    chunks = chunk_context(lm.tokenizer, tokens, METHOD)
    job = PrefillJob.of(lm.model_id, chunks, METHOD)
    outs = ray.get([slot.handle.prefill.remote(job) for slot in cluster.router.prefill], timeout=60)
    encoded = [set(o.encoded) for o in outs]
    assert not (encoded[0] & encoded[1])  # nobody encoded a chunk the other one encoded
    unique = {chunk_id(lm.model_id, c, METHOD.chunk_size, True) for c in chunks}
    assert encoded[0] | encoded[1] == unique
    waiting = set(outs[0].waiting) | set(outs[1].waiting)
    assert waiting <= unique
    assert set(cluster.router.index.lookup(sorted(unique))) == unique


def test_full_queues_are_refused_with_a_clear_error(cluster):
    slots = cluster.router.decode
    saved = [s.inflight for s in slots]
    for s in slots:
        s.inflight = s.max_queued
    try:
        with pytest.raises(ClusterBusy, match="decode actors have full queues"):
            cluster.router.generate(DOC, "What is the code of box 2?", METHOD, SAMPLER)
    finally:
        for s, n in zip(slots, saved, strict=True):
            s.inflight = n
    assert cluster.router.status()["rejected"] >= 1


def test_status_reports_actors_stores_index_and_queues(cluster):
    status = cluster.router.status()
    kinds = sorted(a["kind"] for a in status["actors"])
    assert kinds == ["decode", "decode", "prefill", "prefill"]
    assert all("error" not in a for a in status["actors"])
    assert status["index_size"] == status["store"]["chunks"] > 0
    assert 0 < status["store"]["used_bytes"] <= status["store"]["capacity_bytes"] == 2 * (64 << 20)
    assert status["queues"]["prefill"] == status["queues"]["decode"] == 0
    assert status["completed"] >= 3


def test_instruction_draft_scoring_and_joint_run_on_the_decode_actor(cluster, lm):
    """The instruction travels with the job; draft ranking reads every chunk's fetched KV and joint re-encodes the
    fetched chunks' tokens on the decode actor: the same answer and selection as in process."""
    question, instruction = "What is the code of box 6?", "Answer with the code only.\n"
    draft = MethodConfig(chunk_size=32, top_k=2, scoring="draft")
    for method in (draft, MethodConfig(chunk_size=32, top_k=2, scoring="draft", selected_kv="joint")):
        got = cluster.router.generate(DOC, question, method, SAMPLER, instruction=instruction)
        want = generate(
            lm, DOC, question, SAMPLER, "sparse", method=method, cache=ChunkCache(), instruction=instruction
        )
        assert got["answer"] == want.answer
        assert got["stats"]["selected_chunk_indices"] == want.stats["selected_chunk_indices"]
        assert got["stats"]["steps"] == want.stats["steps"]
    assert got["stats"]["selected_kv"] == "joint" and got["stats"]["joint_prompt_tokens"] > len(instruction)
    reuse = cluster.router.generate(
        DOC, question, MethodConfig(chunk_size=32, top_k=2), SAMPLER, instruction=instruction
    )
    assert reuse["stats"]["instruction_tokens"] == len(instruction)
