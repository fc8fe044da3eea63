"""The per-holder choice of KV path (cluster/kv/kv_paths.py) and the CUDA IPC path's CPU-side parts.

CUDA IPC itself needs a GPU (benchmarks/gpu_check_ipc.py runs it); here: the chooser's decisions over site
descriptors of every layout the config allows, that a CPU process never chooses IPC, the lease table's expiry with a
fake clock, a CPU holder refusing to export, and, against a real prefill actor (tiny model, embedded Valkey index),
a reader whose IPC attempt is refused falling back to the same-node read within the same fetch, bit-exact.
"""

from __future__ import annotations

import uuid

import pytest
import ray
import torch
from pdllm.cluster.bootstrap import DECODE_RESOURCE, NAMESPACE, PREFILL_RESOURCE, loopback_only
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.kv.chunk_index import ChunkIndex
from pdllm.cluster.kv.chunk_store import ChunkStore
from pdllm.cluster.kv.collective_group import CollectiveGroup
from pdllm.cluster.kv.collective_transport import CollectiveTransport
from pdllm.cluster.kv.ipc_transport import IpcExporter, IpcTransport, IpcUnavailable, Lease, LeaseTable, ipc_supported
from pdllm.cluster.kv.jobs import PrefillJob
from pdllm.cluster.kv.kv_paths import GRPC, IPC, LOCAL, NODE, KVPaths, Site, choose_path
from pdllm.cluster.kv.redis_server import EmbeddedRedis
from pdllm.cluster.kv.transport import FetchItem, GrpcTransport
from pdllm.prefill_node.actor import PrefillWorker

from pdllm.method import MethodConfig

GPU_A, GPU_B = "GPU-aaaa", "GPU-bbbb"
READER = Site("decode-0", "node-1", "cuda", GPU_A)


# ---- the chooser ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "holder, collective, ipc, want",
    [
        (Site("decode-0", "node-1", "cuda", GPU_A), GRPC, True, LOCAL),  # the reader's own store
        (Site("prefill-0", "node-1", "cuda", GPU_A), GRPC, True, IPC),  # one GPU shared (fractions)
        (Site("prefill-0", "node-1", "cuda", GPU_A), GRPC, False, NODE),  # IPC off (config or taken off)
        (Site("prefill-0", "node-1", "cuda", GPU_B), "nccl", True, "nccl"),  # two GPUs of one node, in the group
        (Site("prefill-0", "node-1", "cuda", GPU_B), GRPC, True, NODE),  # two GPUs, no group: host memory
        (Site("prefill-0", "node-2", "cuda", GPU_A), GRPC, True, GRPC),  # same GPU id on another node is not ours
        (Site("prefill-0", "node-2", "cuda", GPU_B), "nccl", True, "nccl"),  # across nodes in the group
        (Site("prefill-0", "node-1", "cpu", ""), GRPC, True, NODE),  # CPU holder beside a GPU reader
        (Site("prefill-0", "node-1", "", ""), GRPC, True, NODE),  # holder not probed (did not answer)
        (Site("prefill-0", "", "cuda", GPU_A), GRPC, True, GRPC),  # no node known: never assumed local
    ],
)
def test_path_per_holder(holder, collective, ipc, want):
    assert choose_path(READER, holder, collective, ipc) == want


def test_cpu_processes_only_get_host_paths():
    cpu_reader = Site("decode-0", "node-1", "cpu", "")
    for holder in (Site("p", "node-1", "cpu", ""), Site("p", "node-1", "cuda", GPU_A)):
        assert choose_path(cpu_reader, holder, GRPC, True) == NODE
    assert choose_path(cpu_reader, Site("p", "node-2", "cpu", ""), GRPC, True) == GRPC
    assert choose_path(cpu_reader, Site("p", "node-1", "cpu", ""), "gloo", True) == "gloo"
    assert not ipc_supported("cpu")


def test_two_decode_actors_sharing_the_prefill_gpu_both_choose_ipc():
    holder = Site("prefill-0", "node-1", "cuda", GPU_A)
    for name in ("decode-0", "decode-1"):
        assert choose_path(Site(name, "node-1", "cuda", GPU_A), holder, GRPC, True) == IPC
    assert choose_path(Site("decode-2", "node-1", "cuda", GPU_B), holder, GRPC, True) == NODE


# ---- lease table and a CPU holder ----------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_leases_expire_and_only_dead_readers_are_reclaimed():
    clock = Clock()
    table = LeaseTable(ttl_s=10.0, clock=clock)
    for lid, reader in (("l1", "alive"), ("l2", "dead"), ("l3", "dead")):
        table.add(lid, Lease(reader, [], [(b"/f", 8)], clock()))
    assert table.release("l3") and not table.release("l3")  # released by its reader: never reclaimed
    clock.now += 5.0
    assert table.expire(lambda r: r == "dead") == [] and len(table) == 2  # within ttl: kept
    clock.now += 6.0
    reclaim = table.expire(lambda r: r == "dead")
    assert [lease.reader for lease in reclaim] == ["dead"] and len(table) == 0  # the live reader's just dropped


