"""Multi-GPU disaggregation: prefill on GPU 0, decode on GPU 1, chunk KV over NCCL, against one GPU for both.

Two measurements, each against baselines taken in the same run:
  transfer  one chunk of KV (bf16, LLaDA-8B layout: 32 layers x 8 KV heads x rows x 128) moved from a holder actor
            (GPU 0) to a receiver actor (GPU 1), median of --repeats:
              nccl raw       the NCCL send/recv of its tensors alone (group.post + wait), no control path
              nccl fetch     CollectiveTransport.fetch: announce over Ray, NCCL, checksums on both ends (and without)
              grpc fetch     GrpcTransport.fetch + copy to the receiver's GPU (the fallback path)
            baselines, in this driver process: a device-to-device copy on GPU 0 (copy_, bytes counted once) and a
            peer copy GPU 0 -> GPU 1 (cudaMemcpyPeer through copy_).
  e2e       requests/s for a batch of long-context requests through start_cluster (router, Valkey, actors):
              split-nccl     prefill actor on GPU 0, decode actor on GPU 1, kv_transport auto -> NCCL
              split-host     same placement, kv_transport grpc -> same-node reads through host memory (Ray)
              one-gpu        both actors on GPU 0 (Ray told of one GPU): the baseline
            The decode actors keep no fetched KV (decode_reuse_fetched False), so every request moves its top-K chunks.
NVLink multicast stays off everywhere: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 are set in this process, in Ray's job runtime_env and in every actor's runtime_env.

    python benchmarks/bench_multi_gpu.py --out benchmarks/results/multi_gpu_<date>_h200x2     # 2 GPUs
    python benchmarks/bench_multi_gpu.py --smoke                                              # CPU, gloo

--smoke runs the same code on CPU with gloo (kv_transport "gloo", the copy baseline a CPU memcpy, a tiny model):
it checks the script, and its numbers say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from pdllm.cluster.kv.collective_group import actor_env

os.environ.update(actor_env())  # before anything in this process can initialise NCCL

import ray  # noqa: E402
import torch  # noqa: E402
from pdllm.cluster.bootstrap import DECODE_RESOURCE, NAMESPACE, PREFILL_RESOURCE, loopback_only  # noqa: E402
from pdllm.cluster.common.limits import ClusterLimits  # noqa: E402
from pdllm.cluster.config import ClusterConfig  # noqa: E402
from pdllm.cluster.kv.chunk_store import ChunkStore  # noqa: E402
from pdllm.cluster.kv.collective_group import (  # noqa: E402
    DECODE,
    PREFILL,
    CollectiveGroup,
    CollectiveMember,
    form_group,
    with_actor_env,
)
from pdllm.cluster.kv.collective_transport import (  # noqa: E402
    CollectiveHolder,
    CollectiveSender,
    CollectiveTransport,
    checksum,
)
from pdllm.cluster.kv.transfer_server import serve  # noqa: E402
from pdllm.cluster.kv.transport import FetchItem, GrpcTransport  # noqa: E402
from pdllm.cluster.runtime import start_cluster  # noqa: E402

from pdllm.method import MethodConfig  # noqa: E402
from pdllm.method.chunk_kv import ChunkKV  # noqa: E402
from pdllm.models.tiny import make_tiny_checkpoint  # noqa: E402
from pdllm.sampler import SamplerConfig  # noqa: E402

TOKEN = "bench-multi-gpu"
ROW_BYTES = 2 * 32 * 8 * 128 * 2  # K and V of one token, bf16, 32 layers x 8 KV heads x 128
SHAPES = {  # random checkpoints for the e2e part (speed does not depend on the values)
    "tiny": {},
    "1b": {"hidden": 2048, "layers": 16, "heads": 16, "inner": 5632, "max_position": 65536},
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# ---- transfer ----------------------------------------------------------------------------------------------------
class BenchHolder(CollectiveHolder):
    """A prefill-side holder without a model: a chunk store, the gRPC service and the collective sender."""

    def __init__(self, name: str, device: str) -> None:
        self.name, self.device = name, device
        self.store = ChunkStore(1 << 40, None, name, "node", "")
        server, port = serve(self.store, host="127.0.0.1", token=TOKEN, piece_bytes=(4 << 20) - (128 << 10))
        self.server, self.store.address = server, f"127.0.0.1:{port}"
        self.collective = CollectiveGroup()
        self.kv_sender = CollectiveSender(self.collective, self.store)

    def make_chunk(self, mib: int, seed: int) -> tuple[str, list[int], int]:
        rows = max(2, (mib << 20) // ROW_BYTES)
        g = torch.Generator(device=self.device).manual_seed(seed)
        k = torch.randn(32, 8, rows, 128, generator=g, device=self.device).to(torch.bfloat16)
        v = torch.randn(32, 8, rows, 128, generator=g, device=self.device).to(torch.bfloat16)
        s = torch.randn(2, 8, 128, generator=g, device=self.device).to(torch.bfloat16)
        chunk = ChunkKV(f"bench-{mib}-{seed}".ljust(64, "0"), list(range(rows - 1)), k, v, s, True)
        self.store.put(chunk)
        return chunk.chunk_id, [checksum(t) for t in (k, v, s)], chunk.nbytes()

    def set_verify(self, on: bool) -> None:
        self.kv_sender.verify = on

    def raw_send(self, mib: int, peer: str, repeats: int) -> None:
        buf = torch.ones(mib << 20, dtype=torch.uint8, device=self.device)
        rank = self.collective.spec.rank(peer)
        for _ in range(repeats + 1):
            works = self.collective.post([("send", buf, rank)])
            self.collective.wait(works, time.monotonic() + 60, "raw send")


class BenchReceiver(CollectiveMember):
    """A decode-side receiver without a model: the CollectiveTransport with its gRPC fallback."""

    def __init__(self, name: str, device: str) -> None:
        self.name, self.device = name, device
        self.collective = CollectiveGroup()
        self.transport = CollectiveTransport(self.collective, GrpcTransport(token=TOKEN), device)

    def fetch_times(self, items: list[FetchItem], repeats: int) -> dict:
        times, result = [], None
        for _ in range(repeats + 1):  # the first one warms up (communicator, allocator)
            t0 = time.perf_counter()
            result = self.transport.fetch(items, timeout_s=120)
            sync(self.device)
            times.append(time.perf_counter() - t0)
        chunk = result.chunks[items[0].chunk_id]
        return {"seconds": times[1:], "paths": result.paths, "checksums": [checksum(t) for t in (chunk.k, chunk.v,
                chunk.summary)], "status": self.transport.status()}  # fmt: skip

    def grpc_times(self, items: list[FetchItem], repeats: int) -> dict:
        times, chunk = [], None
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            result = self.transport.fallback.fetch(items, timeout_s=600)
            chunk = result.chunks[items[0].chunk_id]
            k, v = chunk.k.to(self.device), chunk.v.to(self.device)
            sync(self.device)
            times.append(time.perf_counter() - t0)
        return {"seconds": times[1:], "checksums": [checksum(k), checksum(v), checksum(chunk.summary)]}

    def raw_recv(self, mib: int, peer: str, repeats: int) -> list[float]:
        buf = torch.empty(mib << 20, dtype=torch.uint8, device=self.device)
        rank, times = self.collective.spec.rank(peer), []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            works = self.collective.post([("recv", buf, rank)])
            self.collective.wait(works, time.monotonic() + 60, "raw recv")
            sync(self.device)
            times.append(time.perf_counter() - t0)
        return times[1:]


def copy_rates(mib: int, repeats: int, smoke: bool) -> dict:
    """GB/s of a same-device copy (and, with 2 GPUs, a peer copy GPU 0 -> GPU 1), bytes counted once."""
    n = mib << 20
    out = {}
    pairs = [("cpu", "cpu")] if smoke else [("cuda:0", "cuda:0"), ("cuda:0", "cuda:1")]
    for src_dev, dst_dev in pairs:
        src = torch.ones(n, dtype=torch.uint8, device=src_dev)
        dst = torch.empty(n, dtype=torch.uint8, device=dst_dev)
        times = []
        for _ in range(repeats + 1):
            sync(src_dev), sync(dst_dev)
            t0 = time.perf_counter()
            dst.copy_(src)
            sync(src_dev), sync(dst_dev)
            times.append(time.perf_counter() - t0)
        out["copy_same_device" if src_dev == dst_dev else "copy_peer_gpu0_gpu1"] = (
            n / statistics.median(times[1:]) / 1e9
        )
        del src, dst
    if not smoke:
        torch.cuda.empty_cache()
    return out


def transfer(sizes: list[int], repeats: int, smoke: bool) -> dict:
    device = "cpu" if smoke else "cuda"
    gpus = 0 if smoke else 1
    opts = {"num_cpus": 0.5, "num_gpus": gpus, "max_concurrency": 4, "runtime_env": with_actor_env()}
    holder = ray.remote(BenchHolder).options(name="bench-holder", **opts).remote("bench-holder", device)
    receiver = ray.remote(BenchReceiver).options(name="bench-receiver", **opts).remote("bench-receiver", device)
    formation = form_group(
        [(PREFILL, "bench-holder", holder), (DECODE, "bench-receiver", receiver)], "gloo" if smoke else "auto", 120
    )
    if formation.spec is None:
        raise SystemExit(f"no collective group: {formation.reason}")
    address = ray.get(holder.collective_probe.remote())["address"]
    rows = []
    for mib in sizes:
        cid, sums, nbytes = ray.get(holder.make_chunk.remote(mib, seed=mib))
        items = [FetchItem(cid, address)]
        send = holder.raw_send.remote(mib, "bench-receiver", repeats)
        raw = ray.get(receiver.raw_recv.remote(mib, "bench-holder", repeats))
        ray.get(send)
        fetched = {}
        for verify in (True, False):
            ray.get(holder.set_verify.remote(verify))
            fetched[verify] = ray.get(receiver.fetch_times.remote(items, repeats))
            assert fetched[verify]["checksums"] == sums, f"{mib} MiB chunk did not arrive bit-exact"
            assert list(fetched[verify]["paths"]) == [formation.spec.backend], fetched[verify]
        grpc = ray.get(receiver.grpc_times.remote(items, min(repeats, 3)))
        assert grpc["checksums"] == sums
        rate = {
            "raw_GBps": (mib << 20) / statistics.median(raw) / 1e9,
            "fetch_verified_GBps": nbytes / statistics.median(fetched[True]["seconds"]) / 1e9,
            "fetch_unverified_GBps": nbytes / statistics.median(fetched[False]["seconds"]) / 1e9,
            "grpc_GBps": nbytes / statistics.median(grpc["seconds"]) / 1e9,
        }
        rows.append({"mib": mib, "kv_bytes": nbytes, **{k: round(v, 3) for k, v in rate.items()}})
    status = ray.get(receiver.collective_status.remote())
    for actor in (holder, receiver):
        ray.kill(actor, no_restart=True)
    return {"backend": formation.spec.backend, "rows": rows, "actor_env": formation.joined, "receiver": status}


# ---- end to end --------------------------------------------------------------------------------------------------
def documents(n: int, tokens: int) -> list[str]:
    out = []
    for d in range(n):
        parts, i = [], 0
        while sum(len(p) + 1 for p in parts) < tokens:
            parts.append(f"Ledger {d} line {i}: account {(d * 7919 + i * 104729) % 100000:05d} holds {i * 37 % 991}.")
            i += 1
        out.append(" ".join(parts)[:tokens])
    return out


def e2e(name: str, model_dir: str, gpus: dict, kv_transport: str, args, docs: list[str]) -> dict:
    """One configuration on its own Ray instance; requests/s of the timed batch after a warm-up that prefills."""
    loopback_only()
    ray.init(
        num_cpus=max(4, os.cpu_count() or 1),
        num_gpus=gpus["ray_gpus"],
        resources={PREFILL_RESOURCE: 2, DECODE_RESOURCE: 2},
        namespace=NAMESPACE,
        include_dashboard=False,
        logging_level="warning",
        _node_ip_address="127.0.0.1",
        runtime_env=with_actor_env(),
    )
    method = MethodConfig(chunk_size=args.chunk_size, top_k=args.top_k, keep_ratio=1.0)
    sampler = SamplerConfig(gen_length=args.gen_length, block_length=args.gen_length, steps=args.steps)
    config = ClusterConfig(
        model_dir=model_dir,
        num_prefill_actors=1,
        num_decode_actors=1,
        prefill_gpus_per_actor=gpus["prefill"],
        decode_gpus_per_actor=gpus["decode"],
        cpus_per_actor=1,
        chunk_size=method.chunk_size,
        top_k=method.top_k,
        keep_ratio=1.0,
        store_capacity_bytes=args.store_gib << 30,
        kv_transport=kv_transport,
    )
    limits = ClusterLimits(
        decode_reuse_fetched=False, call_timeout_s=600, start_timeout_s=600, collective_timeout_s=120
    )
    try:
        with start_cluster(config, limits) as handle:
            infos = ray.get([a.collective_probe.remote() for a in handle.prefill_actors + handle.decode_actors])
            router = handle.router
            for d in docs:  # warm-up: prefill every document once (untimed)
                router.generate(d, "Which account is on line 3?", method, sampler)
            jobs = [
                (docs[i % len(docs)], f"What does account on line {i * 13 % 200} hold?") for i in range(args.requests)
            ]
            with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
                t0 = time.perf_counter()
                outs = list(pool.map(lambda j: router.generate(j[0], j[1], method, sampler), jobs))
                wall = time.perf_counter() - t0
            paths: dict[str, int] = {}
            for o in outs:
                for p, n in o["stats"]["fetched_paths"].items():
                    paths[p] = paths.get(p, 0) + n
            return {
                "config": name,
                "kv_transport": kv_transport,
                "group": handle.collective.spec.backend if handle.collective.spec else None,
                "group_reason": handle.collective.reason,
                "devices": [f"{i['device']}:{i['gpu'][-12:]}" for i in infos],
                "requests": args.requests,
                "seconds": round(wall, 3),
                "requests_per_s": round(args.requests / wall, 3),
                "fetched_paths": paths,
                "fetched_same_node": sum(o["stats"]["fetched_same_node"] for o in outs),
                "fetched_gb": round(sum(o["stats"]["fetched_bytes"] for o in outs) / 1e9, 3),
                "mean_fetch_ms": round(statistics.mean(o["stats"]["fetch_ms"] for o in outs), 2),
                "prefill_chunks_timed": sum(o["stats"]["prefill_chunks"] for o in outs),
                "answers": [o["answer"] for o in outs],
            }
    finally:
        ray.shutdown()


# ---- main --------------------------------------------------------------------------------------------------------
def machine() -> dict:
    info = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "env": {k: os.environ.get(k) for k in actor_env()},
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU and gloo, tiny sizes: checks the script runs")
    parser.add_argument("--out", help="write <out>.json and <out>.txt")
    parser.add_argument("--model", help="checkpoint directory for the e2e part (default: a random one of --shape)")
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="random checkpoint shape (1b; smoke: tiny)"
    )
    parser.add_argument("--sizes-mib", type=int, nargs="+", help="chunk sizes for the transfer (64 256 1024)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--context-tokens", type=int, default=None, help="tokens per document (16384; smoke 1024)")
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--requests", type=int, default=None, help="timed requests per configuration (32; smoke 8)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=None, help="512; smoke 64")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--store-gib", type=int, default=None, help="prefill store capacity (24; smoke 1)")
    parser.add_argument("--skip-transfer", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()
    smoke = args.smoke
    if not smoke and torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 GPUs, found {torch.cuda.device_count()}; run with --smoke on CPU (gloo)")
    args.shape = args.shape or ("tiny" if smoke else "1b")
    args.sizes_mib = args.sizes_mib or ([8, 32] if smoke else [64, 256, 1024])
    args.repeats = args.repeats or (3 if smoke else 10)
    args.context_tokens = args.context_tokens or (1024 if smoke else 16384)
    args.requests = args.requests or (8 if smoke else 32)
    args.chunk_size = args.chunk_size or (64 if smoke else 512)
    args.store_gib = args.store_gib or (1 if smoke else 24)
    flags = " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {' '.join(map(str, v)) if isinstance(v, list) else v}")
        for k, v in vars(args).items()
        if v not in (None, False)
    )
    result = {
        "kind": "cpu smoke (gloo): not a GPU result" if smoke else "2 GPUs (NCCL)",
        "command": f"python benchmarks/bench_multi_gpu.py {flags}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    lines = [f"# {result['kind']}", f"# {result['command']}", f"# {result['date']}  {result['machine']}", ""]
    if not args.skip_transfer:
        result["copy"] = {k: round(v, 3) for k, v in copy_rates(max(args.sizes_mib), args.repeats, smoke).items()}
        loopback_only()
        ray.init(num_cpus=max(4, os.cpu_count() or 1), num_gpus=0 if smoke else 2, namespace=NAMESPACE,
                 include_dashboard=False, logging_level="warning", _node_ip_address="127.0.0.1",
                 runtime_env=with_actor_env())  # fmt: skip
        try:
            result["transfer"] = transfer(args.sizes_mib, args.repeats, smoke)
        finally:
            ray.shutdown()
        base = result["copy"]["copy_same_device"]
        peer = result["copy"].get("copy_peer_gpu0_gpu1")
        lines.append(f"copy baselines (GB/s, bytes once): same device {base:.2f}" + (f", peer GPU0->GPU1 {peer:.2f}"
                     if peer else ""))  # fmt: skip
        lines.append(f"transfer over {result['transfer']['backend']} (median of {args.repeats}; GB/s, ratio to the "
                     "same-device copy" + (", to the peer copy" if peer else "") + ")")  # fmt: skip
        for r in result["transfer"]["rows"]:
            for key in ("raw_GBps", "fetch_verified_GBps", "fetch_unverified_GBps", "grpc_GBps"):
                ratio = f"{r[key] / base:6.3f}" + (f" {r[key] / peer:6.3f}" if peer else "")
                lines.append(f"  {r['mib']:>5} MiB  {key:<22} {r[key]:9.3f}  {ratio}")
    if not args.skip_e2e:
        with tempfile.TemporaryDirectory() as tmp:
            model = args.model or str(make_tiny_checkpoint(Path(tmp) / "model", "llada", seed=1, **SHAPES[args.shape]))
            docs = documents(args.documents, args.context_tokens)
            if smoke:
                configs = [("cpu-gloo", {"ray_gpus": 0, "prefill": 0, "decode": 0}, "gloo"),
                           ("cpu-host", {"ray_gpus": 0, "prefill": 0, "decode": 0}, "grpc")]  # fmt: skip
            else:
                configs = [("one-gpu", {"ray_gpus": 1, "prefill": 0.5, "decode": 0.5}, "auto"),
                           ("split-nccl", {"ray_gpus": 2, "prefill": 1, "decode": 1}, "auto"),
                           ("split-host", {"ray_gpus": 2, "prefill": 1, "decode": 1}, "grpc")]  # fmt: skip
            rows = [e2e(name, model, gpus, transport, args, docs) for name, gpus, transport in configs]
        base = rows[-1] if smoke else rows[0]
        for r in rows:
            r["ratio_to_baseline"] = round(r["requests_per_s"] / base["requests_per_s"], 3)
            r["answers_match_baseline"] = r["answers"] == base["answers"]
        result["e2e"] = rows
        lines.append(f"e2e: {args.requests} requests over {args.documents} documents of {args.context_tokens} tokens, "
                     f"chunk {args.chunk_size}, top-{args.top_k}, {args.concurrency} client threads, "
                     f"model {args.model or args.shape}; baseline {base['config']}")  # fmt: skip
        for r in rows:
            lines.append(
                f"  {r['config']:<11} group {str(r['group']):<5} {r['requests_per_s']:8.3f} req/s  "
                f"x{r['ratio_to_baseline']:.3f}  fetch {r['mean_fetch_ms']:8.2f} ms  paths {r['fetched_paths']}  "
                f"same-node {r['fetched_same_node']}  answers match {r['answers_match_baseline']}"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(args.out + ".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
