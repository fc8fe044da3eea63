"""Chunk KV over the collective group, on CPU with gloo (the NCCL path runs the same code with backend "nccl").

Real parts throughout: a real PrefillWorker (tiny model, real chunked prefill, gRPC transfer service, embedded
Valkey index) as the holder; receivers are Ray actors hosting the real CollectiveTransport with a GrpcTransport
fallback; the end-to-end test runs start_cluster with kv_transport="gloo". Peers are stalled with SIGSTOP and
killed for real. About 50 s on 2 cores (Ray start ~8 s, the end-to-end cluster ~15 s, three 2-3 s stalls).
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
import uuid

import pytest
import ray
import torch
from pdllm.cluster.bootstrap import DECODE_RESOURCE, NAMESPACE, PREFILL_RESOURCE, loopback_only
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.config import ClusterConfig, ConfigError
from pdllm.cluster.kv.collective_group import (
    DECODE,
    NVLS_OFF_ENV,
    PREFILL,
    CollectiveError,
    CollectiveGroup,
    CollectiveMember,
    GroupSpec,
    Member,
    choose_path,
    form_group,
    holder_pairs,
    pair_ops,
    plan_group,
    with_actor_env,
)
from pdllm.cluster.kv.collective_transport import CollectiveTransport, checksum
from pdllm.cluster.kv.jobs import PrefillJob
from pdllm.cluster.kv.redis_server import EmbeddedRedis
from pdllm.cluster.kv.transport import FetchItem, GrpcTransport
from pdllm.cluster.router.slots import control
from pdllm.cluster.runtime import start_cluster
from pdllm.prefill_node.actor import PrefillWorker

from pdllm.engine import generate
from pdllm.method import ChunkCache, MethodConfig
from pdllm.models.loader import load_model
from pdllm.sampler import SamplerConfig

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Receiver is defined here, not in the package

TOKEN = "collective-test-token"
DEADLINE_S = 2.0  # collective rendezvous and transfer deadline in these tests
METHOD = MethodConfig(chunk_size=32, top_k=2, keep_ratio=1.0)
SAMPLER = SamplerConfig(gen_length=16, block_length=16, steps=8)
DOC = " ".join(f"Vault {i}: the code word is {['amber', 'birch', 'cedar', 'dune'][i % 4]}{i}." for i in range(6))


# ---- pure parts ------------------------------------------------------------------------------------------------
def test_plan_puts_one_rank_per_gpu_and_needs_both_roles():
    p0 = Member("p0", PREFILL, "cuda", "GPU-a", "h:1")
    d0 = Member("d0", DECODE, "cuda", "GPU-b")
    shared = Member("d1", DECODE, "cuda", "GPU-a")  # shares p0's GPU: NCCL allows one rank per GPU
    cpu = Member("d2", DECODE, "cpu")
    assert plan_group("auto", [p0, d0, cpu]) == ("nccl", [p0, d0])
    assert plan_group("auto", [p0, shared]) is None  # both on one GPU: same-node reads, no NCCL
    assert plan_group("auto", [Member("p", PREFILL, "cpu"), cpu]) is None  # CPU cluster on auto: gRPC as before
    assert plan_group("grpc", [p0, d0]) is None
    assert plan_group("gloo", [Member("p", PREFILL, "cpu"), cpu]) == ("gloo", [Member("p", PREFILL, "cpu"), cpu])
    with pytest.raises(ValueError, match="kv_transport must be one of"):
        plan_group("nvlink", [p0, d0])


def test_path_is_collective_only_inside_the_group_and_for_nccl_only_between_gpus():
    p0, d0 = Member("p0", PREFILL, "cuda", "GPU-a", "h:1"), Member("d0", DECODE, "cuda", "GPU-b")
    outsider = Member("p9", PREFILL, "cuda", "GPU-c", "h:9")
    nccl = GroupSpec("nccl", (p0, d0), "h", 1, 5.0)
    assert choose_path(nccl, d0, p0) == "nccl"
    assert choose_path(nccl, d0, outsider) == "grpc"
    assert choose_path(None, d0, p0) == "grpc"
    on_cpu = Member("d0", DECODE, "cpu")
    assert choose_path(GroupSpec("nccl", (p0, on_cpu), "h", 1, 5.0), on_cpu, p0) == "grpc"
    assert choose_path(GroupSpec("gloo", (p0, on_cpu), "h", 1, 5.0), on_cpu, p0) == "gloo"
    assert nccl.holder_at("h:1") == p0 and nccl.holder_at("h:9") is None and nccl.holder_at("") is None


def test_groups_of_more_than_two_ranks_use_pair_communicators_connected_in_an_order_that_cannot_deadlock():
    p0, p1 = Member("p0", PREFILL, "cuda", "GPU-a", "h:1"), Member("p1", PREFILL, "cuda", "GPU-b", "h:2")
    d = [Member(f"d{i}", DECODE, "cuda", f"GPU-{i}") for i in range(3)]
    assert not pair_ops(GroupSpec("nccl", (p0, d[0]), "h", 1, 5.0)) and not pair_ops(None)
    one_three = GroupSpec("nccl", (p0, *d), "h", 1, 5.0)
    assert pair_ops(one_three) and holder_pairs(one_three) == [(0, 1), (0, 2), (0, 3)]  # no decode-decode pair
    two_two = GroupSpec("nccl", (d[0], p0, d[1], p1), "h", 1, 5.0)
    assert holder_pairs(two_two) == [(0, 1), (0, 3), (1, 2), (2, 3)]
    # every rank walks its own pairs in that order, one exchange at a time, blocking until its partner is there
    rng = random.Random(0)
    for _ in range(200):
        members = tuple(Member(f"m{i}", rng.choice((PREFILL, DECODE)), "cpu") for i in range(rng.randint(2, 8)))
        pairs = holder_pairs(GroupSpec("gloo", members, "h", 1, 5.0))
        todo = {r: [p for p in pairs if r in p] for r in range(len(members))}
        while any(todo.values()):
            ready = [p for p in pairs if all(todo[r] and todo[r][0] == p for r in p)]
            assert ready, f"deadlock: {todo}"
            for low, high in ready:
                todo[low].pop(0), todo[high].pop(0)


def test_checksum_sees_a_flipped_bit_and_moved_blocks():
    g = torch.Generator().manual_seed(0)
    for t in (torch.randn(4, 2, 513, 64, generator=g).to(torch.bfloat16), torch.randn(3, 7, generator=g)):
        base = checksum(t)
        assert checksum(t.clone()) == base
        flipped = t.clone().reshape(-1).view(torch.uint8)
        flipped[5] ^= 1
        assert checksum(flipped.view(t.dtype).view(t.shape)) != base
    kv = torch.randn(8, 4096, generator=g)  # 16 KiB rows: swapping two is a moved block
    assert checksum(kv[[2, 1, 0, 3, 4, 5, 6, 7]]) != checksum(kv)
    assert checksum(kv.roll(1)) != checksum(kv)  # everything shifted by one element
    assert checksum(kv[:, :-1]) != checksum(kv[:, 1:])
    odd = torch.arange(7, dtype=torch.uint8)  # sizes that are not a multiple of 4 bytes
    assert checksum(odd) != checksum(odd + 1)


def test_kv_transport_option_is_validated_and_actor_env_keeps_nvls_off():
    assert ClusterConfig().kv_transport == "auto"
    with pytest.raises(ConfigError, match="kv_transport must be one of auto, grpc, gloo"):
        ClusterConfig(model_dir="/m", kv_transport="nccl2").validate()
    env = with_actor_env({"env_vars": {"NCCL_NVLS_ENABLE": "1", "OTHER": "x"}, "pip": ["a"]})
    assert env["pip"] == ["a"] and env["env_vars"]["OTHER"] == "x"
    assert {k: env["env_vars"][k] for k in NVLS_OFF_ENV} == NVLS_OFF_ENV  # ours win over a caller's "1"
    assert NVLS_OFF_ENV == {
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    }


# ---- real actors ------------------------------------------------------------------------------------------------
class Receiver(CollectiveMember):
    """The decode side without a model: a CollectiveTransport (gRPC fallback) in its own Ray actor process."""

    def __init__(self, name: str) -> None:
        self.name, self.device = name, "cpu"
        self.collective = CollectiveGroup()
        self.transport = CollectiveTransport(self.collective, GrpcTransport(token=TOKEN), "cpu")

    def fetch(self, items: list[FetchItem], timeout_s: float):
        t0 = time.monotonic()
        result = self.transport.fetch(items, timeout_s)
        return result, time.monotonic() - t0

    def announce(self, holder: str, items: list[FetchItem]):
        return self.transport.announce(self.collective.spec.member(holder), items, time.monotonic() + 10)

    def receive(self, holder: str, tid: str, reply: dict, timeout_s: float):
        t0 = time.monotonic()
        try:
            self.transport.receive(self.collective.spec.member(holder), tid, reply, time.monotonic() + timeout_s)
            return "", time.monotonic() - t0
        except CollectiveError as e:
            return str(e), time.monotonic() - t0

    def status(self) -> dict:
        return self.transport.status()


@pytest.fixture(scope="module")
def ray_local():
    loopback_only()
    ray.init(
        num_cpus=2,
        resources={PREFILL_RESOURCE: 4, DECODE_RESOURCE: 4},
        namespace=NAMESPACE,
        include_dashboard=False,
        logging_level="warning",
        _node_ip_address="127.0.0.1",
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = EmbeddedRedis(str(tmp_path_factory.mktemp("valkey"))).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def actors(ray_local, redis_url, tiny_llada):
    """A real prefill actor holding real chunks, and two receivers."""
    run = uuid.uuid4().hex[:6]
    limits = ClusterLimits(call_timeout_s=30, collective_timeout_s=DEADLINE_S, index_prefix=f"t-coll-{run}")
    name = f"t-holder-{run}"
    holder = (
        ray.remote(PrefillWorker)
        .options(name=name, num_cpus=0.25, max_concurrency=4, runtime_env=with_actor_env())
        .remote(name, str(tiny_llada), 0, 1, 64 << 20, redis_url, limits, TOKEN)
    )
    receivers = {}
    for tag in ("a", "b"):
        rname = f"t-recv-{tag}-{run}"
        receivers[tag] = (
            ray.remote(Receiver)
            .options(name=rname, num_cpus=0.25, max_concurrency=4, runtime_env=with_actor_env())
            .remote(rname)
        )
    info = ray.get(holder.info.remote(), timeout=90)
    chunks = [[(7 * c + i) % 250 for i in range(32)] for c in range(3)]
    encoded = ray.get(holder.prefill.remote(PrefillJob.of(info["model_id"], chunks, METHOD)), timeout=60).encoded
    source = ray.get(holder.read_chunks.remote(encoded), timeout=30)
    yield {"holder": holder, "info": info, "ids": encoded, "source": source, **receivers, "names": {
        "holder": name, "a": f"t-recv-a-{run}", "b": f"t-recv-b-{run}"}}  # fmt: skip
    for actor in (holder, *receivers.values()):
        ray.kill(actor, no_restart=True)


def wait_dead(actor, asks: int = 500) -> None:
    """Ask `actor` until Ray reports it dead. ray.kill returns before the kill lands, so a call sent right after it
    may still be answered (CI saw one answered on a loaded machine)."""
    for _ in range(asks):
        try:
            ray.get(actor.status.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return
    pytest.fail(f"the actor still answered {asks} calls after ray.kill")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def assert_bit_exact(got, src, rows=None) -> None:
    k, v = src.k, src.v
    if rows:
        index = torch.tensor(rows)
        k, v = k.index_select(2, index), v.index_select(2, index)
    assert got.chunk_id == src.chunk_id and got.tokens == src.tokens and got.has_bos == src.has_bos
    assert same_bits(got.k, k) and same_bits(got.v, v) and same_bits(got.summary, src.summary)


@pytest.mark.timeout(60)
def test_rendezvous_with_an_absent_member_fails_in_time_naming_it(actors):
    names, holder, a = actors["names"], actors["holder"], actors["a"]
    host, port = ray.get(holder.collective_host.remote(DEADLINE_S), timeout=10)
    members = (
        Member(names["holder"], PREFILL, "cpu", address=actors["info"]["address"]),
        Member(names["a"], DECODE, "cpu"),
        Member("ghost-decode", DECODE, "cpu"),  # planned, never joins
    )
    spec = GroupSpec("gloo", members, host, port, DEADLINE_S)
    refs = [holder.collective_join.remote(spec), a.collective_join.remote(spec)]
    for ref in refs:  # each gives up at its rendezvous deadline (bounded here by the get), naming the absent peer
        with pytest.raises(ray.exceptions.RayTaskError, match="peers that never joined: ghost-decode"):
            ray.get(ref, timeout=30)
    for actor in (holder, a):
        assert ray.get(actor.collective_status.remote(), timeout=10)["group"] is None


@pytest.fixture(scope="module")
def formed(actors):
    """The group the runtime would form (form_group, mode gloo): holder rank 0, receivers a and b."""
    n = actors["names"]
    formation = form_group(
        [(PREFILL, n["holder"], actors["holder"]), (DECODE, n["a"], actors["a"]), (DECODE, n["b"], actors["b"])],
        "gloo",
        DEADLINE_S,
    )
    assert formation.spec is not None, formation.reason
    return formation


@pytest.mark.timeout(60)
def test_chunk_kv_arrives_bit_exact_over_gloo(actors, formed):
    assert [m.name for m in formed.spec.members] == [actors["names"][k] for k in ("holder", "a", "b")]
    for reply in formed.joined.values():  # every member runs with NVLink multicast off
        assert {k: reply["env"][k] for k in NVLS_OFF_ENV} == NVLS_OFF_ENV
    address, ids, source = actors["info"]["address"], actors["ids"], actors["source"]
    absent = "f" * 64
    items = [FetchItem(c, address) for c in ids] + [FetchItem(absent, address)]
    result, _ = ray.get(actors["a"].fetch.remote(items, 30), timeout=60)
    assert result.paths == {"gloo": 3} and result.missing == [absent]
    for cid in ids:
        assert_bit_exact(result.chunks[cid], source[cid])
    rows = (0, 3, 4, 31)
    part, _ = ray.get(actors["a"].fetch.remote([FetchItem(ids[1], address, rows)], 30), timeout=60)
    assert part.paths == {"gloo": 1}
    assert_bit_exact(part.chunks[ids[1]], source[ids[1]], list(rows))
    assert part.bytes == part.chunks[ids[1]].nbytes()
    with pytest.raises(ray.exceptions.RayTaskError, match="rows out of range"):  # bad input: a clear error
        ray.get(actors["a"].fetch.remote([FetchItem(ids[0], address, (0, 99))], 30), timeout=60)
    status = ray.get(actors["a"].status.remote(), timeout=10)
    assert status["broken"] is None and status["fallbacks"] == 0 and status["received_bytes"] > 0


@pytest.mark.timeout(60)
def test_receiver_killed_after_announcing_does_not_hang_the_holder(actors, formed):
    """The holder's send to a dead receiver fails within its deadline naming it; the holder refuses that peer from
    then on and keeps serving the others over gloo (a gloo pair is its own socket)."""
    names, holder, b = actors["names"], actors["holder"], actors["b"]
    address, ids = actors["info"]["address"], actors["ids"]
    tid, _ = ray.get(b.announce.remote(names["holder"], [FetchItem(ids[0], address)]), timeout=30)
    ray.kill(b, no_restart=True)
    wait_dead(b)  # its process is gone before the send
    ack = ray.get(holder.collective_send.remote(tid), timeout=30)  # fails (within its deadline), does not hang
    assert not ack["ok"] and names["b"] in ack["error"]
    status = ray.get(holder.collective_status.remote(), timeout=10)
    assert status["broken"] is None and names["b"] in status["peers_off"][names["b"]]
    assert "refused" in ray.get(holder.collective_prepare.remote("t2", names["b"], [(ids[0], [])]), timeout=10)
    result, _ = ray.get(actors["a"].fetch.remote([FetchItem(c, address) for c in ids], 30), timeout=60)
    assert result.paths == {"gloo": 3}


@pytest.mark.timeout(60)
def test_holder_stalled_between_announce_and_send_times_out_then_grpc(actors, formed):
    """Stop the holder (SIGSTOP) after it announced: the receives give up at the deadline with an error naming the
    holder, the receiver takes that holder off (its receives are still posted), and the next fetch is gRPC at once."""
    names, pid, address, ids = actors["names"], actors["info"]["pid"], actors["info"]["address"], actors["ids"]
    a, items = actors["a"], [FetchItem(c, address) for c in ids[:2]]
    tid, reply = ray.get(a.announce.remote(names["holder"], items), timeout=30)
    assert [h["chunk_id"] for h in reply["headers"]] == ids[:2]
    assert [h["tensors"][0] for h in reply["headers"]] == [
        ["float32", list(actors["source"][c].k.shape)] for c in ids[:2]
    ]
    os.kill(pid, signal.SIGSTOP)
    try:
        error, elapsed = ray.get(a.receive.remote(names["holder"], tid, reply, DEADLINE_S), timeout=30)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert f"receiving 6 tensors from {names['holder']} (rank 0)" in error and "deadline" in error
    assert elapsed >= DEADLINE_S - 0.5  # it waited out the deadline (measured in the receiver)
    status = ray.get(a.status.remote(), timeout=10)
    assert status["peers_off"][names["holder"]] == error
    result, _ = ray.get(a.fetch.remote(items, 30), timeout=60)
    assert result.paths == {"grpc": 2}
    # at once: the holder is off, so no collective transfer was tried (a failed try would count a fallback)
    assert ray.get(a.status.remote(), timeout=10)["fallbacks"] == status["fallbacks"]
    for cid in ids[:2]:
        assert_bit_exact(result.chunks[cid], actors["source"][cid])


# ---- the whole cluster -------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_cluster_on_gloo_answers_like_in_process_and_falls_back_to_grpc_when_the_prefill_actor_stalls(
    ray_local, redis_url, tiny_llada
):
    config = ClusterConfig(
        model_dir=str(tiny_llada),
        redis_url=redis_url,
        num_prefill_actors=1,
        num_decode_actors=1,
        cpus_per_actor=0.25,
        chunk_size=METHOD.chunk_size,
        top_k=METHOD.top_k,
        keep_ratio=METHOD.keep_ratio,
        kv_transport="gloo",
    )
    limits = ClusterLimits(
        call_timeout_s=60,
        start_timeout_s=90,
        decode_reuse_fetched=False,  # every request fetches its chunks again
        collective_timeout_s=DEADLINE_S,
        index_prefix=f"t-coll-e2e-{uuid.uuid4().hex[:6]}",
    )
    lm = load_model(tiny_llada)
    with start_cluster(config, limits) as handle:
        assert handle.collective.spec is not None and handle.collective.spec.backend == "gloo", handle.collective
        for reply in handle.collective.joined.values():
            assert {k: reply["env"][k] for k in NVLS_OFF_ENV} == NVLS_OFF_ENV
        q1, q2 = "What is the code word of Vault 2?", "What is the code word of Vault 5?"
        got = handle.router.generate(DOC, q1, METHOD, SAMPLER)
        want = generate(lm, DOC, q1, SAMPLER, mode="sparse", method=METHOD, cache=ChunkCache()).answer
        assert got["answer"] == want
        assert got["stats"]["fetched_paths"] == {"gloo": METHOD.top_k}  # same node, yet device to device
        assert got["stats"]["fetched_same_node"] == 0
        pid = ray.get(handle.prefill_actors[0].info.remote(), timeout=10)["pid"]
        prefill_name = handle.collective.spec.members[0].name
        decode_actor = handle.decode_actors[0]
        os.kill(pid, signal.SIGSTOP)
        answer: dict = {}
        request = threading.Thread(target=lambda: answer.update(handle.router.generate(DOC, q2, METHOD, SAMPLER)))
        try:
            request.start()
            # let the holder run again once the decode actor has given up on it over gloo (then gRPC reads it)
            gave_up = threading.Event()
            for _ in range(600):
                peers_off = ray.get(control(decode_actor.collective_status).remote(), timeout=10)["peers_off"]
                if prefill_name in peers_off or gave_up.wait(0.05):
                    break
        finally:
            os.kill(pid, signal.SIGCONT)
            request.join(60)
        got = answer
        want = generate(lm, DOC, q2, SAMPLER, mode="sparse", method=METHOD, cache=ChunkCache()).answer
        assert got["answer"] == want
        stats = got["stats"]  # (the decode cache of 1 byte still keeps the last chunk it fetched)
        assert list(stats["fetched_paths"]) == ["grpc"] and stats["fetched_same_node"] == 0
        assert stats["fetched_paths"]["grpc"] + stats["fetched_local_cache"] == METHOD.top_k
        decode = ray.get(decode_actor.collective_status.remote(), timeout=10)
        assert "did not announce" in decode["peers_off"][prefill_name] and decode["broken"] is None
