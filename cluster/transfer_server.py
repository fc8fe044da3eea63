"""The ChunkTransfer gRPC service every chunk-store node runs: streams a chunk's KV (whole, or selected token
rows) in pieces below gRPC's message limit, each with a CRC-32 of its bytes; token auth on every call."""

from __future__ import annotations

import zlib
from concurrent import futures

import grpc
import msgpack
from pdllm.cluster.auth import TokenAuthInterceptor
from pdllm.cluster.chunk_store import ChunkStore
from pdllm.cluster.kv_codec import chunk_parts
from pdllm.proto import chunk_transfer_pb2 as pb
from pdllm.proto import chunk_transfer_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 4 << 20  # gRPC's default receive limit; pieces stay below it


class ChunkTransferService(pb_grpc.ChunkTransferServicer):
    def __init__(self, store: ChunkStore, piece_bytes: int = 1 << 20) -> None:
        self.store, self.piece_bytes = store, piece_bytes
        self.served_bytes = 0

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext):
        piece = min(request.max_piece_bytes or self.piece_bytes, MAX_MESSAGE_BYTES - 64 * 1024)
        for req in request.chunks:
            chunk = self.store.get(req.chunk_id)
            if chunk is None:
                yield pb.ChunkPiece(chunk_id=req.chunk_id, missing=True, last=True)
                continue
            rows = list(req.rows)
            if rows and (min(rows) < 0 or max(rows) >= chunk.length):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rows out of range for chunk {req.chunk_id[:12]}")
            header, parts = chunk_parts(chunk, rows or None)
            yield from self._pieces(req.chunk_id, msgpack.packb(header), parts, piece)

    def _pieces(self, cid: str, header: bytes, parts: list[memoryview], piece: int):
        """Pieces of exactly `piece` bytes (the last shorter) cut across the k/v/summary parts without joining them."""
        seq, offset, buf, pending = 0, 0, [], 0
        total = sum(p.nbytes for p in parts)

        def emit(last: bool) -> pb.ChunkPiece:
            nonlocal seq, offset, buf, pending
            data = b"".join(buf)
            msg = pb.ChunkPiece(
                chunk_id=cid,
                seq=seq,
                header=header if seq == 0 else b"",
                data=data,
                offset=offset,
                crc32=zlib.crc32(data),
                last=last,
            )
            seq, offset, buf, pending = seq + 1, offset + len(data), [], 0
            self.served_bytes += len(data)
            return msg

        sent = 0
        for part in parts:
            pos = 0
            while pos < part.nbytes:
                take = min(piece - pending, part.nbytes - pos)
                buf.append(part[pos : pos + take])
                pending, pos, sent = pending + take, pos + take, sent + take
                if pending == piece and sent < total:
                    yield emit(False)
        yield emit(True)


def serve(
    store: ChunkStore, host: str = "127.0.0.1", port: int = 0, token: str | None = None, piece_bytes: int = 1 << 20
) -> tuple[grpc.Server, int]:
    """Start the service on host:port (0: any free port); returns the server and its port."""
    interceptors = [TokenAuthInterceptor(token)] if token else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="chunk-transfer"),
        interceptors=interceptors,
        options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    service = ChunkTransferService(store, piece_bytes)
    pb_grpc.add_ChunkTransferServicer_to_server(service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind the chunk transfer service to {host}:{port}")
    server.start()
    server.service = service  # for stats
    return server, bound
