"""One GPU, three ways to serve: the in-process engine, and the cluster (one prefill + one decode actor sharing
the GPU) with chunk KV over CUDA IPC or through host memory (Ray's object store). One run, same checkpoint, same
documents and questions.

Per backend, on documents of --context-tokens tokens (LLaDA-8B-shaped random bf16 checkpoint, byte tokenizer):
  warm-up         one question on a first document (compiles kernels, prefills it; untimed)
  first question  one question on a new document: prefill of the whole document + selection + fetch + decode
  first x8        8 questions at once on another new document (one prefill, eight decodes)
  c1, c8          requests/s over the prefilled documents from 1 and from 8 client threads
(in this order: warm-up, first question, c1, c8, first x8; the host path, after its start, gets --host-budget-s and
fewer requests: steps past the budget are skipped and reported)
The in-process engine is `pdllm serve --in-process`'s: `engine.generate` from as many threads as there are clients,
every one batched into the decode engine's steps, with a chunk cache big enough for every document (so it never
re-encodes) and a decode pool of --pool-gib. The cluster is `start_cluster` + the router
(the gRPC API in front of either backend is the same and left out), default limits (the decode engine: a batch of up
to 32 jobs per step over its resident KV pool), `same_gpu_ipc` on or off. The host path gets a time budget
(--host-budget-s): it is slow.

    python benchmarks/bench_one_gpu.py --out benchmarks/results/one_gpu_<date>_h200
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ray  # noqa: E402
import torch  # noqa: E402
from bench_multi_gpu import documents  # noqa: E402
from pdllm.cluster.bootstrap import DECODE_RESOURCE, NAMESPACE, PREFILL_RESOURCE, loopback_only  # noqa: E402
from pdllm.cluster.common.limits import ClusterLimits  # noqa: E402
from pdllm.cluster.config import ClusterConfig  # noqa: E402
from pdllm.cluster.kv.collective_group import with_actor_env  # noqa: E402
from pdllm.cluster.runtime import start_cluster  # noqa: E402
from pdllm.decode_node.engine import EngineConfig  # noqa: E402

from pdllm.engine import engine_for, generate, release_engine  # noqa: E402
from pdllm.method import ChunkCache, MethodConfig  # noqa: E402
from pdllm.models.checkpoint import save_checkpoint  # noqa: E402
from pdllm.models.loader import load_model  # noqa: E402
from pdllm.models.tiny import make_tiny_checkpoint, tiny_spec  # noqa: E402
from pdllm.models.tokenizer import save_byte_tokenizer  # noqa: E402
from pdllm.models.transformer import DllmModel  # noqa: E402
from pdllm.sampler import SamplerConfig  # noqa: E402

LLADA_8B = {"hidden": 4096, "layers": 32, "heads": 32, "inner": 12288, "max_position": 65536}


def make_checkpoint(out: Path, seed: int = 0) -> Path:
    """A random LLaDA-8B-shaped bf16 checkpoint (real tensor names), built on the GPU (speed needs no training)."""
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = DllmModel(tiny_spec("llada", **LLADA_8B)).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    save_checkpoint(model, out)
    save_byte_tokenizer(out)
    del model
    torch.cuda.empty_cache()
    return out


class InProcess:
    """engine.generate from every client thread into one decode engine (pdllm serve --in-process)."""

    def __init__(self, model_dir: str, method: MethodConfig, sampler: SamplerConfig, device: str, args) -> None:
        self.lm = load_model(model_dir, device)
        self.cache = ChunkCache(max_bytes=args.store_gib << 30)
        self.engine = engine_for(self.lm, EngineConfig(pool_bytes=args.pool_gib << 30))  # before the cache fills
        self.method, self.sampler = method, sampler

    def ask(self, doc: str, question: str) -> dict:
        out = generate(
            self.lm, doc, question, self.sampler, "sparse", 1 << 20, 0, None, self.method, self.cache,
            engine=self.engine,
        )  # fmt: skip
        return {"answer": out.answer, "stats": out.stats}

    def close(self) -> None:
        release_engine(self.lm)
        del self.lm, self.cache, self.engine


class Cluster:
    def __init__(self, model_dir: str, method: MethodConfig, sampler: SamplerConfig, ipc: bool, args) -> None:
        gpus = 0 if args.smoke else 0.5
        store_gib = args.store_gib
        config = ClusterConfig(model_dir=model_dir, num_prefill_actors=1, num_decode_actors=1,
                               prefill_gpus_per_actor=gpus, decode_gpus_per_actor=gpus, cpus_per_actor=1,
                               chunk_size=method.chunk_size, top_k=method.top_k, keep_ratio=method.keep_ratio,
                               store_capacity_bytes=store_gib << 30)  # fmt: skip
        limits = ClusterLimits(same_gpu_ipc=ipc, call_timeout_s=600, start_timeout_s=600, fetch_timeout_s=300)
        self.handle = start_cluster(config, limits)
        self.method, self.sampler = method, sampler

    def ask(self, doc: str, question: str) -> dict:
        return self.handle.router.generate(doc, question, self.method, self.sampler)

    def close(self) -> None:
        self.handle.shutdown()


def timed(backend, jobs: list[tuple[str, str]], threads: int, budget_s: float | None = None) -> dict:
    """Run `jobs` from `threads` client threads; requests/s over those that ran (a budget stops handing out more)."""
    t0 = time.perf_counter()
    start = iter(range(len(jobs)))
    lock = threading.Lock()
    done: list[tuple[float, dict]] = []

    def client() -> None:
        while True:
            with lock:
                if budget_s is not None and time.perf_counter() - t0 > budget_s:
                    return
                i = next(start, None)
            if i is None:
                return
            s = time.perf_counter()
            out = backend.ask(*jobs[i])
            with lock:
                done.append((time.perf_counter() - s, out))

    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(client) for _ in range(threads)]:
            f.result()
    wall = time.perf_counter() - t0
    lat = [d for d, _ in done]
    fetch = [o["stats"].get("fetch_ms") for _, o in done if o["stats"].get("fetch_ms") is not None]
    paths: dict[str, int] = {}
    for _, o in done:
        for p, n in o["stats"].get("fetched_paths", {}).items():
            paths[p] = paths.get(p, 0) + n
        if o["stats"].get("fetched_same_node"):
            paths["node"] = paths.get("node", 0) + o["stats"]["fetched_same_node"]
    breakdown = {}  # mean per request of where its time went (keys a backend reports)
    for key in BREAKDOWN:
        values = [o["stats"][key] for _, o in done if o["stats"].get(key) is not None]
        if values:
            breakdown[key] = round(statistics.mean(values), 4)
    return {
        "breakdown": breakdown,
        "requests": len(done),
        "threads": threads,
        "seconds": round(wall, 3),
        "requests_per_s": round(len(done) / wall, 4) if done else 0.0,
        "latency_s": {"mean": round(statistics.mean(lat), 3), "max": round(max(lat), 3)} if lat else None,
        "mean_fetch_ms": round(statistics.mean(fetch), 2) if fetch else None,
        "paths": paths,
        "prefill_chunks": sum(o["stats"].get("prefill_chunks", 0) for _, o in done),
        "answers": [o["answer"] for _, o in done],
    }


# ms: the decode actor's index read, read + ranking, fetch + row selection, its whole job; s: engine queue and steps,
# the router's whole request (in-process: the chunk-cache lookup as prefill_seconds)
BREAKDOWN = ("lookup_ms", "rank_ms", "fetch_ms", "actor_ms", "queue_seconds", "decode_seconds", "prefill_seconds",
             "total_seconds")  # fmt: skip


def measure(name: str, make, docs: list[str], args, budget_s: float | None) -> dict:
    t0 = time.perf_counter()
    backend = make()
    row = {"backend": name, "start_s": round(time.perf_counter() - t0, 1)}
    t0 = time.perf_counter()  # the budget counts from here
    warm, first, firsts = docs[:3]
    pool = [warm, first]
    host = budget_s is not None
    n1, n8 = (args.host_c1_requests, args.host_c8_requests) if host else (args.c1_requests, args.c8_requests)
    c1 = [(pool[i % 2], f"What does account on line {i * 13 % 200} hold?") for i in range(n1)]
    c8 = [(pool[i % 2], f"What does account on line {i * 17 % 200} hold?") for i in range(n8)]
    steps = [
        ("warmup", [(warm, "Which account is on line 3?")], 1),
        ("first", [(first, "What does the account on line 5 hold?")], 1),
        ("c1", c1, 1),
        ("c8", c8, 8),
        ("first_x8", [(firsts, f"What does account on line {i * 11} hold?") for i in range(8)], 8),
    ]
    try:
        for key, jobs, threads in steps:
            left = None if budget_s is None else budget_s - (time.perf_counter() - t0)
            if left is not None and left <= 0:
                row["skipped"] = row.get("skipped", []) + [key]
                continue
            row[key] = timed(backend, jobs, threads, left if key in ("c1", "c8") else None)
    except Exception as e:  # report what ran
        row["error"] = f"{type(e).__name__}: {e}"
    finally:
        backend.close()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"  {name}: done in {row['total_s']} s" + (f" ({row['error']})" if "error" in row else ""), flush=True)
    return row


def gpu_memory() -> dict | None:
    """Free and total GPU memory, and what this process still reserves, in GiB: a decode actor derives its KV pool
    from the free memory it finds, so memory the in-process backend left behind would shrink the cluster's pool."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    gib = lambda n: round(n / 2**30, 2)  # noqa: E731
    return {"free_gib": gib(free), "total_gib": gib(total), "driver_reserved_gib": gib(torch.cuda.memory_reserved())}