def test_a_cpu_holder_refuses_to_export_and_a_cpu_reader_does_not_try():
    store = ChunkStore(1 << 20, None, "h", "node-1", "")
    exporter = IpcExporter(store, "cpu")
    assert "refused" in exporter.export("lease", "reader", [("c" * 64, [])])
    assert len(exporter.leases) == 0
    with pytest.raises(IpcUnavailable, match="no CUDA IPC"):
        IpcTransport("reader", "cpu").announce("h", [FetchItem("c" * 64, "x")], deadline=0.0)
    paths = KVPaths(Site("reader", "node-1", "cpu"), GrpcTransport(), ipc=True)
    assert paths.ipc is None and paths.status()["ipc"] is False


# ---- against a real prefill actor ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def holder(tmp_path_factory, tiny_llada):
    loopback_only()
    ray.init(address="local", num_cpus=2, resources={PREFILL_RESOURCE: 2, DECODE_RESOURCE: 2}, namespace=NAMESPACE,
             include_dashboard=False, logging_level="warning", _node_ip_address="127.0.0.1")  # fmt: skip
    redis = EmbeddedRedis(str(tmp_path_factory.mktemp("valkey"))).start()
    run = uuid.uuid4().hex[:6]
    limits = ClusterLimits(call_timeout_s=30, index_prefix=f"t-paths-{run}")
    name = f"t-holder-{run}"
    actor = (
        ray.remote(PrefillWorker)
        .options(name=name, num_cpus=0.25, max_concurrency=4)
        .remote(name, str(tiny_llada), 0, 1, 64 << 20, redis.url, limits, "t-token")
    )
    info = ray.get(actor.info.remote(), timeout=90)
    chunks = [[(11 * c + i) % 250 for i in range(32)] for c in range(2)]
    method = MethodConfig(chunk_size=32, top_k=2, keep_ratio=1.0)
    ids = ray.get(actor.prefill.remote(PrefillJob.of(info["model_id"], chunks, method)), timeout=60).encoded
    index = ChunkIndex.from_url(redis.url, limits.index_prefix, 5.0)
    yield {"actor": actor, "info": info, "ids": ids, "entries": index.lookup(ids), "name": name}
    ray.kill(actor, no_restart=True)
    ray.shutdown()
    redis.stop()


@pytest.mark.timeout(120)
def test_refused_ipc_falls_back_to_the_same_node_read_bit_exact(holder):
    node = ray.get_runtime_context().get_node_id()
    paths = KVPaths(Site("t-reader", node, "cpu"), CollectiveTransport(CollectiveGroup(), GrpcTransport()))
    plan = paths.plan(holder["ids"], holder["entries"])
    assert [(g.path, g.holder, len(g.items)) for g in plan] == [(NODE, holder["name"], 2)]  # CPU: host path
    assert paths.site(holder["name"], node) == Site(holder["name"], node, "cpu", "")  # probed for real
    # as a reader with CUDA would: try IPC first; the CPU holder (and this CPU process) refuse, the read goes on
    paths.ipc = IpcTransport("t-reader", "cuda")
    plan[0].path = IPC
    got = paths.fetch(plan[0], timeout_s=30)
    assert got.paths == {NODE: 2} and not got.missing and paths.fallbacks == 1
    assert holder["name"] in paths.ipc_off and paths.path_for(holder["entries"][holder["ids"][0]]) == NODE
    want = ray.get(holder["actor"].read_chunks.remote(holder["ids"]), timeout=30)
    for cid in holder["ids"]:
        assert torch.equal(got.chunks[cid].k, want[cid].k) and torch.equal(got.chunks[cid].v, want[cid].v)
    # the holder itself refuses an export on CPU, leasing nothing
    reply = ray.get(holder["actor"].ipc_export.remote("lease-1", "t-reader", [(holder["ids"][0], [])]), timeout=30)
    assert "refused" in reply
    assert ray.get(holder["actor"].status.remote(), timeout=30)["ipc_leases"] == 0


@pytest.mark.timeout(120)
def test_a_dead_holder_leaves_its_chunks_missing_with_the_reason(holder):
    node = ray.get_runtime_context().get_node_id()
    paths = KVPaths(Site("t-reader", node, "cpu"), GrpcTransport())
    group = paths.plan(holder["ids"], holder["entries"])[0]
    group.holder = "t-no-such-holder"
    got = paths.fetch(group, timeout_s=5)
    assert got.missing == holder["ids"] and "same-node read failed" in got.error and not got.chunks
