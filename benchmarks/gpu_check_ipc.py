"""CUDA IPC hand-off of chunk KV between Ray actors sharing one GPU: correctness and faults, on a real GPU.

Checks (each prints PASS/FAIL and what it saw; the JSON keeps the details):
  bit_exact        a holder actor's chunks (LLaDA-8B layout: 32 layers x 32 heads x 513 rows x 128, bf16) fetched by
                   a reader actor over IPC: SHA-256 of K, V and summary equal the holder's; token-row subsets too
  two_readers      two reader actors (fractional GPUs: holder and both readers on one GPU) fetch the same chunks at
                   once: both bit-exact
  evict_exported   the holder evicts a chunk after exporting it, before the reader maps it: the copy completes
                   bit-exact (the lease keeps it); after release the holder's memory comes back; a new fetch of it
                   reports it missing (the router then re-prefills it)
  evict_mapped     the same with the eviction after the reader mapped it, before the copy
  reader_dies      a reader maps a chunk and is killed: after the lease expires the holder reclaims it and, once
                   evicted, the chunk's memory is freed
  holder_dies      a holder is killed while a reader has its chunk mapped: the reader's copy completes or fails
                   with an error, the reader's GPU context still works, the next fetch from that holder is refused
                   (IpcUnavailable) so the decode side falls back
  cluster          start_cluster with one prefill and two decode actors on the one GPU (0.34 / 0.33 / 0.33), tiny
                   random model, both decode actors answering: every chunk they did not have in their own cache
                   comes over IPC (none through host memory); with same_gpu_ipc off the same chunks go through host
                   memory and the answers are the same (also compared with the in-process engine's, reported)

    python benchmarks/gpu_check_ipc.py --out benchmarks/results/gpu_check_ipc_<date>_h200
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import ray
import torch
from pdllm.cluster.bootstrap import DECODE_RESOURCE, NAMESPACE, PREFILL_RESOURCE, loopback_only
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.config import ClusterConfig
from pdllm.cluster.kv.chunk_store import ChunkStore
from pdllm.cluster.kv.ipc_transport import IpcExporter, IpcHolder, IpcTransport, IpcUnavailable
from pdllm.cluster.kv.transport import FetchItem
from pdllm.cluster.runtime import start_cluster

from pdllm.engine import generate
from pdllm.method import ChunkCache, MethodConfig
from pdllm.method.chunk_kv import ChunkKV
from pdllm.models.loader import load_model
from pdllm.models.tiny import make_tiny_checkpoint
from pdllm.sampler import SamplerConfig

LAYERS, HEADS, ROWS, DIM = 32, 32, 513, 128  # LLaDA-8B: one chunk of 512 tokens + BOS
LEASE_S = 2.0


def digests(*tensors: torch.Tensor) -> list[str]:
    return [hashlib.sha256(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()
            for t in tensors]  # fmt: skip


class CheckHolder(IpcHolder):
    """A holder without a model: a chunk store of two chunks' capacity and the IPC exporter."""

    def __init__(self, name: str) -> None:
        self.name, self.device = name, "cuda"
        self.chunk_bytes = 2 * LAYERS * HEADS * ROWS * DIM * 2 + 2 * HEADS * DIM * 2
        self.store = ChunkStore(2 * self.chunk_bytes + 1024, None, name, "node", "")
        self.kv_exporter = IpcExporter(self.store, "cuda", ttl_s=LEASE_S)
        self.filler_seed = 10_000

    def make_chunk(self, seed: int) -> tuple[str, list[str]]:
        g = torch.Generator(device="cuda").manual_seed(seed)
        k = torch.randn(LAYERS, HEADS, ROWS, DIM, generator=g, device="cuda").to(torch.bfloat16)
        v = torch.randn(LAYERS, HEADS, ROWS, DIM, generator=g, device="cuda").to(torch.bfloat16)
        s = torch.randn(2, HEADS, DIM, generator=g, device="cuda").to(torch.bfloat16)
        chunk = ChunkKV(f"check-{seed}".ljust(64, "0"), list(range(ROWS - 1)), k, v, s, True)
        self.store.put(chunk)
        return chunk.chunk_id, digests(k, v, s)

    def row_digests(self, cid: str, rows: list[int]) -> list[str]:
        chunk = self.store.get(cid)
        index = torch.tensor(rows, device="cuda")
        return digests(chunk.k.index_select(2, index), chunk.v.index_select(2, index), chunk.summary)

    def evict(self, cid: str) -> bool:
        """Evict `cid` the way the store does, by putting new chunks until it is gone; True once it is."""
        while cid in self.store:
            self.make_chunk(self.filler_seed)
            self.filler_seed += 1
        return cid not in self.store

    def drop_all(self) -> None:
        self.store.clear()

    def memory(self) -> dict:
        gc.collect()
        self.kv_exporter.sweep()
        torch.cuda.synchronize()
        return {"allocated": torch.cuda.memory_allocated(), "leases": len(self.kv_exporter.leases),
                "reclaimed": self.kv_exporter.reclaimed}  # fmt: skip


