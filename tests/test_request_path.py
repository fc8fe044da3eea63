"""What one request costs on a real cluster (private Ray, embedded Valkey, the tiny model, the real ApiServer and
client): index round trips, chunk hashes and parameter checks, counted where they happen (the router's and the
server's process here, each actor's in its `status()["counters"]`). The request path reads the index once (the
router), hashes each chunk once, checks its parameters once, with the server's own limits."""

from __future__ import annotations

import pytest
from cluster_yaml import small_cluster_yaml
from pdllm.cluster.api.params import ApiLimits
from pdllm.cluster.api.server import ApiServer, ApiServerConfig
from pdllm.cluster.cluster_backend import ClusterBackend

from pdllm.client import ApiError, Client
from pdllm.observability import counters

CHUNK, TOP_K = 32, 3
SMALL = {"gen_length": 16, "block_length": 16, "steps": 8}  # chunk size and top-K: the YAML's


def document(tag: str, n: int = 6) -> str:
    return " ".join(f"Record {i} of {tag}: the code of box {i} is {1000 + 37 * i}." for i in range(n))


@pytest.fixture(scope="module")
def served(tiny_llada, tmp_path_factory):
    limits = {  # the runtime limits from the YAML, as a deployment sets them
        "call_timeout_s": 60,
        "start_timeout_s": 90,
        "max_queued_per_decode_actor": 5,
        "redis_data_dir": str(tmp_path_factory.mktemp("kv")),
    }
    path = small_cluster_yaml(
        tmp_path_factory.mktemp("cfg"), tiny_llada, chunk_size=CHUNK, chunking="fixed", top_k=TOP_K, limits=limits
    )
    backend = ClusterBackend.from_config(path)
    # limits above the defaults: a request within them must be served, not refused by a second default check
    api_limits = ApiLimits(max_top_k=4096, max_gen_length=2048)
    server = ApiServer(backend, ApiServerConfig(port=0, max_running=2, limits=api_limits)).start()
    client = Client(f"127.0.0.1:{server.port}", timeout_s=120, retries=0)
    yield backend, client
    client.close()
    server.stop(0)
    backend.close()


def cluster_counts(backend: ClusterBackend) -> dict[str, dict[str, int]]:
    out = {"router": counters.snapshot()}
    for actor in backend.router.status()["actors"]:
        out[actor["kind"]] = actor.get("counters", {})
    return out


def cost(backend: ClusterBackend, run) -> dict[str, dict[str, int]]:
    """Counts per process (router/server, prefill actor, decode actor) that `run()` added."""
    before = cluster_counts(backend)
    run()
    after = cluster_counts(backend)
    return {k: counters.difference(after[k], before.get(k, {})) for k in after}


def index_reads(counts: dict[str, int]) -> int:
    return sum(counts.get(f"index.{op}", 0) for op in ("lookup", "claimed", "claim"))


def test_one_request_reads_the_index_once_hashes_once_checks_once(served):
    backend, client = served
    doc = document("fresh")
    got = {}
    first = cost(backend, lambda: got.update(client.generate(doc, "What is the code of box 3?", **SMALL)))
    print("first request (every chunk new):", first)
    n_chunks = got["stats"]["chunks"]
    assert n_chunks > 1 and got["stats"]["prefill_chunks"] == n_chunks
    # the YAML's chunking is the requests' default: fixed chunks of CHUNK tokens, TOP_K of them selected
    assert n_chunks == -(-got["stats"]["context_tokens"] // CHUNK) and got["stats"]["selected_chunks"] == TOP_K
    router, prefill, decode = first["router"], first["prefill"], first["decode"]
    assert router.get("params.complete") == 1  # the server's check, with its limits; no second one
    assert router.get("chunk_id") == n_chunks  # each chunk hashed once, in the router
    assert prefill.get("chunk_id", 0) == 0 and decode.get("chunk_id", 0) == 0
    assert index_reads(router) == 1  # the router's one read of the index
    assert prefill.get("index.lookup", 0) == 0 and prefill.get("index.claim") == 1  # claims in one round trip
    assert prefill.get("index.register") == 1 and prefill.get("index.release") == 1  # all chunks in one each
    assert index_reads(decode) == 0  # the job carries the entries the router read and the prefill actor wrote

    again = cost(backend, lambda: client.generate(doc, "What is the code of box 4?", **SMALL))
    print("second request (every chunk reused):", again)
    assert index_reads(again["router"]) == 1 and again["router"].get("chunk_id") == n_chunks
    assert index_reads(again.get("prefill", {})) == 0 and index_reads(again["decode"]) == 0
    assert again["router"].get("params.complete") == 1


def test_the_yaml_limits_reach_the_router(served):
    backend, _ = served
    assert backend.router.limits.call_timeout_s == 60 and backend.router.limits.start_timeout_s == 90
    assert [s.max_queued for s in backend.router.decode] == [5]


def test_the_servers_limits_above_the_defaults_take_effect(served):
    _, client = served
    top_k = ApiLimits().max_top_k + 1  # over the default limit, within the server's
    out = client.generate(document("limits"), "What is the code of box 1?", **{**SMALL, "top_k": top_k})
    assert out["stats"]["selected_chunks"] == out["stats"]["chunks"]  # every chunk selected: top-K above them all
    with pytest.raises(ApiError) as refused:  # above the server's own limit: refused, naming the field
        client.generate(document("limits"), "What is the code of box 1?", **{**SMALL, "top_k": 4097})
    assert refused.value.code.name == "INVALID_ARGUMENT" and "top_k" in refused.value.details
