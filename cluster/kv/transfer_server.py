"""The ChunkTransfer gRPC service every chunk-store node runs: streams a chunk's KV (whole, or selected token
rows) in pieces below gRPC's message limit, each with a CRC-32 of its bytes; token auth on every call.

`TransferFault` is fault injection on the real stream (operators' drills and the reliability tests): the next
`count` fetches break after `after_pieces` pieces: the stream ends early (truncate), fails with INTERNAL (abort),
carries one flipped byte under the original CRC (corrupt), or stalls for `stall_s` (past the reader's deadline).
"""

from __future__ import annotations

import threading
import time
import zlib
from concurrent import futures
from dataclasses import dataclass

import grpc
import msgpack
from pdllm.cluster.common.auth import TokenAuthInterceptor
from pdllm.cluster.kv.chunk_store import ChunkStore
from pdllm.cluster.kv.grpc_bulk import MAX_MESSAGE_BYTES, server_options
from pdllm.cluster.kv.kv_codec import chunk_parts
from pdllm.cluster.kv.piece_codec import encode_piece
from pdllm.proto import chunk_transfer_pb2 as pb
from pdllm.proto import chunk_transfer_pb2_grpc as pb_grpc

SERVICE = "pdllm.transfer.v1.ChunkTransfer"
FAULT_KINDS = ("truncate", "abort", "corrupt", "stall")


@dataclass
class TransferFault:
    kind: str
    count: int = 1  # fetch streams it breaks, then it is spent
    after_pieces: int = 1  # pieces sent intact first (across the stream's chunks)
    stall_s: float = 5.0  # stall: how long the stream goes silent

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {', '.join(FAULT_KINDS)}, got {self.kind!r}")
        if self.count < 1 or self.after_pieces < 0 or self.stall_s < 0:
            raise ValueError("count must be >= 1, after_pieces >= 0, stall_s >= 0")


class ChunkTransferService(pb_grpc.ChunkTransferServicer):
    def __init__(self, store: ChunkStore, piece_bytes: int = 1 << 20) -> None:
        self.store, self.piece_bytes = store, piece_bytes
        self.served_bytes = 0
        self.active_streams = 0  # fetches in progress (each holds references to the chunks it streams)
        self.faults_fired = 0
        self._fault: TransferFault | None = None
        self._lock = threading.Lock()

    def inject(self, fault: TransferFault | None) -> None:
        """Break the next `fault.count` fetches (None: clear)."""
        with self._lock:
            self._fault = fault

    def _take_fault(self) -> TransferFault | None:
        with self._lock:
            fault = self._fault
            if fault is None:
                return None
            fault.count -= 1
            if fault.count <= 0:
                self._fault = None
            self.faults_fired += 1
            return fault

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext):
        """Yields encoded ChunkPiece messages (bytes: the method is registered without a response serializer)."""
        piece = min(request.max_piece_bytes or self.piece_bytes, MAX_MESSAGE_BYTES - 64 * 1024)
        fault, sent = self._take_fault(), 0
        with self._lock:
            self.active_streams += 1
        try:
            for req in request.chunks:
                chunk = self.store.get(req.chunk_id)
                if chunk is None:
                    yield encode_piece(req.chunk_id, missing=True, last=True)
                    continue
                rows = list(req.rows)
                if rows and (min(rows) < 0 or max(rows) >= chunk.length):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rows out of range for chunk {req.chunk_id[:12]}")
                header, parts = chunk_parts(chunk, rows or None)
                for fields in self._pieces(req.chunk_id, msgpack.packb(header), parts, piece):
                    if fault is not None and sent == fault.after_pieces:
                        fields = _apply(fault, fields, context)
                        fault = None
                        if fields is None:
                            return
                    sent += 1
                    yield encode_piece(**fields)
        finally:
            with self._lock:
                self.active_streams -= 1

    def _pieces(self, cid: str, header: bytes, parts: list[memoryview], piece: int):
        """encode_piece arguments of pieces of exactly `piece` bytes (the last shorter), cut across the k/v/summary
        parts without joining them: the slices are joined once, into the message itself."""
        seq, offset, buf, pending, crc = 0, 0, [], 0, 0
        total = sum(p.nbytes for p in parts)

        def emit(last: bool) -> dict:
            nonlocal seq, offset, buf, pending, crc
            fields = {"chunk_id": cid, "seq": seq, "header": header if seq == 0 else b"", "data": buf}
            fields |= {"offset": offset, "crc32": crc, "last": last}
            self.served_bytes += pending
            seq, offset, buf, pending, crc = seq + 1, offset + pending, [], 0, 0
            return fields

        sent = 0
        for part in parts:
            pos = 0
            while pos < part.nbytes:
                take = min(piece - pending, part.nbytes - pos)
                view = part[pos : pos + take]
                buf.append(view)
                crc = zlib.crc32(view, crc)
                pending, pos, sent = pending + take, pos + take, sent + take
                if pending == piece and sent < total:
                    yield emit(False)
        yield emit(True)


def _apply(fault: TransferFault, fields: dict, context: grpc.ServicerContext) -> dict | None:
    """The injected fault at this piece (its encode_piece arguments): None ends the stream here, else the piece."""
    if fault.kind == "truncate":
        return None
    if fault.kind == "abort":
        context.abort(grpc.StatusCode.INTERNAL, "injected transfer fault: stream aborted mid-chunk")
    if fault.kind == "corrupt" and fields["data"]:
        data = bytearray(b"".join(fields["data"]))
        data[len(data) // 2] ^= 0xFF
        return fields | {"data": [bytes(data)]}  # the CRC still describes the original bytes
    if fault.kind == "stall":
        until = time.monotonic() + fault.stall_s
        while time.monotonic() < until and context.is_active():
            time.sleep(0.05)
    return fields


def serve(
    store: ChunkStore, host: str = "127.0.0.1", port: int = 0, token: str | None = None, piece_bytes: int = 1 << 20
) -> tuple[grpc.Server, int]:
    """Start the service on host:port (0: any free port); returns the server and its port."""
    interceptors = [TokenAuthInterceptor(token)] if token else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="chunk-transfer"),
        interceptors=interceptors,
        options=server_options(),
    )
    service = ChunkTransferService(store, piece_bytes)
    fetch = grpc.unary_stream_rpc_method_handler(
        service.Fetch, request_deserializer=pb.FetchRequest.FromString, response_serializer=None
    )  # pieces leave as the bytes encode_piece wrote
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Fetch": fetch}),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind the chunk transfer service to {host}:{port}")
    server.start()
    server.service = service  # for stats
    return server, bound
