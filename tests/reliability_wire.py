"""Raw HTTP/2 on a TCP socket, for the reliability tests: what no well-behaved gRPC client sends (a stream whose
receive window stays at zero, bytes that are not HTTP/2, gRPC frames with broken length prefixes).

Only what the tests need: frames out (preface, SETTINGS, HEADERS with literal HPACK fields, DATA, WINDOW_UPDATE) and
frame headers in (type, flags, stream); GOAWAY and RST_STREAM error codes are read, and the server's header blocks
are decoded (`HpackDecoder`: static and dynamic tables; gRPC's server sends no Huffman-coded strings, and a block
that has one is reported as such rather than guessed) so a test can read the grpc-status of a raw call.
"""

from __future__ import annotations

import socket
import struct
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
SETTINGS_INITIAL_WINDOW_SIZE = 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream & 0x7FFFFFFF) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out, value = bytearray([first | limit]), value - limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(headers: list[tuple[str, str]]) -> bytes:
    """Header block of 'literal without indexing, new name' fields (no Huffman, no table): always decodable."""
    out = bytearray()
    for name, value in headers:
        n, v = name.encode(), value.encode()
        out += b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v
    return bytes(out)


def grpc_message(payload: bytes, compressed: bool = False, length: int | None = None) -> bytes:
    """A gRPC length-prefixed message; `length` lies about the size when given."""
    return bytes([1 if compressed else 0]) + struct.pack(">I", len(payload) if length is None else length) + payload


def request_headers(address: str, method: str, token: str | None) -> list[tuple[str, str]]:
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", method),
        (":authority", address),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    if token:
        headers.append(("authorization", f"Bearer {token}"))
    return headers


class RawH2:
    """One HTTP/2 connection driven by hand. `window` is the receive window announced for every stream."""

    def __init__(self, address: str, window: int = 65535, timeout_s: float = 10.0, preface: bool = True) -> None:
        host, port = address.rsplit(":", 1)
        self.address = address
        self.sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        self.buf = b""
        self.hpack = HpackDecoder()
        if preface:  # without it, the connection is not HTTP/2 yet (tests of what a server does with other bytes)
            settings = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, window)
            self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings))

    def call(self, method: str, message: bytes, token: str | None, stream: int = 1, end: bool = True) -> None:
        self.send(request_headers(self.address, method, token), message, stream, end)

    def send(self, headers: list[tuple[str, str]], body: bytes, stream: int = 1, end: bool = True) -> None:
        """HEADERS with exactly `headers`, then one DATA frame holding `body` (ending the stream when `end`)."""
        data = frame(DATA, END_STREAM if end else 0, stream, body)
        self.sock.sendall(frame(HEADERS, END_HEADERS, stream, hpack_literal(headers)) + data)

    def read_frames(self, until: float) -> list[tuple[int, int, int, bytes]]:
        """Frames that arrive before `until` (monotonic) or before the server closes; SETTINGS and PING are
        acknowledged as a client must, so the server keeps the connection."""
        frames = []
        while time.monotonic() < until:
            while len(self.buf) >= 9:
                length = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) < 9 + length:
                    break
                kind, flags = self.buf[3], self.buf[4]
                stream = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
                payload, self.buf = self.buf[9 : 9 + length], self.buf[9 + length :]
                frames.append((kind, flags, stream, payload))
                if kind == SETTINGS and not flags & ACK:
                    self.sock.sendall(frame(SETTINGS, ACK, 0))
                elif kind == PING and not flags & ACK:
                    self.sock.sendall(frame(PING, ACK, 0, payload))
                if kind == GOAWAY:
                    return frames
            self.sock.settimeout(max(0.01, until - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            except OSError:  # reset by the server
                frames.append((-1, 0, 0, b""))
                break
            if not data:
                frames.append((-1, 0, 0, b""))  # closed by the server
                break
            self.buf += data
        return frames

    def read_answer(self, stream: int, timeout_s: float) -> list[tuple[int, int, int, bytes]]:
        """Frames until the server ends `stream` (trailers, RST_STREAM) or the connection, or `timeout_s` passes."""
        frames: list[tuple[int, int, int, bytes]] = []
        until = time.monotonic() + timeout_s
        while not answered(frames, stream) and time.monotonic() < until:
            frames += self.read_frames(min(until, time.monotonic() + 0.05))
        return frames

    def headers(self, frames: list[tuple[int, int, int, bytes]], stream: int) -> dict[str, str]:
        """Every header and trailer field the server sent on `stream` (later values win), decoded in order."""
        fields: dict[str, str] = {}
        for block in header_blocks(frames, stream):
            fields.update(self.hpack.decode(block))
        return fields

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def goaway_code(frames: list[tuple[int, int, int, bytes]]) -> int | None:
    for kind, _, _, payload in frames:
        if kind == GOAWAY and len(payload) >= 8:
            return int.from_bytes(payload[4:8], "big")
    return None


def rst_code(frames: list[tuple[int, int, int, bytes]]) -> int | None:
    for kind, _, _, payload in frames:
        if kind == RST_STREAM and len(payload) >= 4:
            return int.from_bytes(payload[:4], "big")
    return None


def closed(frames: list[tuple[int, int, int, bytes]]) -> bool:
    return any(kind in (-1, GOAWAY) for kind, *_ in frames)


# RFC 7541, appendix A
STATIC_TABLE = [
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"), (":path", "/index.html"),
    (":scheme", "http"), (":scheme", "https"), (":status", "200"), (":status", "204"), (":status", "206"),
    (":status", "304"), (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""), ("accept", ""),
    ("access-control-allow-origin", ""), ("age", ""), ("allow", ""), ("authorization", ""), ("cache-control", ""),
    ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""), ("content-length", ""),
    ("content-location", ""), ("content-range", ""), ("content-type", ""), ("cookie", ""), ("date", ""),
    ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""), ("if-match", ""),
    ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""), ("if-unmodified-since", ""),
    ("last-modified", ""), ("link", ""), ("location", ""), ("max-forwards", ""), ("proxy-authenticate", ""),
    ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""), ("retry-after", ""),
    ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""), ("transfer-encoding", ""),
    ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
]  # fmt: skip


