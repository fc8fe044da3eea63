"""How a decode node gets chunk KV it does not hold: the `KVTransport` interface, and its gRPC implementation.

A transport fetches chunks by (holder address, chunk id); an NCCL transport between GPUs plugs in behind the same
interface. Chunks whose holder no longer has them come back in `missing`, so the caller re-prefills them.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import msgpack
from pdllm.cluster.common.auth import token_metadata
from pdllm.cluster.kv.grpc_bulk import channel_options
from pdllm.cluster.kv.kv_codec import chunk_from_parts
from pdllm.cluster.kv.piece_codec import PieceDecodeError, decode_piece
from pdllm.proto import chunk_transfer_pb2 as pb

from pdllm.method.chunk_kv import ChunkKV

FETCH_METHOD = "/pdllm.transfer.v1.ChunkTransfer/Fetch"


class TransferError(RuntimeError):
    """A stream broke, timed out or carried corrupted data (checksum or size mismatch)."""


@dataclass(frozen=True)
class FetchItem:
    chunk_id: str
    address: str  # host:port of the holder's transfer service
    rows: tuple[int, ...] = ()  # token rows only (empty: whole chunk)


@dataclass
class FetchResult:
    chunks: dict[str, ChunkKV] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # holder did not have them (evicted) or was unreachable
    bytes: int = 0
    paths: dict[str, int] = field(default_factory=dict)  # chunks moved per path ("grpc", "nccl", "gloo", "ipc", ...)
    error: str = ""  # why `missing` could not be had, when the holder failed rather than lacked them


class KVTransport(Protocol):
    def fetch(self, items: list[FetchItem], timeout_s: float) -> FetchResult: ...

    def serves_directly(self, address: str) -> bool:
        """True when this transport reaches the holder at `address` device to device (NCCL), which beats even a
        same-node read through host memory; the decode actor then fetches through it for same-node holders too."""
        ...


class GrpcTransport:
    """KVTransport over the ChunkTransfer gRPC streaming service; one channel per holder address, reused."""

    def __init__(self, token: str | None = None, piece_bytes: int = 1 << 20) -> None:
        self.token, self.piece_bytes = token, piece_bytes
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def _fetch_method(self, address: str) -> grpc.UnaryStreamMultiCallable:
        """ChunkTransfer.Fetch on the holder at `address`, returning each piece as the received bytes."""
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = grpc.insecure_channel(address, options=channel_options())
        return channel.unary_stream(
            FETCH_METHOD, request_serializer=pb.FetchRequest.SerializeToString, response_deserializer=None
        )

    def serves_directly(self, address: str) -> bool:
        return False

    def fetch(self, items: list[FetchItem], timeout_s: float) -> FetchResult:
        result = FetchResult()
        by_address: dict[str, list[FetchItem]] = {}
        for item in items:
            by_address.setdefault(item.address, []).append(item)
        for address, group in by_address.items():
            request = pb.FetchRequest(
                chunks=[pb.ChunkRequest(chunk_id=i.chunk_id, rows=list(i.rows)) for i in group],
                max_piece_bytes=self.piece_bytes,
            )
            try:
                stream = self._fetch_method(address)(request, timeout=timeout_s, metadata=token_metadata(self.token))
                self._collect(stream, result)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:  # the holder is gone: its chunks must be re-prefilled
                    result.missing += [i.chunk_id for i in group if i.chunk_id not in result.chunks]
                    continue
                raise TransferError(f"fetch from {address}: {e.code().name}: {e.details()}") from e
        return result

    @staticmethod
    def _collect(stream, result: FetchResult) -> None:
        """Reassemble pieces into one preallocated buffer per chunk (the one copy of the KV on this side), checking
        order, size and CRC-32."""
        header, payload, expect, filled = None, None, 0, 0
        for message in stream:
            try:
                piece = decode_piece(message)
            except PieceDecodeError as e:
                raise TransferError(f"undecodable piece after {expect} pieces: {e}") from e
            if piece.missing:
                result.missing.append(piece.chunk_id)
                continue
            data = piece.data
            if zlib.crc32(data) != piece.crc32:
                raise TransferError(f"chunk {piece.chunk_id[:12]} piece {piece.seq}: checksum mismatch")
            if piece.seq != expect or piece.offset != filled:
                raise TransferError(f"chunk {piece.chunk_id[:12]}: piece {piece.seq} out of order")
            if piece.seq == 0:
                header = msgpack.unpackb(piece.header)
                payload = bytearray(header["total"])
            if filled + len(data) > len(payload):
                raise TransferError(f"chunk {piece.chunk_id[:12]}: more bytes than its header announced")
            payload[filled : filled + len(data)] = data
            filled += len(data)
            expect += 1
            if piece.last:
                if filled != len(payload):
                    raise TransferError(f"chunk {piece.chunk_id[:12]}: {filled} of {len(payload)} bytes arrived")
                chunk = chunk_from_parts(header, payload)
                result.chunks[chunk.chunk_id] = chunk
                result.bytes += filled
                result.paths["grpc"] = result.paths.get("grpc", 0) + 1
                header, payload, expect, filled = None, None, 0, 0
        if expect:
            raise TransferError("stream ended in the middle of a chunk")

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
