"""The hand-written ChunkPiece codec against the generated protobuf class: the same bytes both ways, views not
copies on read, unknown fields skipped, malformed messages refused with PieceDecodeError."""

from __future__ import annotations

import os
import random

import pytest
from pdllm.cluster.kv.piece_codec import PieceDecodeError, decode_piece, encode_piece
from pdllm.proto import chunk_transfer_pb2 as pb


def random_fields(rng: random.Random) -> dict:
    data = [os.urandom(rng.randint(0, 300)) for _ in range(rng.randint(0, 3))]
    return {
        "chunk_id": rng.choice(["", "ab" * 32, "é-chunk"]),
        "seq": rng.choice([0, 1, 127, 128, 2**32 - 1]),
        "header": rng.choice([b"", os.urandom(rng.randint(1, 200))]),
        "data": data,
        "offset": rng.choice([0, 1, 2**40 + 3]),
        "crc32": rng.choice([0, 1, 2**32 - 1]),
        "last": rng.random() < 0.5,
        "missing": rng.random() < 0.2,
    }


@pytest.mark.parametrize("seed", range(40))
def test_encoding_is_what_protobuf_writes_and_reads(seed):
    fields = random_fields(random.Random(seed))
    joined = b"".join(fields["data"])
    ours = encode_piece(**fields)
    theirs = pb.ChunkPiece(**(fields | {"data": joined})).SerializeToString()
    assert ours == theirs  # canonical order, proto3 defaults omitted
    parsed = pb.ChunkPiece.FromString(ours)
    assert (parsed.chunk_id, parsed.seq, parsed.data, parsed.offset) == (
        fields["chunk_id"], fields["seq"], joined, fields["offset"],
    )  # fmt: skip
    piece = decode_piece(theirs)
    assert bytes(piece.data) == joined and piece.header == fields["header"] and piece.crc32 == fields["crc32"]
    assert (piece.chunk_id, piece.seq, piece.offset, piece.last, piece.missing) == (
        fields["chunk_id"], fields["seq"], fields["offset"], fields["last"], fields["missing"],
    )  # fmt: skip


def test_data_is_a_view_into_the_message():
    message = encode_piece("c", data=[b"x" * 1000])
    piece = decode_piece(message)
    assert isinstance(piece.data, memoryview) and piece.data.obj is message


def test_unknown_fields_of_every_wire_type_are_skipped():
    base = encode_piece("c", seq=3, data=[b"abc"], last=True)
    unknown = bytes([9 << 3 | 0, 5, 10 << 3 | 1]) + bytes(8) + bytes([11 << 3 | 2, 2, 1, 2, 12 << 3 | 5]) + bytes(4)
    piece = decode_piece(unknown + base)
    assert (piece.chunk_id, piece.seq, bytes(piece.data), piece.last) == ("c", 3, b"abc", True)


@pytest.mark.parametrize(
    "message, why",
    [
        (bytes([4 << 3 | 2, 10]) + b"short", "past the end"),
        (bytes([2 << 3 | 0, 0x80]), "varint"),
        (bytes([2 << 3 | 0]) + b"\xff" * 11, "varint"),
        (bytes([4 << 3 | 3]), "wire type"),
        (bytes([1 << 3 | 2, 2, 0xC3, 0x28]), "UTF-8"),
        (bytes([9 << 3 | 1, 1, 2]), "past the end"),
    ],
)
def test_malformed_messages_are_refused(message, why):
    with pytest.raises(PieceDecodeError, match=why):
        decode_piece(message)
