"""Chunk KV <-> bytes: a msgpack header (tokens, layout, dtype, shapes) and the tensors' raw bytes, nothing pickled.

The same layout serves the gRPC transfer (header in the first piece, payload split over pieces) and the index
(a chunk's summary stored as header + bytes).
"""

from __future__ import annotations

import msgpack
import torch
from torch import Tensor

from pdllm.method.chunk_kv import ChunkKV

LAYOUT = "k,v:[layers,kv_heads,rows,head_dim];summary:[summary_layers,kv_heads,head_dim]"
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_bytes(t: Tensor) -> memoryview:
    """The tensor's bytes (CPU, contiguous), without a copy when it already is both."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def tensor_from_bytes(data: bytes | bytearray | memoryview, dtype: str, shape: list[int]) -> Tensor:
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}")
    view = memoryview(data)
    if view.readonly:  # torch needs writable memory: copy once (bytes from msgpack / protobuf)
        view = memoryview(bytearray(view))
    if not view.nbytes:
        return torch.empty(shape, dtype=DTYPES[dtype])
    return torch.frombuffer(view, dtype=torch.uint8).view(DTYPES[dtype]).reshape(shape)


def pack_tensor(t: Tensor) -> bytes:
    """One tensor as msgpack {dtype, shape, data} (the index stores summaries this way)."""
    return msgpack.packb({"dtype": dtype_name(t.dtype), "shape": list(t.shape), "data": bytes(tensor_bytes(t))})


def unpack_tensor(blob: bytes) -> Tensor:
    d = msgpack.unpackb(blob)
    return tensor_from_bytes(d["data"], d["dtype"], d["shape"])


def chunk_parts(chunk: ChunkKV, rows: list[int] | None = None) -> tuple[dict, list[memoryview]]:
    """Header and payload parts (k, v, summary) of a chunk, keeping only token `rows` of K/V when given."""
    k, v = chunk.k, chunk.v
    if rows:
        index = torch.tensor(rows, dtype=torch.long, device=k.device)
        k, v = k.index_select(2, index), v.index_select(2, index)
    parts = [tensor_bytes(t) for t in (k, v, chunk.summary)]
    header = {
        "chunk_id": chunk.chunk_id,
        "tokens": list(chunk.tokens),
        "has_bos": chunk.has_bos,
        "rows": list(rows) if rows else None,
        "layout": LAYOUT,
        "tensors": [[dtype_name(t.dtype), list(t.shape)] for t in (k, v, chunk.summary)],
        "sizes": [p.nbytes for p in parts],
        "total": sum(p.nbytes for p in parts),
    }
    return header, parts


def chunk_from_parts(header: dict, payload: bytes | bytearray | memoryview) -> ChunkKV:
    """Inverse of chunk_parts (payload = the parts concatenated)."""
    if header.get("layout") != LAYOUT:
        raise ValueError(f"unknown chunk KV layout {header.get('layout')!r}")
    if len(payload) != header["total"]:
        cid, total = header["chunk_id"][:12], header["total"]
        raise ValueError(f"chunk {cid}: {len(payload)} payload bytes, the header says {total}")
    view, tensors, offset = memoryview(payload), [], 0
    for (dtype, shape), size in zip(header["tensors"], header["sizes"], strict=True):
        tensors.append(tensor_from_bytes(view[offset : offset + size], dtype, shape))
        offset += size
    k, v, summary = tensors
    return ChunkKV(
        chunk_id=header["chunk_id"], tokens=list(header["tokens"]), k=k, v=v, summary=summary, has_bos=header["has_bos"]
    )
