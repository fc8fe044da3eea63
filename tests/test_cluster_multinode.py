"""Three Ray nodes on one machine (ray.cluster_utils.Cluster): a head for the router, a prefill node and a decode
node told apart by custom resources. KV crosses nodes over gRPC on loopback; a small store evicts, the index
follows, and answers stay equal to the in-process sparse answer."""

from __future__ import annotations

import pytest
import ray
from pdllm.cluster.bootstrap import DECODE_RESOURCE, PREFILL_RESOURCE, loopback_only
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.config import ClusterConfig
from pdllm.cluster.runtime import start_cluster
from ray.cluster_utils import Cluster

from pdllm.engine import generate
from pdllm.errors import InvalidRequest
from pdllm.method import ChunkCache, MethodConfig, chunk_id, encode_chunks, split_chunks
from pdllm.prompt import encode_request
from pdllm.sampler import SamplerConfig

METHOD = MethodConfig(chunk_size=32, chunking="fixed", top_k=2, keep_ratio=1.0)  # whole chunks: the store's unit
SAMPLER = SamplerConfig(gen_length=16, block_length=16, steps=8)
DOC_A = " ".join(f"Alpha {i}: the vault number is {4000 + 13 * i}." for i in range(3))
DOC_B = " ".join(f"Beta {i}: the river is {['Nile', 'Rhine', 'Po'][i % 3]} number {i}." for i in range(3))
STORE_CHUNKS = 5  # capacity of the one prefill store, in chunks: less than DOC_A + DOC_B


@pytest.fixture(scope="module")
def nodes():
    loopback_only()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    )
    prefill_node = cluster.add_node(num_cpus=1, resources={PREFILL_RESOURCE: 1}, node_ip_address="127.0.0.1")
    decode_node = cluster.add_node(num_cpus=1, resources={DECODE_RESOURCE: 1}, node_ip_address="127.0.0.1")
    yield cluster, prefill_node.node_id, decode_node.node_id
    cluster.shutdown()


@pytest.fixture(scope="module")
def cluster(nodes, tiny_llada, lm):
    ray_cluster, _, _ = nodes
    chunk = encode_chunks(lm, [list(range(100, 132))], METHOD, lm.model_id)[0]
    config = ClusterConfig(
        model_dir=str(tiny_llada),
        ray_address=ray_cluster.address,
        num_prefill_actors=1,
        num_decode_actors=1,
        cpus_per_actor=0.5,
        chunk_size=METHOD.chunk_size,
        chunking=METHOD.chunking,
        top_k=METHOD.top_k,
        keep_ratio=METHOD.keep_ratio,
        store_capacity_bytes=STORE_CHUNKS * chunk.nbytes(),
    )
    handle = start_cluster(config, ClusterLimits(call_timeout_s=60, start_timeout_s=90, decode_reuse_fetched=False))
    yield handle
    handle.shutdown()
    ray.shutdown()


def reference(lm, doc: str, question: str) -> str:
    return generate(lm, doc, question, SAMPLER, mode="sparse", method=METHOD, cache=ChunkCache()).answer


def test_actors_land_on_their_role_nodes(cluster, nodes):
    _, prefill_node, decode_node = nodes
    assert [s.node for s in cluster.router.prefill] == [prefill_node]
    assert [s.node for s in cluster.router.decode] == [decode_node]


def test_kv_crosses_nodes_over_grpc_and_the_answer_matches(cluster, lm):
    question = "What is the vault number of Alpha 2?"
    got = cluster.router.generate(DOC_A, question, METHOD, SAMPLER)
    assert got["answer"] == reference(lm, DOC_A, question)
    stats = got["stats"]
    assert stats["fetched_remote"] == METHOD.top_k and stats["fetched_same_node"] == 0
    assert stats["fetched_bytes"] > 0
    served = [a for a in cluster.router.status()["actors"] if a["kind"] == "prefill"][0]["served_bytes"]
    assert served >= stats["fetched_bytes"]


def test_eviction_under_a_small_store_keeps_the_index_consistent_and_answers_right(cluster, lm):
    router = cluster.router
    n_a = len(split_chunks(encode_request(lm.tokenizer, DOC_A, "q").context_ids, METHOD.chunk_size))
    n_b = len(split_chunks(encode_request(lm.tokenizer, DOC_B, "q").context_ids, METHOD.chunk_size))
    assert n_a <= STORE_CHUNKS < n_a + n_b
    q_a, q_b = "What is the vault number of Alpha 1?", "Which river is Beta 1?"
    router.generate(DOC_A, q_a, METHOD, SAMPLER)
    got_b = router.generate(DOC_B, q_b, METHOD, SAMPLER)  # evicts some of DOC_A's chunks
    assert got_b["answer"] == reference(lm, DOC_B, q_b)
    status = router.status()
    assert status["store"]["evictions"] > 0
    assert status["index_size"] == status["store"]["chunks"] <= STORE_CHUNKS  # evicted chunks left the index
    again = router.generate(DOC_A, q_a, METHOD, SAMPLER)
    assert again["stats"]["prefill_chunks"] > 0  # the evicted chunks were prefilled again
    assert again["answer"] == reference(lm, DOC_A, q_a)


