"""What a prefill actor's index writes cost per new document: one round trip per chunk against one per call.

For each document size it times, against a real embedded Valkey on loopback, the writes a prefill call makes after
encoding: claim every chunk (one script, as the actor does), then register each chunk's entry (its summary
included) and release each claim, either per chunk (`ChunkIndex.register` / `release`, the path before
2026-12-06) or for all chunks at once (`register_all` / `release_all`). The summary is fp16 [layers, kv heads,
head_dim]: the bundled tiny model's shape and LLaDA-8B's (256 KiB a chunk, so larger documents are bound by bytes,
not round trips). Loopback is the floor: a Redis on another machine adds its round-trip time per call.

    python benchmarks/bench_index_writes.py --out benchmarks/results/index_writes_<date>_cpu.txt
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from pathlib import Path

import redis
import torch
from pdllm.cluster.kv.chunk_index import ChunkIndex
from pdllm.cluster.kv.redis_server import EmbeddedRedis

from pdllm.method.chunk_kv import ChunkKV

SHAPES = {"tiny (4 x 2 x 32)": (4, 2, 32), "LLaDA-8B (32 x 32 x 128)": (32, 32, 128)}


def document(n: int, summary_shape: tuple[int, int, int]) -> list[ChunkKV]:
    """`n` chunks with random ids and summaries; K/V are a placeholder row (the index stores only their size)."""
    kv = torch.zeros(1, 1, 1, 1, dtype=torch.float16)
    return [
        ChunkKV(uuid.uuid4().hex * 2, [1], kv, kv, torch.randn(summary_shape).half(), has_bos=True) for _ in range(n)
    ]


def per_chunk(index: ChunkIndex, chunks: list[ChunkKV], owner: str) -> None:
    index.claim_all([c.chunk_id for c in chunks], owner, 60)
    for c in chunks:
        index.register(c, "prefill-0", "node-a", "127.0.0.1:1")
    for c in chunks:
        index.release(c.chunk_id, owner)


def batched(index: ChunkIndex, chunks: list[ChunkKV], owner: str) -> None:
    index.claim_all([c.chunk_id for c in chunks], owner, 60)
    index.register_all(chunks, "prefill-0", "node-a", "127.0.0.1:1")
    index.release_all([c.chunk_id for c in chunks], owner)


def timed_ms(index: ChunkIndex, write, n: int, shape, reps: int) -> float:
    """Median over `reps` fresh documents (new ids each time, so every write lands on new keys)."""
    times = []
    for _ in range(reps):
        chunks = document(n, shape)
        t0 = time.perf_counter()
        write(index, chunks, f"prefill-0:{uuid.uuid4().hex[:8]}")
        times.append(1000 * (time.perf_counter() - t0))
        index.r.flushdb()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", default="9,32,128,512", help="chunks per document (comma-separated)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=None, help="also write the table here")
    args = ap.parse_args()
    sizes = [int(x) for x in args.chunks.split(",")]
    lines = [
        "# prefill actor's index writes per new document: claim all, register, release (median of "
        f"{args.reps}; embedded Valkey on loopback)",
        "# command: python benchmarks/bench_index_writes.py" + (f" --out {args.out}" if args.out else ""),
        f"# device: CPU, {os.cpu_count()} cores; redis-py {redis.__version__}",
        "| summary shape | chunks | per chunk (ms) | one call (ms) | speedup | round trips |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    with EmbeddedRedis() as server:
        index = ChunkIndex(server.client(socket_timeout=30), prefix="bench")
        for name, shape in SHAPES.items():
            for n in sizes:
                timed_ms(index, batched, n, shape, 2)  # warm: scripts loaded, connection open
                old = timed_ms(index, per_chunk, n, shape, args.reps)
                new = timed_ms(index, batched, n, shape, args.reps)
                row = f"| {name} | {n} | {old:.2f} | {new:.2f} | {old / new:.1f}x | {1 + 2 * n} -> 3 |"
                lines.append(row)
                print(row, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
