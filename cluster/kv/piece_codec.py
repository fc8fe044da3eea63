"""The ChunkPiece message (proto/chunk_transfer.proto) written and read by hand, for the KV transfer's hot path.

Through the generated class a piece's KV bytes are copied twice on each side (joined, then serialized; parsed, then
read out of the message). Here the server writes the message with one join of its small fields and the KV slices,
and the reader takes the KV as a view into the received message. The bytes on the wire are the protobuf encoding,
so the generated class reads what `encode_piece` writes and `decode_piece` reads what the generated class writes.
"""

from __future__ import annotations

from dataclasses import dataclass

# field numbers of ChunkPiece
CHUNK_ID, SEQ, HEADER, DATA, OFFSET, CRC32, LAST, MISSING = range(1, 9)
VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5


class PieceDecodeError(ValueError):
    """The bytes are not a well-formed ChunkPiece message."""


@dataclass
class Piece:
    chunk_id: str = ""
    seq: int = 0
    header: bytes = b""
    data: memoryview = memoryview(b"")
    offset: int = 0
    crc32: int = 0
    last: bool = False
    missing: bool = False


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _int_field(field: int, value: int) -> bytes:
    return _key(field, VARINT) + _varint(value) if value else b""  # proto3: zero is not written


def encode_piece(
    chunk_id: str,
    seq: int = 0,
    header: bytes = b"",
    data: list[bytes | memoryview] | None = None,
    offset: int = 0,
    crc32: int = 0,
    last: bool = False,
    missing: bool = False,
) -> bytes:
    """One ChunkPiece message; `data` is a list of slices sent as one bytes field (joined once, here)."""
    cid = chunk_id.encode()
    parts: list[bytes | memoryview] = [_key(CHUNK_ID, LEN), _varint(len(cid)), cid] if cid else []
    parts.append(_int_field(SEQ, seq))
    if header:
        parts += [_key(HEADER, LEN), _varint(len(header)), header]
    size = sum(memoryview(d).nbytes for d in data or ())
    if size:
        parts += [_key(DATA, LEN), _varint(size), *data]
    parts += [_int_field(OFFSET, offset), _int_field(CRC32, crc32), _int_field(LAST, int(last))]
    parts.append(_int_field(MISSING, int(missing)))
    return b"".join(parts)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise PieceDecodeError("truncated or overlong varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def decode_piece(message: bytes | memoryview) -> Piece:
    """Parse a ChunkPiece; `data` is a view into `message` (no copy). Unknown fields are skipped, as protobuf does."""
    buf, pos, piece = memoryview(message), 0, Piece()
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _read_varint(buf, pos)
            if field == SEQ:
                piece.seq = value & 0xFFFFFFFF
            elif field == OFFSET:
                piece.offset = value
            elif field == CRC32:
                piece.crc32 = value & 0xFFFFFFFF
            elif field == LAST:
                piece.last = bool(value)
            elif field == MISSING:
                piece.missing = bool(value)
        elif wire == LEN:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise PieceDecodeError(f"field {field} runs past the end of the message")
            value_view = buf[pos : pos + size]
            pos += size
            if field == CHUNK_ID:
                try:
                    piece.chunk_id = bytes(value_view).decode()
                except UnicodeDecodeError as e:
                    raise PieceDecodeError("chunk_id is not UTF-8") from e
            elif field == HEADER:
                piece.header = bytes(value_view)
            elif field == DATA:
                piece.data = value_view
        elif wire in (FIXED64, FIXED32):
            pos += 8 if wire == FIXED64 else 4
            if pos > len(buf):
                raise PieceDecodeError(f"field {field} runs past the end of the message")
        else:
            raise PieceDecodeError(f"field {field} has unsupported wire type {wire}")
    return piece