def encoded_total(router) -> int:
    return sum(a["encoded_total"] for a in router.status()["actors"] if a["kind"] == "prefill")


def refused_for_size(router, lm, doc: str, question: str, why: str) -> int:
    """`doc` is refused by a message naming its chunks, the store and `why`; no decode runs on entries of evicted
    KV, the index still matches the store, and the next request is answered. Returns the chunks it encoded."""
    n = len(split_chunks(encode_request(lm.tokenizer, doc, "q").context_ids, METHOD.chunk_size))
    refetches, encoded = router.status()["faults"]["refetch_retries"], encoded_total(router)
    with pytest.raises(InvalidRequest, match=f"context's {n} chunks do not fit .*{why}.* store_capacity_bytes"):
        router.generate(doc, question, METHOD, SAMPLER)
    status = router.status()
    assert status["faults"]["refetch_retries"] == refetches  # no decode ran on entries of evicted KV
    assert status["index_size"] == status["store"]["chunks"] <= STORE_CHUNKS
    encoded = encoded_total(router) - encoded
    question = "What is the vault number of Alpha 0?"
    assert router.generate(DOC_A, question, METHOD, SAMPLER)["answer"] == reference(lm, DOC_A, question)
    return encoded


def test_a_context_larger_than_the_store_is_refused_by_name_before_it_is_encoded(cluster, lm):
    """Its KV rows alone exceed the store: one clear error before any encode, not rounds of re-prefilling."""
    router = cluster.router
    doc = " ".join(f"Delta {i}: the bell tone is {['low', 'high'][i % 2]} number {i}." for i in range(8))
    n = len(split_chunks(encode_request(lm.tokenizer, doc, "q").context_ids, METHOD.chunk_size))
    assert n > STORE_CHUNKS + 1
    assert refused_for_size(router, lm, doc, "Which tone is the bell of Delta 3?", "needs at least") == 0


def test_a_context_that_fits_only_without_its_anchors_is_refused_once_stored(cluster, lm):
    """Its tokens alone fit the store, but with a BOS row and a summary per chunk they do not: the chunks evict each
    other while stored, and the actor says so rather than hand the router entries of KV that is gone."""
    rows = STORE_CHUNKS * (METHOD.chunk_size + 1)  # the store, in K/V rows (less its summaries)
    doc, n_tokens = "Epsilon:", 0
    while n_tokens <= rows - 4:  # a context a few tokens under the store's rows, in one more chunk than it holds
        doc += f" {'abcdefghijklmnopqrstuvwxyz'[len(doc) % 26]}"  # no two chunks alike
        n_tokens = len(encode_request(lm.tokenizer, doc, "q").context_ids)
    assert rows - 4 < n_tokens <= rows
    assert len(split_chunks(encode_request(lm.tokenizer, doc, "q").context_ids, METHOD.chunk_size)) == STORE_CHUNKS + 1
    assert refused_for_size(cluster.router, lm, doc, "What is Epsilon?", "evicted") == STORE_CHUNKS + 1


def test_stale_index_entries_of_a_dead_holder_are_re_prefilled(cluster, lm):
    """Redis persists across restarts, so the index can point at a holder that is gone. The decode actor finds the
    holder unreachable, removes those entries, and the router re-prefills the chunks and retries."""
    router = cluster.router
    doc = " ".join(f"Gamma {i}: the lamp colour is {['red', 'blue', 'green'][i % 3]}." for i in range(5))
    chunks = split_chunks(encode_request(lm.tokenizer, doc, "q").context_ids, METHOD.chunk_size)
    for chunk in encode_chunks(lm, chunks, METHOD, lm.model_id):
        router.index.register(chunk, "pdllm-prefill-gone", "dead-node", "127.0.0.1:1")
    question = "What colour is the lamp of Gamma 2?"
    got = router.generate(doc, question, METHOD, SAMPLER)
    assert got["answer"] == reference(lm, doc, question)
    assert got["stats"]["retries"] == 1 and got["stats"]["prefill_chunks"] >= METHOD.top_k
    ids = [chunk_id(lm.model_id, chunks[i], METHOD.chunk_size, True) for i in got["stats"]["selected_chunk_indices"]]
    entries = router.index.lookup(ids)  # the selected chunks now point at the live holder (others stay stale)
    assert [entries[c].holder for c in ids] == [router.prefill[0].name] * METHOD.top_k