class HpackDecoder:
    """One connection's HPACK decoding state (RFC 7541): header blocks in, (name, value) pairs out."""

    def __init__(self, table_size: int = 4096) -> None:
        self.dynamic: list[tuple[str, str]] = []
        self.max_size = table_size

    def _entry(self, index: int) -> tuple[str, str]:
        if 1 <= index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        pos = index - len(STATIC_TABLE) - 1
        if not 0 <= pos < len(self.dynamic):
            raise ValueError(f"HPACK index {index} is in neither table")
        return self.dynamic[pos]

    def _add(self, name: str, value: str) -> None:
        self.dynamic.insert(0, (name, value))
        while sum(32 + len(n) + len(v) for n, v in self.dynamic) > self.max_size:
            self.dynamic.pop()

    @staticmethod
    def _int(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
        limit = (1 << prefix_bits) - 1
        value, pos = block[pos] & limit, pos + 1
        if value < limit:
            return value, pos
        shift = 0
        while True:
            byte, pos = block[pos], pos + 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, pos

    def _string(self, block: bytes, pos: int) -> tuple[str, int]:
        huffman = bool(block[pos] & 0x80)
        length, pos = self._int(block, pos, 7)
        if huffman:
            raise ValueError("Huffman-coded HPACK string: not decoded by this test helper")
        return block[pos : pos + length].decode("utf-8", "replace"), pos + length

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        fields, pos = [], 0
        while pos < len(block):
            byte = block[pos]
            if byte & 0x80:  # indexed field
                index, pos = self._int(block, pos, 7)
                fields.append(self._entry(index))
                continue
            if byte & 0xE0 == 0x20:  # dynamic table size update
                self.max_size, pos = self._int(block, pos, 5)
                continue
            indexing = byte & 0xC0 == 0x40
            index, pos = self._int(block, pos, 6 if indexing else 4)
            if index:
                name = self._entry(index)[0]
            else:
                name, pos = self._string(block, pos)
            value, pos = self._string(block, pos)
            if indexing:
                self._add(name, value)
            fields.append((name, value))
        return fields


def header_blocks(frames: list[tuple[int, int, int, bytes]], stream: int) -> list[bytes]:
    """The complete header blocks the server sent on `stream` (HEADERS plus any CONTINUATION frames)."""
    blocks, current = [], None
    for kind, flags, sid, payload in frames:
        if sid != stream or kind not in (HEADERS, CONTINUATION):
            continue
        current = payload if kind == HEADERS else (current or b"") + payload
        if flags & END_HEADERS:
            blocks.append(current)
            current = None
    return blocks


def answered(frames: list[tuple[int, int, int, bytes]], stream: int) -> bool:
    """The server ended `stream` (trailers, RST_STREAM) or the connection (GOAWAY, close)."""
    for kind, flags, sid, _ in frames:
        if kind in (-1, GOAWAY) or (sid == stream and (kind == RST_STREAM or (kind == HEADERS and flags & END_STREAM))):
            return True
    return False
