from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChunkRequest(_message.Message):
    __slots__ = ("chunk_id", "rows")
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    chunk_id: str
    rows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, chunk_id: _Optional[str] = ..., rows: _Optional[_Iterable[int]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("chunks", "max_piece_bytes")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MAX_PIECE_BYTES_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[ChunkRequest]
    max_piece_bytes: int
    def __init__(self, chunks: _Optional[_Iterable[_Union[ChunkRequest, _Mapping]]] = ..., max_piece_bytes: _Optional[int] = ...) -> None: ...

class ChunkPiece(_message.Message):
    __slots__ = ("chunk_id", "seq", "header", "data", "offset", "crc32", "last", "missing")
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    chunk_id: str
    seq: int
    header: bytes
    data: bytes
    offset: int
    crc32: int
    last: bool
    missing: bool
    def __init__(self, chunk_id: _Optional[str] = ..., seq: _Optional[int] = ..., header: _Optional[bytes] = ..., data: _Optional[bytes] = ..., offset: _Optional[int] = ..., crc32: _Optional[int] = ..., last: _Optional[bool] = ..., missing: _Optional[bool] = ...) -> None: ...
