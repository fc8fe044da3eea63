"""Cluster benchmark on CPU: decode throughput with 1, 2 and 4 decode actors (tiny model), and gRPC chunk-transfer
bandwidth on loopback against a raw TCP socket copy of the same bytes, measured in the same run.

Decode scaling: one local cluster (start_cluster: private Ray, embedded Valkey) with 4 decode actors; documents
prefilled once, then for n = 1, 2, 4 a router restricted to the first n decode actors answers a fixed set of
questions from 2n client threads. Linear scaling is capped by the machine's cores (each actor runs one torch thread).
Transfer: a chunk store holding one large chunk is served by the ChunkTransfer gRPC service; GrpcTransport fetches
it whole (pieces, CRC-32 checks, reassembly into tensors). The raw baseline sends the same number of bytes through
one TCP socket on 127.0.0.1 (sendall / recv_into a preallocated buffer), no framing or checks. The gRPC floor
streams the same bytes as ready-made 1 MiB messages through a bare gRPC method with the transfer's channel options
(no codec, checksum or reassembly): what gRPC's own framing costs, which no KV service on gRPC can beat.
Holder and sender run in their own processes (a holder is another actor), the receiver in this one.

    python benchmarks/bench_cluster.py --out benchmarks/results/cluster_<date>_cpu
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import grpc
import torch
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.config import ClusterConfig
from pdllm.cluster.kv.chunk_store import ChunkStore
from pdllm.cluster.kv.grpc_bulk import channel_options, server_options
from pdllm.cluster.kv.transfer_server import serve
from pdllm.cluster.kv.transport import FetchItem, GrpcTransport
from pdllm.cluster.router.router import Router
from pdllm.cluster.runtime import start_cluster

from pdllm.method import MethodConfig
from pdllm.method.chunk_kv import ChunkKV
from pdllm.models.tiny import make_tiny_checkpoint
from pdllm.sampler import SamplerConfig

METHOD = MethodConfig(chunk_size=64, top_k=4, keep_ratio=1.0)
SAMPLER = SamplerConfig(gen_length=32, block_length=32, steps=32)


def docs(n: int) -> list[str]:
    return [" ".join(f"Doc {d} item {i}: value {(d * 97 + i * 31) % 1000}." for i in range(24)) for d in range(n)]


def decode_scaling(model_dir: str, counts: list[int], requests: int) -> list[dict]:
    config = ClusterConfig(
        model_dir=model_dir,
        num_prefill_actors=1,
        num_decode_actors=max(counts),
        cpus_per_actor=0.4,
        chunk_size=METHOD.chunk_size,
        top_k=METHOD.top_k,
        keep_ratio=METHOD.keep_ratio,
    )
    limits = ClusterLimits(call_timeout_s=120)
    handle = start_cluster(config, limits)
    try:
        base = handle.router
        documents = docs(4)
        for d in documents:  # prefill once; every decode actor fetches every chunk once (warm caches)
            for slot in base.decode:
                sub = Router(base.prefill, [slot], base.index, base.tokenizer, base.model_id, METHOD, limits)
                sub.generate(d, "warm up?", METHOD, SAMPLER)
        jobs = [(documents[i % len(documents)], f"What is the value of item {i % 24}?") for i in range(requests)]
        rows = []
        for n in counts:
            router = Router(base.prefill, base.decode[:n], base.index, base.tokenizer, base.model_id, METHOD, limits)
            with ThreadPoolExecutor(max_workers=2 * n) as pool:
                t0 = time.perf_counter()
                outs = list(pool.map(lambda j, r=router: r.generate(j[0], j[1], METHOD, SAMPLER), jobs))
                wall = time.perf_counter() - t0
            assert all(o["stats"]["prefill_chunks"] == 0 for o in outs)
            used = sorted({o["stats"]["decode_actor"] for o in outs})
            rows.append({"decode_actors": n, "requests": requests, "seconds": round(wall, 3),
                         "requests_per_s": round(requests / wall, 2), "actors_used": len(used),
                         "mean_steps": statistics.mean(o["stats"]["steps"] for o in outs)})  # fmt: skip
        for r in rows:
            r["speedup"] = round(r["requests_per_s"] / rows[0]["requests_per_s"], 2)
            r["ideal_within_cores"] = min(r["decode_actors"], os.cpu_count() or 1)
            r["scaling_efficiency"] = round(r["speedup"] / r["ideal_within_cores"], 2)
        return rows
    finally:
        handle.shutdown()


def big_chunk(nbytes: int) -> ChunkKV:
    rows = nbytes // (2 * 32 * 8 * 128 * 2)  # bf16 K and V at 32 layers x 8 KV heads x 128 dims
    g = torch.Generator().manual_seed(0)
    k = torch.randn(32, 8, rows, 128, generator=g).to(torch.bfloat16)
    v = torch.randn(32, 8, rows, 128, generator=g).to(torch.bfloat16)
    return ChunkKV("b" * 64, list(range(rows - 1)), k, v, torch.zeros(2, 8, 128, dtype=torch.float16), True)


def grpc_holder(nbytes: int, piece_bytes: int, ports, stop) -> None:
    """The holder in its own process (as a prefill actor is): a store with one chunk behind the gRPC service."""
    store = ChunkStore(1 << 40, None, "bench", "node", "")
    store.put(big_chunk(nbytes))
    server, port = serve(store, token="t", piece_bytes=piece_bytes)
    ports.put(port)
    stop.wait(600)
    server.stop(grace=None)


def grpc_rate(chunk: ChunkKV, repeats: int, piece_bytes: int, nbytes: int) -> float:
    ctx = mp.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    holder = ctx.Process(target=grpc_holder, args=(nbytes, piece_bytes, ports, stop), daemon=True)
    holder.start()
    transport = GrpcTransport(token="t", piece_bytes=piece_bytes)
    try:
        item = [FetchItem(chunk.chunk_id, f"127.0.0.1:{ports.get(timeout=120)}")]
        got = transport.fetch(item, timeout_s=120).chunks[chunk.chunk_id]
        assert torch.equal(got.k, chunk.k) and torch.equal(got.v, chunk.v)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            transport.fetch(item, timeout_s=120)
            times.append(time.perf_counter() - t0)
        return chunk.nbytes() / statistics.median(times) / 1e9
    finally:
        transport.close()
        stop.set()
        holder.join(30)


def floor_holder(nbytes: int, ports, stop) -> None:
    """A bare gRPC server streaming `nbytes` as prebuilt 1 MiB messages (no protobuf, checksum or store)."""
    payload = os.urandom(1 << 20)

    def stream(request: bytes, context):
        for _ in range(nbytes >> 20):
            yield payload

    method = grpc.unary_stream_rpc_method_handler(stream, request_deserializer=None, response_serializer=None)
    server = grpc.server(ThreadPoolExecutor(max_workers=2), options=server_options())
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Bytes", {"Stream": method}),))
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    stop.wait(600)
    server.stop(grace=None)


def grpc_floor_rate(nbytes: int, repeats: int) -> float:
    ctx = mp.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    holder = ctx.Process(target=floor_holder, args=(nbytes, ports, stop), daemon=True)
    holder.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{ports.get(timeout=120)}", options=channel_options())
    try:
        call = channel.unary_stream("/floor.Bytes/Stream", request_serializer=None, response_deserializer=None)
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            got = sum(len(m) for m in call(b"", timeout=120))
            times.append(time.perf_counter() - t0)
            assert got == nbytes >> 20 << 20
        return (nbytes >> 20 << 20) / statistics.median(times[1:]) / 1e9
    finally:
        channel.close()
        stop.set()
        holder.join(30)


def raw_sender(nbytes: int, repeats: int, ports) -> None:
    payload = memoryview(os.urandom(1 << 20) * (nbytes >> 20))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        ports.put(listener.getsockname()[1])
        conn, _ = listener.accept()
        with conn:
            for _ in range(repeats + 1):
                conn.sendall(payload)
                conn.recv(1)  # the receiver's ack: one copy at a time, like one fetch


def socket_rate(nbytes: int, repeats: int) -> float:
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    sender = ctx.Process(target=raw_sender, args=(nbytes, repeats, ports), daemon=True)
    sender.start()
    buf = bytearray(nbytes >> 20 << 20)
    times = []
    with socket.create_connection(("127.0.0.1", ports.get(timeout=60)), timeout=60) as client:
        view = memoryview(buf)
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            got = 0
            while got < len(buf):
                got += client.recv_into(view[got:], len(buf) - got)
            times.append(time.perf_counter() - t0)
            client.sendall(b"k")
    sender.join(30)
    return len(buf) / statistics.median(times[1:]) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write <out>.json and <out>.txt")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--transfer-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args()
    result = {
        "command": "python benchmarks/bench_cluster.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                     vars(args).items() if v not in (None, False)),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "processor": platform.processor() or platform.machine()},
    }  # fmt: skip
    nbytes = args.transfer_mib << 20
    chunk = big_chunk(nbytes)
    raw = socket_rate(chunk.nbytes() >> 20 << 20, args.repeats)
    floor = grpc_floor_rate(chunk.nbytes(), args.repeats)
    transfer = []
    for piece in (1 << 20, (4 << 20) - (128 << 10)):
        rate = grpc_rate(chunk, args.repeats, piece, nbytes)
        transfer.append({"piece_bytes": piece, "grpc_GBps": round(rate, 3), "raw_socket_GBps": round(raw, 3),
                         "ratio": round(rate / raw, 3)})  # fmt: skip
    result["transfer"] = {"bytes": chunk.nbytes(), "rows": transfer, "grpc_floor_GBps": round(floor, 3),
                          "grpc_floor_ratio": round(floor / raw, 3)}  # fmt: skip
    if not args.skip_decode:
        with tempfile.TemporaryDirectory() as tmp:
            model = make_tiny_checkpoint(Path(tmp) / "tiny", "llada", seed=1)
            result["decode"] = decode_scaling(str(model), [1, 2, 4], args.requests)
    mib = chunk.nbytes() / 2**20
    lines = [f"# {result['command']}", f"# {result['date']}  {result['machine']}", ""]
    lines.append(f"transfer of one {mib:.0f} MiB chunk over loopback (median of {args.repeats})")
    for r in transfer:
        lines.append(
            f"  gRPC pieces {r['piece_bytes']:>8} B: {r['grpc_GBps']:.3f} GB/s   "
            f"raw socket {r['raw_socket_GBps']:.3f} GB/s   ratio {r['ratio']:.2f}   "
            f"of the gRPC floor {r['grpc_GBps'] / floor:.2f}"
        )
    lines.append(f"  gRPC floor (bare 1 MiB messages): {floor:.3f} GB/s   ratio to raw socket {floor / raw:.2f}")
    for r in result.get("decode", []):
        lines.append(
            f"decode actors {r['decode_actors']}: {r['requests_per_s']:6.2f} req/s  speedup {r['speedup']:.2f}  "
            f"ideal (cores {os.cpu_count()}) {r['ideal_within_cores']}  efficiency {r['scaling_efficiency']:.2f}"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(args.out + ".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