def save_partial(out: str | None, result: dict, rows: list[dict]) -> None:
    """Rows so far (a run cut short still leaves them)."""
    if out:
        Path(out + ".json").write_text(json.dumps({**result, "rows": rows, "partial": True}, default=str) + "\n")


def render(result: dict) -> str:
    """The table of a result (ratios against the in-process row); parameters read back from its command."""
    args = parser().parse_args(shlex.split(result["command"])[2:])
    rows = result["rows"]
    base = rows[0]
    lines = [
        f"# {result['kind']}",
        f"# {result['command']}",
        f"# {result['date']}  {result['machine']}",
        f"# model: {result['model']}",
        f"# documents of {args.context_tokens} tokens, chunk {args.chunk_size}, top-{args.top_k}, "
        f"gen {args.gen_length} in {args.steps} steps; ratios against in-process from this run",
        "",
        f"{'backend':<13} {'first q s':>9} {'x':>6} {'first x8 mean s':>15} {'x':>6} {'c1 req/s':>9} {'x':>6} "
        f"{'c8 req/s':>9} {'x':>6}  fetch ms (c8)  paths (c8)  chunks encoded (c1, c8)  answers = in-process",
    ]

    def cell(row, key, field):
        part = row.get(key)
        if not part or not part.get("requests"):
            return f"{'-':>9} {'-':>6}"
        value = part["latency_s"]["mean"] if field == "lat" else part["requests_per_s"]
        ref = base.get(key)
        ref_value = (ref["latency_s"]["mean"] if field == "lat" else ref["requests_per_s"]) if ref else None
        ratio = value / ref_value if ref_value else float("nan")
        return f"{value:9.3f} {ratio:5.2f}x"

    def same_answers(r, ref) -> bool | None:
        if ref is None or not r.get("first") or not ref.get("first"):
            return None
        a, b = r.get("c1", {}).get("answers", []), ref.get("c1", {}).get("answers", [])
        n = min(len(a), len(b))
        return r["first"]["answers"] == ref["first"]["answers"] and a[:n] == b[:n]

    for r in rows:
        c8 = r.get("c8") or {}
        encoded = tuple((r.get(k) or {}).get("prefill_chunks") for k in ("c1", "c8"))
        lines.append(
            f"{r['backend']:<13} {cell(r, 'first', 'lat')} {cell(r, 'first_x8', 'lat'):>22} "
            f"{cell(r, 'c1', 'rps')} {cell(r, 'c8', 'rps')}  {c8.get('mean_fetch_ms')}  "
            f"{c8.get('paths')}  {encoded}  {same_answers(r, base)}" + (f"  ERROR {r['error']}" if "error" in r else "")
        )
    host = next((r for r in rows if r["backend"] == "cluster-host"), None)
    if host is not None and len(rows) > 1:
        lines.append(f"# answers cluster-ipc = cluster-host (first, c1): {same_answers(rows[1], host)}")
    for r in rows:
        for key in ("c1", "c8"):
            part = r.get(key) or {}
            if part.get("breakdown"):
                mean_s = part["latency_s"]["mean"]
                lines.append(f"# {r['backend']} {key} per request (client mean {mean_s} s): {part['breakdown']}")
    for r in rows:
        counts = {k: (r[k]["requests"], r[k]["seconds"]) for k in ("c1", "c8") if r.get(k)}
        lines.append(
            f"# {r['backend']}: start {r['start_s']} s, measured {r['total_s']} s, (requests, s) {counts}"
            + (f", skipped (budget) {r['skipped']}" if r.get("skipped") else "")
        )
    if result.get("gpu_before_cluster"):
        lines.append(f"# GPU memory when the cluster started (GiB): {result['gpu_before_cluster']}")
    if result.get("partial"):
        lines.append("# partial: the run stopped before every backend was measured (rows above are all it has)")
    return "\n".join(lines)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write <out>.json and <out>.txt")
    ap.add_argument("--render", help="print the table of a saved <out>.json (a run cut short) and write <out>.txt")
    ap.add_argument("--model", help="checkpoint directory (default: a random LLaDA-8B-shaped one)")
    ap.add_argument("--context-tokens", type=int, default=32768)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--c1-requests", type=int, default=6)
    ap.add_argument("--c8-requests", type=int, default=16)
    ap.add_argument("--store-gib", type=int, default=50, help="chunk store (in-process: chunk cache), GiB")
    ap.add_argument("--pool-gib", type=int, default=40, help="in-process decode pool, GiB (the cluster's is derived)")
    ap.add_argument("--host-budget-s", type=float, default=60.0, help="time the host-path cluster may take")
    ap.add_argument("--host-c1-requests", type=int, default=2, help="the host path is slow: fewer requests")
    ap.add_argument("--host-c8-requests", type=int, default=8)
    ap.add_argument("--skip-host", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, short documents: checks the script runs")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.render:
        text = render(json.loads(Path(args.render).read_text()))
        print(text)
        Path(args.render.removesuffix(".json") + ".txt").write_text(text + "\n")
        return
    if args.smoke:
        args.context_tokens, args.chunk_size, args.top_k, args.store_gib, args.pool_gib = 1024, 64, 4, 1, 1
        args.c1_requests, args.c8_requests = min(args.c1_requests, 3), min(args.c8_requests, 8)
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (--smoke runs the script on CPU)")
    flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
                     if v not in (None, False))  # fmt: skip
    method = MethodConfig(chunk_size=args.chunk_size, top_k=args.top_k, keep_ratio=1.0)
    sampler = SamplerConfig(gen_length=args.gen_length, block_length=args.gen_length, steps=args.steps)
    result = {
        "command": f"python benchmarks/bench_one_gpu.py {flags}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kind": "cpu smoke: not a GPU result" if args.smoke else "one GPU",
        "machine": {
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "torch": torch.__version__,
            "ray": ray.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },  # fmt: skip
        "model": args.model or ("random tiny llada" if args.smoke else f"random LLaDA-8B shape {LLADA_8B}, bf16"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.model:
            model = args.model
        elif args.smoke:
            model = str(make_tiny_checkpoint(Path(tmp) / "tiny", "llada", seed=1))
        else:
            model = str(make_checkpoint(Path(tmp) / "llada8b"))
        result["checkpoint_s"] = round(time.perf_counter() - t0, 1)
        print(f"checkpoint ready in {result['checkpoint_s']} s", flush=True)
        docs = documents(3, args.context_tokens)
        device = "cpu" if args.smoke else "cuda"
        rows = [measure("in-process", lambda: InProcess(model, method, sampler, device, args), docs, args, None)]
        result["gpu_before_cluster"] = gpu_memory()  # what the actors start beside (their pools derive from it)
        save_partial(args.out, result, rows)
        loopback_only()
        ray.init(
            address="local",
            num_cpus=max(4, os.cpu_count() or 1),
            num_gpus=0 if args.smoke else 1,
            namespace=NAMESPACE,
            include_dashboard=False,
            resources={PREFILL_RESOURCE: 2, DECODE_RESOURCE: 2},
            logging_level="warning",
            _node_ip_address="127.0.0.1",
            runtime_env=with_actor_env(),
        )
        try:
            make_ipc = lambda: Cluster(model, method, sampler, True, args)  # noqa: E731
            rows.append(measure("cluster-ipc", make_ipc, docs, args, None))
            save_partial(args.out, result, rows)
            if not args.skip_host:
                make_host = lambda: Cluster(model, method, sampler, False, args)  # noqa: E731
                rows.append(measure("cluster-host", make_host, docs, args, args.host_budget_s))
        finally:
            ray.shutdown()
    result["rows"] = rows
    text = render(result)
    print(text, flush=True)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        Path(args.out + ".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
