"""What a prefill actor's index writes cost per new document: one round trip per chunk against one per call.

For each document size it times, against a real embedded Valkey on loopback, the index writes of a prefill call:
claim every chunk (one script, as the actor does), store the encoded chunks in the node's `ChunkStore` (register
each entry, its summary included, and unregister what the store evicts), release each claim; either per chunk
(`ChunkStore.put` / `ChunkIndex.release`, the path before 2026-12-06) or for all chunks at once (`put_all` /
`release_all`), into an empty store and into a full one (every chunk stored evicts one). The summary is fp16
[layers, kv heads, head_dim]: the bundled tiny model's shape and LLaDA-8B's (256 KiB a chunk, so larger documents are
bound by bytes, not round trips). Loopback is the floor: a Redis on another machine adds its round-trip time per call.

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
from pdllm.cluster.kv.chunk_store import ChunkStore
from pdllm.cluster.kv.redis_server import EmbeddedRedis

from pdllm.method.chunk_kv import ChunkKV

SHAPES = {"tiny (4 x 2 x 32)": (4, 2, 32), "LLaDA-8B (32 x 32 x 128)": (32, 32, 128)}


def document(n: int, summary_shape: tuple[int, int, int]) -> list[ChunkKV]:
    """`n` chunks with random ids and summaries; K/V are a placeholder row (the index stores only their size)."""
    kv = torch.zeros(1, 1, 1, 1, dtype=torch.float16)
    return [
        ChunkKV(uuid.uuid4().hex * 2, [1], kv, kv, torch.randn(summary_shape).half(), has_bos=True) for _ in range(n)
    ]


def per_chunk(store: ChunkStore, chunks: list[ChunkKV], owner: str) -> None:
    """The path before 2026-12-06: each chunk stored and registered (its evictions unregistered) on its own, each
    claim released on its own."""
    store.index.claim_all([c.chunk_id for c in chunks], owner, 60)
    for c in chunks:
        store.put(c)
    for c in chunks:
        store.index.release(c.chunk_id, owner)


def batched(store: ChunkStore, chunks: list[ChunkKV], owner: str) -> None:
    store.index.claim_all([c.chunk_id for c in chunks], owner, 60)
    store.put_all(chunks)
    store.index.release_all([c.chunk_id for c in chunks], owner)


def timed_ms(index: ChunkIndex, write, n: int, shape, reps: int, full: bool) -> float:
    """Median over `reps` fresh documents (new ids each time, so every write lands on new keys). `full`: the store
    holds exactly one document and already holds one, so every call evicts (and unregisters) as many chunks as it
    stores, as a busy prefill actor's store does."""
    size = sum(c.nbytes() for c in document(n, shape))
    store = ChunkStore(size, index, "prefill-0", "node-a", "127.0.0.1:1")
    if full:
        batched(store, document(n, shape), "warm:0")
    times = []
    for _ in range(reps):
        chunks = document(n, shape)
        t0 = time.perf_counter()
        write(store, chunks, f"prefill-0:{uuid.uuid4().hex[:8]}")
        times.append(1000 * (time.perf_counter() - t0))
        if not full:
            store.clear()
    store.clear()
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
        "| summary shape | store | chunks | per chunk (ms) | one call (ms) | speedup | round trips |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    with EmbeddedRedis() as server:
        index = ChunkIndex(server.client(socket_timeout=30), prefix="bench")
        for name, shape in SHAPES.items():
            for full in (False, True):
                for n in sizes:
                    timed_ms(index, batched, n, shape, 2, full)  # warm: scripts loaded, connection open
                    old = timed_ms(index, per_chunk, n, shape, args.reps, full)
                    new = timed_ms(index, batched, n, shape, args.reps, full)
                    trips = f"{1 + 3 * n} -> 4" if full else f"{1 + 2 * n} -> 3"
                    state = "full" if full else "empty"
                    row = f"| {name} | {state} | {n} | {old:.2f} | {new:.2f} | {old / new:.1f}x | {trips} |"
                    lines.append(row)
                    print(row, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