class CheckReader:
    """A reader actor: the real IpcTransport, and a fetch split in steps so faults can be put between them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.transport = IpcTransport(name, "cuda")
        self.pending = None

    def fetch(self, holder: str, cids: list[str], rows: list[int] | None = None) -> dict:
        items = [FetchItem(c, "", tuple(rows or ())) for c in cids]
        t0 = time.perf_counter()
        try:
            got = self.transport.fetch(holder, items, timeout_s=30)
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}", "unavailable": isinstance(e, IpcUnavailable)}
        seconds = time.perf_counter() - t0
        return {"digests": {c: digests(ch.k, ch.v, ch.summary) for c, ch in got.chunks.items()},
                "missing": got.missing, "paths": got.paths, "bytes": got.bytes, "seconds": seconds}  # fmt: skip

    def announce(self, holder: str, cids: list[str], map_now: bool) -> dict:
        lease, reply = self.transport.announce(holder, [FetchItem(c, "") for c in cids], time.monotonic() + 30)
        mapped = self.transport.map(reply) if map_now else None
        self.pending = (holder, lease, reply, mapped)
        return {"missing": reply["missing"], "mapped": map_now}

    def finish(self) -> dict:
        holder, lease, reply, mapped = self.pending
        self.pending = None
        try:
            got = self.transport.receive(reply, mapped=mapped)
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}"}
        finally:
            try:  # waited for here, so the holder's memory is read after the release
                ray.get(ray.get_actor(holder).ipc_release.remote(lease), timeout=10)
            except Exception:  # the holder is gone
                pass
        return {"digests": {c: digests(ch.k, ch.v, ch.summary) for c, ch in got.chunks.items()}}

    def healthy(self) -> bool:
        return float(torch.ones(1024, device="cuda").sum().item()) == 1024.0


def check(name: str, results: dict, fn) -> None:
    t0 = time.perf_counter()
    try:
        ok, detail = fn()
    except Exception as e:
        ok, detail = False, {"exception": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    detail["seconds"] = round(time.perf_counter() - t0, 2)
    results[name] = {"ok": bool(ok), **detail}
    print(f"{'PASS' if ok else 'FAIL'} {name}: {json.dumps(detail, default=str)[:900]}", flush=True)


def tensor_checks(results: dict) -> None:
    opts = {"num_cpus": 0.5, "num_gpus": 0.25, "max_concurrency": 4}
    hname, h2name = "check-holder", "check-holder-2"
    holder = ray.remote(CheckHolder).options(name=hname, **opts).remote(hname)
    holder2 = ray.remote(CheckHolder).options(name=h2name, **opts).remote(h2name)
    readers = [ray.remote(CheckReader).options(name=f"check-reader-{i}", **opts).remote(f"check-reader-{i}")
               for i in range(2)]  # fmt: skip
    (c1, d1), (c2, d2) = ray.get([holder.make_chunk.remote(1), holder.make_chunk.remote(2)])

    def bit_exact():
        got = ray.get(readers[0].fetch.remote(hname, [c1, c2]))
        rows = [0, 1, 7, 200, ROWS - 1]
        sub = ray.get(readers[0].fetch.remote(hname, [c1], rows))
        want_rows = ray.get(holder.row_digests.remote(c1, rows))
        again = ray.get(readers[0].fetch.remote(hname, [c1, c2]))  # warm: the fetch's own time
        ok = (got.get("digests") == {c1: d1, c2: d2} and sub.get("digests") == {c1: want_rows}
              and got["paths"] == {"ipc": 2})  # fmt: skip
        gbps = again["bytes"] / again["seconds"] / 1e9 if "seconds" in again else None
        return ok, {"paths": got.get("paths"), "bytes": got.get("bytes"), "first_s": got.get("seconds"),
                    "warm_s": again.get("seconds"), "warm_GBps_with_checksums": gbps, "rows_ok":
                    sub.get("digests") == {c1: want_rows}, "errors": [got.get("error"), sub.get("error")]}  # fmt: skip

    def two_readers():
        both = ray.get([r.fetch.remote(hname, [c1, c2]) for r in readers])
        return all(b.get("digests") == {c1: d1, c2: d2} for b in both), {"paths": [b.get("paths") for b in both]}

    def evict(map_first: bool):
        def run():
            cid, want = ray.get(holder.make_chunk.remote(5 if map_first else 6))
            base = ray.get(holder.memory.remote())
            ray.get(readers[0].announce.remote(hname, [cid], map_first))
            evicted = ray.get(holder.evict.remote(cid))
            during = ray.get(holder.memory.remote())
            got = ray.get(readers[0].finish.remote())
            after = ray.get(holder.memory.remote())
            refetch = ray.get(readers[0].fetch.remote(hname, [cid]))
            ok = evicted and got.get("digests") == {cid: want} and refetch.get("missing") == [cid]
            ok = ok and after["leases"] == 0 and after["allocated"] < during["allocated"]
            return ok, {"evicted": evicted, "copy": "bit-exact" if got.get("digests") == {cid: want} else got,
                        "holder_allocated_MiB": [m["allocated"] >> 20 for m in (base, during, after)],
                        "refetch_missing": refetch.get("missing") == [cid]}  # fmt: skip

        return run

    def reader_dies():
        ray.get(holder.drop_all.remote())
        base = ray.get(holder.memory.remote())
        c3, _ = ray.get(holder.make_chunk.remote(3))
        made = ray.get(holder.memory.remote())
        ray.get(readers[1].announce.remote(hname, [c3], True))
        ray.kill(readers[1], no_restart=True)
        ray.get(holder.drop_all.remote())  # evicted while the dead reader's mapping is unreleased
        evicted = ray.get(holder.memory.remote())
        time.sleep(LEASE_S + 0.5)  # the lease's time to live
        reclaimed = ray.get(holder.memory.remote())
        freed = reclaimed["allocated"] <= base["allocated"] + (1 << 20)
        return reclaimed["reclaimed"] >= 1 and freed, {
            "holder_allocated_MiB": {"before": base["allocated"] >> 20, "with_chunk": made["allocated"] >> 20,
                                     "evicted_still_mapped": evicted["allocated"] >> 20,
                                     "after_lease_expired": reclaimed["allocated"] >> 20},
            "reclaimed_leases": reclaimed["reclaimed"]}  # fmt: skip

    def holder_dies():
        c4, d4 = ray.get(holder2.make_chunk.remote(4))
        ray.get(readers[0].announce.remote(h2name, [c4], True))
        ray.kill(holder2, no_restart=True)
        time.sleep(1.0)  # the process is gone
        got = ray.get(readers[0].finish.remote())
        healthy = ray.get(readers[0].healthy.remote())
        after = ray.get(readers[0].fetch.remote(h2name, [c4]))
        outcome = "bit-exact" if got.get("digests") == {c4: d4} else got.get("error") or "wrong bits"
        clean = outcome == "bit-exact" or "error" in got  # completed, or failed with an error (not wrong bits)
        return clean and healthy and after.get("unavailable") is True, {
            "copy_after_holder_died": outcome,
            "reader_gpu_healthy": healthy,
            "next_fetch": after.get("error"),
        }

    check("bit_exact", results, bit_exact)
    check("two_readers", results, two_readers)
    check("evict_exported", results, evict(False))
    check("evict_mapped", results, evict(True))
    check("reader_dies", results, reader_dies)
    check("holder_dies", results, holder_dies)
    for actor in (holder, holder2, *readers):
        try:
            ray.kill(actor, no_restart=True)
        except Exception as e:  # already gone
            print(f"  (kill: {type(e).__name__})")


def cluster_check(results: dict, tmp: str) -> None:
    model = make_tiny_checkpoint(Path(tmp) / "tiny", "llada", seed=3, hidden=128, layers=2, heads=4, inner=256)
    method = MethodConfig(chunk_size=64, top_k=3, keep_ratio=1.0)
    sampler = SamplerConfig(gen_length=16, block_length=16, steps=8)
    doc = " ".join(f"Locker {i} holds the number {(i * 7919) % 10007}." for i in range(60))
    questions = [f"What does locker {i} hold?" for i in (3, 17, 29, 41, 55, 8)]
    lm = load_model(model, "cuda")
    want = [generate(lm, doc, q, sampler, mode="sparse", method=method, cache=ChunkCache()).answer for q in questions]
    del lm
    torch.cuda.empty_cache()
    config = ClusterConfig(model_dir=str(model), num_prefill_actors=1, num_decode_actors=2,
                           prefill_gpus_per_actor=0.34, decode_gpus_per_actor=0.33, cpus_per_actor=1,
                           chunk_size=method.chunk_size, top_k=method.top_k, keep_ratio=1.0,
                           store_capacity_bytes=1 << 30)  # fmt: skip
    seen: dict[bool, dict] = {}
    for ipc in (True, False):
        limits = ClusterLimits(
            decode_reuse_fetched=False, same_gpu_ipc=ipc, call_timeout_s=120, start_timeout_s=180
        )  # one job per actor: both decode actors take requests
        t0 = time.perf_counter()
        try:
            with start_cluster(config, limits) as handle:
                handle.router.generate(doc, "Which locker is first?", method, sampler)  # prefill
                with ThreadPoolExecutor(4) as pool:
                    outs = list(pool.map(lambda q, h=handle: h.router.generate(doc, q, method, sampler), questions))
        except Exception as e:
            seen[ipc] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            continue
        paths: dict[str, int] = {}
        for o in outs:
            for p, n in o["stats"]["fetched_paths"].items():
                paths[p] = paths.get(p, 0) + n
        seen[ipc] = {"paths": paths, "same_node": sum(o["stats"]["fetched_same_node"] for o in outs),
                     "decode_actors": sorted({o["stats"]["decode_actor"] for o in outs}),
                     "answers": [o["answer"] for o in outs], "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip

    def compare():
        on, off = seen.get(True, {}), seen.get(False, {})
        moved = on.get("paths", {}).get("ipc", 0)  # the rest were hits of the decode actors' own cache
        ok = moved > 0 and list(on.get("paths", {})) == ["ipc"] and on.get("same_node") == 0
        ok = ok and off.get("paths") == {} and off.get("same_node") == moved  # same requests, through host memory
        ok = ok and on.get("answers") == off.get("answers") and len(on.get("decode_actors", [])) == 2
        return ok, {"ipc": {k: v for k, v in on.items() if k != "answers"},
                    "host": {k: v for k, v in off.items() if k != "answers"},
                    "answers_ipc_equal_host": on.get("answers") == off.get("answers"),
                    "answers_equal_in_process_engine": on.get("answers") == want}  # fmt: skip

    check("cluster_one_prefill_two_decode_one_gpu", results, compare)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write <out>.json and <out>.txt")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (CUDA IPC); on CPU the host paths are tested by tests/test_kv_paths.py")
    results: dict = {
        "command": "python benchmarks/gpu_check_ipc.py" + (f" --out {args.out}" if args.out else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "gpu": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
    }
    loopback_only()
    ray.init(
        address="local",
        num_cpus=max(8, os.cpu_count() or 1),
        num_gpus=1,
        resources={PREFILL_RESOURCE: 2, DECODE_RESOURCE: 2},
        namespace=NAMESPACE,
        include_dashboard=False,
        logging_level="warning",
        _node_ip_address="127.0.0.1",
    )
    try:
        tensor_checks(results)
        with tempfile.TemporaryDirectory() as tmp:
            cluster_check(results, tmp)
    finally:
        ray.shutdown()
    passed = sum(r["ok"] for k, r in results.items() if isinstance(r, dict) and "ok" in r)
    total = sum(1 for r in results.values() if isinstance(r, dict) and "ok" in r)
    print(f"{passed}/{total} checks passed")
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
