"""Soak of the default deployment: the embedded cluster (private Ray, embedded Valkey, one prefill and one decode
actor, the bundled model, the default ClusterConfig) answers `--rounds` rounds of requests over the same `--docs`
distinct documents; after each round the actors' RSS (VmRSS from /proc, as their status reports it), the prefill
store's and the decode pool's bytes are sampled. Rounds after the first add no document, so a plateau is what a
bounded system shows; the last lines compare the last round's RSS with the second's (the first round fills the
store and the pool) and each actor's plateau (its highest RSS and peak, VmHWM, after round 1) with its bound:
weights + its configured budget (the chunk store's capacity, the decode pool's bytes) + the fixed overhead, which
they measure (the plateau less weights and budget).

    python benchmarks/bench_soak.py                           # 4 rounds x 10 documents of 16K characters
    python benchmarks/bench_soak.py --rounds 5 --docs 50 --chars 16000 --concurrency 8 --out results/soak.txt
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.config import ClusterConfig
from pdllm.cluster.runtime import start_cluster

from pdllm.assets import default_model_dir
from pdllm.method import MethodConfig
from pdllm.sampler import SamplerConfig

MIB = 2**20


def document(k: int, chars: int) -> str:
    out, i = [], 0
    while sum(len(s) + 1 for s in out) < chars:
        out.append(f"Record {i} of file {k}: the code is {1000 + 7 * i + k}.")
        i += 1
    return " ".join(out)


def sample(router) -> dict:
    rows = {a["kind"]: a for a in router.status()["actors"]}
    p, d = rows["prefill"], rows["decode"]
    return {
        "prefill_rss": p["process"]["rss_bytes"],
        "decode_rss": d["process"]["rss_bytes"],
        "prefill_shm": p["process"].get("rss_shmem_bytes") or 0,
        "decode_shm": d["process"].get("rss_shmem_bytes") or 0,
        "prefill_peak": p["process"].get("peak_rss_bytes") or 0,
        "decode_peak": d["process"].get("peak_rss_bytes") or 0,
        "store": p.get("used_bytes", 0),
        "pool": d.get("cache_bytes", 0),
        "store_capacity": p.get("capacity_bytes", 0),
        "pool_capacity": d.get("engine", {}).get("pool", {}).get("bytes", 0),
    }


def weights_bytes(model_dir: str) -> int:
    """Bytes of the model's weight files (what every actor loads)."""
    return sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.suffix in (".safetensors", ".bin", ".pt"))


def bounds(samples: list[dict], weights: int, start: dict) -> list[str]:
    """Each actor's plateau (highest RSS and peak after round 1) against weights + its budget: the overhead."""
    later = samples[1:] or samples
    out = []
    for role, budget_key, used_key in (("prefill", "store_capacity", "store"), ("decode", "pool_capacity", "pool")):
        top = max(s[f"{role}_rss"] for s in later)
        peak = max(s[f"{role}_peak"] for s in later)
        budget = later[-1][budget_key]
        out.append(
            f"{role}: plateau RSS {top / MIB:.0f} MiB (peak {peak / MIB:.0f}); weights {weights / MIB:.1f} + "
            f"{budget_key.replace('_', ' ')} {budget / MIB:.0f} MiB (used {later[-1][used_key] / MIB:.0f}) -> "
            f"overhead {(top - weights - budget) / MIB:.0f} MiB at the plateau, {(peak - weights - budget) / MIB:.0f} "
            f"at the peak; after start {start[f'{role}_rss'] / MIB:.0f} MiB"
        )
    return out


def row(name: str, reqs: int, errors: int, seconds: float, s: dict) -> str:
    return (f"{name:>5} {reqs:>5} {errors:>6} {seconds:>7.1f} {s['prefill_rss'] / MIB:>16.0f} "
            f"{s['prefill_shm'] / MIB:>8.0f} {s['decode_rss'] / MIB:>15.0f} {s['decode_shm'] / MIB:>8.0f} "
            f"{s['store'] / MIB:>10.1f} {s['pool'] / MIB:>9.1f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--docs", type=int, default=10)
    ap.add_argument("--chars", type=int, default=16000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--gen-length", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    docs = [document(k, args.chars) for k in range(args.docs)]
    sampler = SamplerConfig(gen_length=args.gen_length, block_length=args.gen_length, steps=args.steps)
    config = ClusterConfig(model_dir=str(default_model_dir()))
    lines = [
        f"bench_soak {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, CPU, python "
        f"{platform.python_version()}; {args.rounds} rounds x {args.docs} documents of {args.chars} chars, "
        f"concurrency {args.concurrency}, gen {args.gen_length}/{args.steps} steps; default ClusterConfig",
        "command: " + shlex.join(["python", *sys.argv]),
        f"{'round':>5} {'reqs':>5} {'errors':>6} {'s':>7} {'prefill RSS MiB':>16} {'(shmem)':>8} "
        f"{'decode RSS MiB':>15} {'(shmem)':>8} {'store MiB':>10} {'pool MiB':>9}",
    ]
    print(lines[0], flush=True)
    t_start = time.perf_counter()
    with start_cluster(config, ClusterLimits(log_level="WARNING")) as handle:
        router, method = handle.router, MethodConfig(**vars(config.method()))
        start = sample(router)
        print(f"after start: prefill {start['prefill_rss'] / MIB:.0f} MiB, decode {start['decode_rss'] / MIB:.0f} MiB")
        lines.append(row("start", 0, 0, 0.0, start))
        samples = []

        def ask(k: int, r: int) -> bool:
            try:
                router.generate(docs[k], f"What is the code of record {(k + r) % 20}?", method, sampler)
                return True
            except Exception as e:  # counted, and the soak goes on
                print(f"round {r} document {k}: {type(e).__name__}: {e}", flush=True)
                return False

        with ThreadPoolExecutor(args.concurrency) as pool:
            for r in range(args.rounds):
                t0 = time.perf_counter()
                ok = list(pool.map(lambda k, r=r: ask(k, r), range(args.docs)))
                s = sample(router)
                samples.append(s)
                line = row(str(r + 1), len(ok), ok.count(False), time.perf_counter() - t0, s)
                lines.append(line)
                print(line, flush=True)
    if len(samples) >= 2:
        k = 1 if len(samples) > 2 else 0  # the first round fills the store and the pool
        base, last = samples[k], samples[-1]
        grow = {role: (last[f"{role}_rss"] - base[f"{role}_rss"]) / MIB for role in ("prefill", "decode")}
        lines.append(
            f"last round vs round {k + 1}: prefill {grow['prefill']:+.0f} MiB, decode {grow['decode']:+.0f} MiB; "
            f"total {time.perf_counter() - t_start:.0f} s"
        )
        lines.extend(bounds(samples, weights_bytes(config.model_dir), start))
        print("\n".join(lines[-3:]))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
