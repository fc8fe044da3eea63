"""Decode throughput across GPUs: one prefill GPU feeding 1, 2 and 3 decode GPUs (and 2 + 2), chunk KV over NCCL in
one group of up to four ranks, then one decode actor killed mid-batch.

Per configuration, on its own Ray instance and cluster (start_cluster, router, embedded Valkey), same checkpoint:
  warm-up   one question per document, one document at a time: prefills every document (the prefill actors'
            documents/s, from the requests' prefill seconds) and fills the graphs; untimed
  timed     --per-decode requests per decode actor from --concurrency client threads per decode actor, over the
            prefilled documents: output tok/s (generated tokens / wall), p50/p99 latency, fetch time (the decode
            actor's fetch_ms per request), KV paths taken
Then, in the 1 + 3 configuration, two waves of the timed batch again with one decode actor killed while it runs jobs:
every request answered exactly once, the failovers, the paths the survivors fetched over, the group's state after.
Job i is the same (document, question) in every configuration, so answers are compared job by job, each with the
first answer an earlier run gave to it. Scaling: tok/s of n decode actors / (n x tok/s of 1 + 1), from
this run. Prefill against decode: documents/s the prefill GPU encodes against questions/s the decode GPUs answer.

The decode actors keep no fetched KV (--reuse-fetched off): every request moves its top-K chunks over the group.
NVLink multicast stays off everywhere (actor_env(): this process, Ray's job runtime_env, every actor).

    python benchmarks/bench_decode_scaling.py                  # 4 GPUs: results/decode_scaling_<date>_<kind>.*
    python benchmarks/bench_decode_scaling.py --smoke          # CPU, gloo, the bundled model: checks the script

--smoke runs the same code on CPU with kv_transport "gloo", short documents and few requests: its numbers say
nothing about GPUs (the file is named ..._cpu_smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pdllm.cluster.kv.collective_group import actor_env  # noqa: E402

os.environ.update(actor_env())  # before anything in this process can initialise NCCL

import ray  # noqa: E402
import torch  # noqa: E402
from bench_multi_gpu import documents  # noqa: E402
from bench_one_gpu import LLADA_8B, make_checkpoint  # noqa: E402
from pdllm.cluster.bootstrap import DECODE_RESOURCE, NAMESPACE, PREFILL_RESOURCE, loopback_only  # noqa: E402
from pdllm.cluster.common.limits import ClusterLimits  # noqa: E402
from pdllm.cluster.config import ClusterConfig  # noqa: E402
from pdllm.cluster.kv.collective_group import with_actor_env  # noqa: E402
from pdllm.cluster.router.slots import control  # noqa: E402
from pdllm.cluster.runtime import start_cluster  # noqa: E402

from pdllm.assets import default_model_dir  # noqa: E402
from pdllm.method import MethodConfig  # noqa: E402
from pdllm.sampler import SamplerConfig  # noqa: E402

CONFIGS = [(1, 1), (1, 2), (2, 2), (1, 3)]  # (prefill actors, decode actors), one GPU each; the fault run last
CONFIG = re.compile(r"(\d+)p(\d+)d")


def kind_label(smoke: bool) -> str:
    """What the result files are named after: cpu_smoke, or e.g. h200x4 (the GPU model and how many)."""
    if smoke:
        return "cpu_smoke"
    name = torch.cuda.get_device_name(0).lower().replace("nvidia", "").strip().split()[0]
    return f"{name}x{torch.cuda.device_count()}"


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank: with few samples, p99 is the largest, not an interpolation."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def jobs_for(docs: list[str], n: int) -> list[tuple[str, str]]:
    return [(docs[i % len(docs)], f"What does account on line {i * 13 % 200} hold?") for i in range(n)]


def run_jobs(router, jobs, threads: int, method, sampler, on_start=None, timeout_s=None, errors=None):
    """Each job from a pool of `threads` clients: [(job index, seconds, result)] of the answered jobs in job order,
    and the wall time. With `errors` (a dict), a job that fails (or passes `timeout_s`) is recorded there by id."""
    done: list = [None] * len(jobs)

    def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            out = router.generate(*jobs[i], method, sampler, f"job-{i:04d}", timeout_s=timeout_s)
        except Exception as e:
            if errors is None:
                raise
            errors[f"job-{i:04d}"] = f"{type(e).__name__}: {e}"
            return
        done[i] = (i, time.perf_counter() - t0, out)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(one, i) for i in range(len(jobs))]
        if on_start is not None:
            on_start()
        for f in futures:
            f.result()
    return [d for d in done if d is not None], time.perf_counter() - t0


def summary(done: list, wall: float) -> dict:
    lat = [s for _, s, _ in done]
    fetch = [o["stats"]["fetch_ms"] for _, _, o in done if o["stats"].get("fetch_ms") is not None]
    paths: Counter = Counter()
    for _, _, o in done:
        paths.update(o["stats"].get("fetched_paths", {}))
        paths["node"] += o["stats"].get("fetched_same_node", 0)
    tokens = sum(o["stats"]["generated_tokens"] for _, _, o in done)
    return {
        "requests": len(done),
        "seconds": round(wall, 3),
        "output_tok_per_s": round(tokens / wall, 2),
        "requests_per_s": round(len(done) / wall, 3),
        "latency_s": {"p50": round(pct(lat, 0.5), 3), "p99": round(pct(lat, 0.99), 3), "max": round(max(lat), 3)},
        "fetch_ms": {
            "mean": round(statistics.mean(fetch), 2),
            "p50": round(pct(fetch, 0.5), 2),
            "p99": round(pct(fetch, 0.99), 2),
        }
        if fetch
        else None,  # fmt: skip
        "fetched_paths": {k: v for k, v in paths.items() if v},
        "fetched_gb": round(sum(o["stats"].get("fetched_bytes", 0) for _, _, o in done) / 1e9, 3),
        "prefill_chunks": sum(o["stats"].get("prefill_chunks", 0) for _, _, o in done),
        "decode_actors_used": dict(Counter(o["stats"]["decode_actor"] for _, _, o in done)),
        "answers": {f"job-{i:04d}": o["answer"] for i, _, o in done},
    }


def running(handle) -> int:
    try:
        return ray.get(control(handle.status).remote(), timeout=5)["running"]
    except ray.exceptions.RayError:
        return 0


def fault(handle, jobs, threads, method, sampler, wait_s: float, timeout_s: float) -> dict:
    """The timed batch again; decode actor 0 is killed once it runs a job. Every job must come back exactly once
    (each within `timeout_s`: KV falling back to gRPC must not hold the run past the device's limit)."""
    router = handle.router
    victim = router.decode[0]
    killed = threading.Event()

    def kill_when_running() -> None:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not running(victim.handle):
            time.sleep(0.01)
        if running(victim.handle):
            ray.kill(victim.handle, no_restart=True)
            killed.set()

    killer = threading.Thread(target=kill_when_running, name="killer")
    faults_before = dict(router.status()["faults"])
    errors: dict[str, str] = {}
    done, wall = run_jobs(router, jobs, threads, method, sampler, killer.start, timeout_s, errors)
    killer.join()
    row = summary(done, wall) if done else {"requests": 0, "answers": {}}
    ids = Counter(o["stats"]["request_id"] for _, _, o in done)
    faults = router.status()["faults"]
    survivors = [s for s in router.decode if s is not victim]
    status = {s.name: ray.get(s.handle.collective_status.remote(), timeout=30) for s in survivors}
    holders = [ray.get(a.collective_status.remote(), timeout=30) for a in handle.prefill_actors]
    row.update(
        killed=victim.name if killed.is_set() else None,
        errors=errors,
        answered_once=sorted(ids) == sorted(f"job-{i:04d}" for i in range(len(jobs))) and set(ids.values()) == {1},
        failovers=faults["decode_failovers"] - faults_before["decode_failovers"],
        survivors_group={
            n: {k: s[k] for k in ("rank", "broken", "peers_off", "received_bytes")} for n, s in status.items()
        },  # fmt: skip
        holders_group=[{k: h[k] for k in ("rank", "broken", "peers_off", "sent_bytes")} for h in holders],
        rejoin="not run: a killed actor is not restarted and the group is not re-formed (no code for it yet)",
    )
    return row


def configuration(n_prefill: int, n_decode: int, model: str, docs: list[str], args) -> dict:
    name = f"{n_prefill}p{n_decode}d"
    loopback_only()
    ray.init(
        address="local",
        num_cpus=max(4, os.cpu_count() or 1),
        num_gpus=0 if args.smoke else n_prefill + n_decode,
        resources={PREFILL_RESOURCE: n_prefill, DECODE_RESOURCE: n_decode},
        namespace=NAMESPACE,
        include_dashboard=False,
        logging_level="warning",
        _node_ip_address="127.0.0.1",
        runtime_env=with_actor_env(),
    )
    gpus = 0 if args.smoke else 1
    method = MethodConfig(chunk_size=args.chunk_size, top_k=args.top_k, keep_ratio=1.0)
    sampler = SamplerConfig(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps)
    config = ClusterConfig(
        model_dir=model, num_prefill_actors=n_prefill, num_decode_actors=n_decode, prefill_gpus_per_actor=gpus,
        decode_gpus_per_actor=gpus, cpus_per_actor=0.5 if args.smoke else 2, chunk_size=method.chunk_size,
        top_k=method.top_k, keep_ratio=1.0, store_capacity_bytes=int(args.store_gib * (1 << 30)),
        decode_max_batch=args.concurrency, kv_transport="gloo" if args.smoke else "auto",
    )  # fmt: skip
    limits = ClusterLimits(
        decode_reuse_fetched=args.reuse_fetched, call_timeout_s=900, start_timeout_s=900, collective_timeout_s=60,
        fetch_timeout_s=300, max_queued_per_decode_actor=2 * args.concurrency,
    )  # fmt: skip
    row: dict = {"config": name, "prefill_actors": n_prefill, "decode_actors": n_decode}
    t0 = time.perf_counter()
    try:
        with start_cluster(config, limits) as handle:
            row["start_s"] = round(time.perf_counter() - t0, 1)
            spec = handle.collective.spec
            row["group"] = {"backend": spec.backend if spec else None, "ranks": len(spec.members) if spec else 0,
                            "reason": handle.collective.reason}  # fmt: skip
            router = handle.router
            warm, _ = run_jobs(router, [(d, "Which account is on line 3?") for d in docs], 1, method, sampler)
            prefill_s = [o["stats"]["prefill_seconds"] for _, _, o in warm]
            row["prefill_docs_per_s"] = round(n_prefill / statistics.median(prefill_s), 3)
            threads = args.concurrency * n_decode
            jobs = jobs_for(docs, args.per_decode * n_decode)
            row["timed"] = summary(*run_jobs(router, jobs, threads, method, sampler))
            if args.fault and (n_prefill, n_decode) == (1, 3):
                wave = jobs[: 2 * threads]  # two waves of the timed batch
                row["fault"] = fault(handle, wave, threads, method, sampler, 120, args.fault_timeout_s)
    except Exception as e:  # report what ran
        row["error"] = f"{type(e).__name__}: {e}"
    finally:
        ray.shutdown()
    print(f"  {name}: done in {time.perf_counter() - t0:.0f} s" + (f" ({row['error']})" if "error" in row else ""),
          flush=True)  # fmt: skip
    return row


def compare(rows: list[dict]) -> None:
    """Answers job by job against the first answer any earlier run gave to the same job; scaling against the first
    configuration's tok/s per decode actor."""
    base = next((r for r in rows if "timed" in r), None)
    if base is None:
        return
    ref: dict[str, str] = {}
    per_decode = base["timed"]["output_tok_per_s"] / base["decode_actors"]
    for r in rows:
        for key in ("timed", "fault"):
            part = r.get(key)
            if part:
                common = [j for j in part["answers"] if j in ref]
                part["answers_compared"] = len(common)
                part["answers_differ"] = sum(part["answers"][j] != ref[j] for j in common)
                ref.update({j: a for j, a in part["answers"].items() if j not in ref})
        if "timed" in r:
            r["scaling"] = round(r["timed"]["output_tok_per_s"] / (r["decode_actors"] * per_decode), 3)


def render(result: dict) -> str:
    lines = [f"# {result['kind']}", f"# {result['command']}", f"# {result['date']}  {result['machine']}",
             f"# model: {result['model']}", f"# {result['workload']}", "",
             f"{'config':<6} {'group':<9} {'tok/s':>9} {'scaling':>7} {'p50 s':>7} {'p99 s':>7} {'fetch ms':>9} "
             f"{'fetch p99':>9} {'q/s':>7} {'prefill doc/s':>13}  answers differ  paths"]  # fmt: skip
    for r in result["rows"]:
        t = r.get("timed")
        if not t:
            lines.append(f"{r['config']:<6} ERROR {r.get('error')}")
            continue
        g = r["group"]
        f = t["fetch_ms"] or {}
        lines.append(
            f"{r['config']:<6} {str(g['backend']) + '/' + str(g['ranks']):<9} {t['output_tok_per_s']:9.1f} "
            f"{r['scaling']:7.3f} {t['latency_s']['p50']:7.2f} {t['latency_s']['p99']:7.2f} {f.get('mean', 0):9.1f} "
            f"{f.get('p99', 0):9.1f} {t['requests_per_s']:7.2f} {r['prefill_docs_per_s']:13.3f}  "
            f"{t['answers_differ']}/{t['answers_compared']}  {t['fetched_paths']}"
        )
    for r in result["rows"]:
        if "fault" in r:
            f = r["fault"]
            lines.append(
                f"# fault ({r['config']}): killed {f['killed']}; answered exactly once {f['answered_once']} "
                f"({f['requests']} of {f['requests'] + len(f.get('errors', {}))}, errors {f.get('errors')}); "
                f"failovers {f['failovers']}; answers differ {f['answers_differ']}/{f['answers_compared']}; "
                f"paths {f.get('fetched_paths')}; holders {f['holders_group']}; survivors {f['survivors_group']}; "
                f"rejoin: {f['rejoin']}"
            )
        if "error" in r:
            lines.append(f"# {r['config']}: {r['error']}")
    if result.get("partial"):
        lines.append("# partial: the run stopped before every configuration was measured")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, the bundled model, short documents")
    ap.add_argument("--out", help="write <out>.json and <out>.txt (default results/decode_scaling_<date>_<kind>)")
    ap.add_argument("--render", help="print the table of a saved <out>.json (e.g. a run cut short), write <out>.txt")
    ap.add_argument("--model", help="checkpoint directory (default: a random LLaDA-8B-shaped one; smoke: bundled)")
    ap.add_argument("--configs", default=",".join(f"{p}p{d}d" for p, d in CONFIGS), help="e.g. 1p1d,1p3d,2p2d")
    ap.add_argument("--documents", type=int, default=None, help="4 (each 32K document is 16 GiB of KV); smoke 2")
    ap.add_argument("--context-tokens", type=int, default=None, help="32768; smoke 1024")
    ap.add_argument("--chunk-size", type=int, default=None, help="512; smoke 64")
    ap.add_argument("--top-k", type=int, default=None, help="8; smoke 4")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="32; smoke 16")
    ap.add_argument("--concurrency", type=int, default=None, help="client threads per decode actor (32; smoke 2)")
    ap.add_argument("--per-decode", type=int, default=None, help="timed requests per decode actor (96; smoke 4)")
    ap.add_argument("--store-gib", type=float, default=None, help="prefill store capacity (80; smoke 1)")
    ap.add_argument("--reuse-fetched", action="store_true", help="decode actors keep fetched KV (default: refetch)")
    ap.add_argument("--fault-timeout-s", type=float, default=180.0, help="each request's limit in the fault run")
    ap.add_argument("--no-fault", dest="fault", action="store_false", help="skip the killed-decode-actor run")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.render:
        result = json.loads(Path(args.render).read_text())
        compare(result["rows"])
        text = render(result)
        print(text)
        Path(args.render.removesuffix(".json") + ".txt").write_text(text + "\n")
        return
    smoke = args.smoke
    defaults = {"documents": (2, 4), "context_tokens": (1024, 32768), "chunk_size": (64, 512), "top_k": (4, 8),
                "steps": (16, 32), "concurrency": (2, 32), "per_decode": (4, 96), "store_gib": (1, 80)}  # fmt: skip
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if smoke else full)
    configs = [tuple(map(int, m.groups())) for m in map(CONFIG.fullmatch, args.configs.split(",")) if m]
    if len(configs) != len(args.configs.split(",")) or not all(p and d for p, d in configs):
        raise SystemExit(
            f"--configs: a comma-separated list like 1p1d,1p3d,2p2d (prefill p, decode d), got {args.configs!r}"
        )
    need = max(p + d for p, d in configs)
    if not smoke and torch.cuda.device_count() < need:
        raise SystemExit(f"needs {need} GPUs, found {torch.cuda.device_count()}; --smoke runs it on CPU (gloo)")
    kind = kind_label(smoke)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out = args.out or str(Path(__file__).resolve().parent / "results" / f"decode_scaling_{date}_{kind}")
    switches = {"smoke": smoke, "reuse_fetched": args.reuse_fetched, "no_fault": not args.fault}
    flags = " ".join(
        [f"--{k.replace('_', '-')}" for k, on in switches.items() if on]
        + [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if not isinstance(v, bool) and v is not None]
    )
    result = {
        "kind": "cpu smoke (gloo): not a GPU result" if smoke else f"{kind} (NCCL)",
        "command": f"python benchmarks/bench_decode_scaling.py {flags}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "env": {k: os.environ.get(k) for k in actor_env()},
        },  # fmt: skip
        "workload": f"{args.documents} documents of {args.context_tokens} tokens, chunk {args.chunk_size}, "
        f"top-{args.top_k}, {args.gen_length}-token answers (block {args.block_length}, {args.steps} steps), "
        f"{args.concurrency} client threads and {args.per_decode} requests per decode actor, "
        f"fetched KV {'kept' if args.reuse_fetched else 'not kept (every request moves its KV)'}",
    }
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.model:
            model = args.model
        elif smoke:
            model = str(default_model_dir())
        else:
            model = str(make_checkpoint(Path(tmp) / "llada8b"))
        result["model"] = args.model or ("bundled tiny LLaDA" if smoke else f"random LLaDA-8B shape {LLADA_8B}, bf16")
        print(f"checkpoint ready in {time.perf_counter() - t0:.0f} s", flush=True)
        docs = documents(args.documents, args.context_tokens)
        rows = []
        for p, d in configs:
            rows.append(configuration(p, d, model, docs, args))
            compare(rows)
            partial = {**result, "rows": rows, "partial": True}  # what ran so far, if the run is cut short
            Path(out + ".json").write_text(json.dumps(partial, indent=1) + "\n")
    result["rows"] = rows
    text = render(result)
    print(text)
    Path(out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(out + ".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
