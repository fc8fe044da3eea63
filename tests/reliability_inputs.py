"""Reliability, item 7: a seeded generator of bad requests, each with the answers a correct server may give.

Each case says how it travels: `grpc` (a real gRPC channel carrying the case's raw request bytes and metadata),
`h2` (one hand-made HTTP/2 stream: the case's headers and DATA), `tcp` (bytes on a fresh TCP connection, with or
without the HTTP/2 preface first). Categories:
  wrong_types   known protobuf fields carried with the wrong wire type (params as a number, an id as a float...)
  bad_values    well-formed messages with values out of range, unknown names, bad ids, broken batch specs
  huge_fields   fields past the API's limits, messages past gRPC's size limit, oversized metadata
  bad_utf8      text fields holding bytes that are not UTF-8
  undecodable   bytes that are no protobuf message at all (truncated, field 0, wire types 6/7, overlong varints)
  auth          missing, wrong and malformed tokens
  grpc_framing  broken gRPC length prefixes and flags, wrong paths and content types, on a raw HTTP/2 stream
  transport     bytes that are not HTTP/2, and HTTP/2 frames the protocol forbids
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

import reliability_wire as wire
from pdllm.cluster.api.params import ApiLimits
from pdllm.proto import pdllm_api_pb2 as pb

from pdllm.client import batch_request, generate_request

SERVICE = "/pdllm.v1.Pdllm/"
UNARY = ("Generate", "SubmitBatch", "GetBatch", "ListBatches", "CancelBatch", "Health", "ModelInfo")
STREAMING = ("GenerateStream",)
GOOD_PARAMS = {"gen_length": 8, "block_length": 8, "steps": 8}
TRANSPORT_ENDINGS = frozenset({"GOAWAY", "CLOSED", "RST_STREAM"})
GRPC_REFUSALS = frozenset({"INVALID_ARGUMENT", "UNIMPLEMENTED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNAUTHENTICATED"})
CATEGORIES = (
    "wrong_types",
    "bad_values",
    "huge_fields",
    "bad_utf8",
    "undecodable",
    "auth",
    "grpc_framing",
    "transport",
)


@dataclass(frozen=True)
class BadInput:
    category: str
    name: str
    via: str  # grpc | h2 | tcp
    method: str  # method name (grpc, h2)
    payload: bytes  # grpc: request bytes; h2: the DATA frame's body; tcp: bytes sent
    expect: frozenset[str]  # status names (grpc) or connection endings (tcp) a correct server may answer
    auth: str | None = None  # grpc/h2: the authorization header value (None: none sent)
    metadata: tuple[tuple[str, str], ...] = ()  # grpc: extra metadata
    headers: tuple[tuple[str, str], ...] | None = None  # h2: the request headers, replacing the usual ones
    preface: bool = True  # tcp: send the HTTP/2 preface and SETTINGS before the payload
    needle: str = ""  # a phrase the status details must contain (what the server says was wrong)


# -- protobuf by hand ----------------------------------------------------------------------------------------------
def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def encoded(number: int, wire_type: int, rng: random.Random) -> bytes:
    """Field `number` carried as `wire_type`, with a random value of that shape."""
    if wire_type == 0:
        return key(number, 0) + varint(rng.randrange(1 << rng.choice((7, 31, 63))))
    if wire_type == 1:
        return key(number, 1) + rng.randbytes(8)
    if wire_type == 5:
        return key(number, 5) + rng.randbytes(4)
    body = rng.randbytes(rng.randrange(1, 12))
    return key(number, 2) + varint(len(body)) + body


def declared_wire_type(field) -> int:
    t = field.type
    if t in (field.TYPE_DOUBLE, field.TYPE_FIXED64, field.TYPE_SFIXED64):
        return 1
    if t in (field.TYPE_FLOAT, field.TYPE_FIXED32, field.TYPE_SFIXED32):
        return 5
    if t in (field.TYPE_STRING, field.TYPE_BYTES, field.TYPE_MESSAGE):
        return 2
    return 0


# -- the parts every category starts from --------------------------------------------------------------------------
def good_generate(rng: random.Random, **overrides) -> pb.GenerateRequest:
    fields = {
        "context": f"Note {rng.randrange(1000)}: the pass key is {rng.randrange(10**5)}. " * rng.randrange(1, 4),
        "question": "What is the pass key?",
        "params": GOOD_PARAMS,
    }
    fields.update(overrides)
    return generate_request(fields["context"], fields["question"], fields["params"])


def good_batch(rng: random.Random, jobs: list[dict] | None = None, batch_id: str | None = None, **kw):
    jobs = jobs or [{"id": f"j{i}", "context": "The sky is blue.", "question": "Colour?"} for i in range(2)]
    return batch_request(batch_id or f"bad-{rng.randrange(10**9)}", jobs, default_params=GOOD_PARAMS, **kw)


def grpc_case(category: str, name: str, method: str, message: bytes | pb.Message, expect, token: str, **kw):
    raw = message if isinstance(message, bytes) else message.SerializeToString()
    auth = kw.pop("auth", f"Bearer {token}")
    return BadInput(category, name, "grpc", method, raw, frozenset(expect), auth=auth, **kw)


# -- categories ----------------------------------------------------------------------------------------------------
def wrong_types(rng: random.Random, token: str) -> BadInput:
    """A good message plus one known field (top level or inside params / a batch job) with another wire type."""
    shape = rng.choice(("generate", "params", "batch_job", "get_batch"))
    if shape == "get_batch":
        base, desc, wrap = pb.GetBatchRequest(batch_id="b1").SerializeToString(), pb.GetBatchRequest.DESCRIPTOR, None
        method = "GetBatch"
    elif shape == "batch_job":
        base, desc, wrap = good_batch(rng).SerializeToString(), pb.BatchJob.DESCRIPTOR, 2  # jobs = field 2
        method = "SubmitBatch"
    else:
        base = good_generate(rng).SerializeToString()
        desc = pb.GenerateRequest.DESCRIPTOR if shape == "generate" else pb.GenerationParams.DESCRIPTOR
        wrap = None if shape == "generate" else 3  # params = field 3
        method = rng.choice(("Generate", "GenerateStream"))
    field = rng.choice(desc.fields)
    wrong = rng.choice([w for w in (0, 1, 2, 5) if w != declared_wire_type(field)])
    extra = encoded(field.number, wrong, rng)
    if wrap is not None:  # a second sub-message of the same field merges into the first
        extra = key(wrap, 2) + varint(len(extra)) + extra
    name = f"{desc.name}.{field.name} as wire type {wrong}"
    return grpc_case("wrong_types", name, method, base + extra, {"INVALID_ARGUMENT"}, token, needle="wrong type")


BAD_PARAMS = [
    ("gen_length", lambda r: r.choice([0, -r.randrange(1, 1 << 30), 4096 + r.randrange(1 << 20)])),
    ("block_length", lambda r: r.choice([0, -1, 3, 5000])),
    ("steps", lambda r: r.choice([0, -r.randrange(1, 100), 1 << 20])),
    ("temperature", lambda r: r.choice([-0.5, float("nan"), float("inf"), 2.5 + r.random() * 100])),
    ("threshold", lambda r: r.choice([0.0, -0.1, 1.5, float("nan")])),
    ("keep_ratio", lambda r: r.choice([0.0, -1.0, 1.01, float("inf")])),
    ("top_k", lambda r: r.choice([0, -5, 1 << 20])),
    ("chunk_size", lambda r: r.choice([0, -1, 1 << 20])),
    ("mode", lambda r: r.choice(["warp", "", "SPARSE", "vanilla;drop", "\u00e9t\u00e9"])),
    ("remasking", lambda r: r.choice(["sometimes", "LOW_CONFIDENCE", "x" * r.randrange(1, 64)])),
    ("seed", lambda r: -r.randrange(1, 1 << 62)),
]


def bad_values(rng: random.Random, token: str) -> BadInput:
    kind = rng.choice(("param", "param", "param", "model", "request_id", "batch"))
    if kind == "param":
        name, make = rng.choice(BAD_PARAMS)
        value = make(rng)
        params = {**GOOD_PARAMS, name: value}
        if name == "mode" and value == "":  # an empty proto3 string is "unset": make it count
            params[name] = " "
        method = rng.choice(("Generate", "GenerateStream"))
        return grpc_case("bad_values", f"{name}={value!r}", method, good_generate(rng, params=params),
                         {"INVALID_ARGUMENT"}, token)  # fmt: skip
    if kind == "model":
        model = rng.choice(["llada-8b", "gpt", "tiny ", "../tiny"]) + str(rng.randrange(100))
        msg = good_generate(rng)
        msg.model = model
        return grpc_case("bad_values", f"model={model}", "Generate", msg, {"INVALID_ARGUMENT"}, token, needle="model")
    if kind == "request_id":
        rid = rng.choice(["has space", "new\nline", "tab\there", "caf\u00e9", "\x00nul"]) + str(rng.randrange(99))
        msg = good_generate(rng)
        msg.request_id = rid
        return grpc_case("bad_values", f"request_id={rid!r}", "GenerateStream", msg, {"INVALID_ARGUMENT"}, token,
                         needle="request_id")  # fmt: skip
    problem = rng.choice(("batch_id", "job_id", "duplicate", "no_jobs", "doc_ref", "job_param"))
    jobs = [{"id": "j0", "context": "The sky is blue.", "question": "Colour?"}]
    batch_id, documents = None, None
    if problem == "batch_id":
        batch_id = rng.choice(["has space", "-leading", "a/b", "x" * 129, "semi;colon"])
    elif problem == "job_id":
        jobs[0]["id"] = rng.choice(["", " ", "a b", "y" * 200, "\u00fc"])
    elif problem == "duplicate":
        jobs = jobs * 2
    elif problem == "no_jobs":
        msg = good_batch(rng)
        del msg.jobs[:]
        return grpc_case("bad_values", "batch without jobs", "SubmitBatch", msg, {"INVALID_ARGUMENT"}, token)
    elif problem == "doc_ref":
        documents = {"0" * 64: "a document whose sha256 is not its ref"}
    else:
        jobs[0]["params"] = {"steps": 0}
    msg = good_batch(rng, jobs=jobs, batch_id=batch_id, documents=documents)
    return grpc_case("bad_values", f"batch {problem}", "SubmitBatch", msg, {"INVALID_ARGUMENT"}, token)


def huge_fields(rng: random.Random, token: str, limits: ApiLimits, max_message_bytes: int) -> BadInput:
    kind = rng.choice(("context", "question", "model", "mode", "request_id", "batch_id", "message", "metadata"))
    big = rng.randrange(20_000, 200_000)
    msg = good_generate(rng)
    expect, needle, metadata = {"INVALID_ARGUMENT"}, kind, ()
    if kind == "context":
        msg.context = b"c" * (limits.max_context_bytes + rng.randrange(1, 1 << 14))
    elif kind == "question":
        msg.question = b"q" * (limits.max_question_bytes + rng.randrange(1, 1 << 14))
    elif kind == "model":
        msg.model = "m" * big
    elif kind == "mode":
        msg.params.mode = "v" * big
    elif kind == "request_id":
        msg.request_id = "r" * rng.choice([limits.max_request_id_chars + 1, big])
    elif kind == "batch_id":
        return grpc_case("huge_fields", f"batch_id of {big}", "SubmitBatch", good_batch(rng, batch_id="b" * big),
                         expect, token, needle="batch_id")  # fmt: skip
    elif kind == "message":  # past gRPC's own limit: refused before the handler runs
        msg.context = b"x" * (max_message_bytes + rng.randrange(1, 1 << 16))
        expect, needle = {"RESOURCE_EXHAUSTED"}, ""
    else:
        metadata = (("x-padding", "p" * big),)
        expect, needle = {"RESOURCE_EXHAUSTED"}, ""
    method = rng.choice(("Generate", "GenerateStream"))
    return grpc_case("huge_fields", f"{kind} of {big}", method, msg, expect, token, metadata=metadata, needle=needle)


INVALID_UTF8 = [
    lambda r: bytes([r.randrange(0x80, 0xC0)]),  # a lone continuation byte
    lambda r: bytes([r.choice([0xC0, 0xC1]), r.randrange(0x80, 0xC0)]),  # an overlong two-byte form
    lambda r: bytes([r.randrange(0xF5, 0x100)]),  # never valid in UTF-8
    lambda r: bytes([0xED, r.randrange(0xA0, 0xC0), r.randrange(0x80, 0xC0)]),  # an encoded surrogate
    lambda r: bytes([0xE0, r.randrange(0x80, 0xA0), 0x80]),  # an overlong three-byte form
    lambda r: bytes([r.randrange(0xE1, 0xF0), 0x80]),  # a three-byte form cut short
]


def not_utf8(rng: random.Random, text: str) -> bytes:
    raw = text.encode()
    at = rng.randrange(len(raw) + 1)
    return raw[:at] + rng.choice(INVALID_UTF8)(rng) + b" " + raw[at:]


def bad_utf8(rng: random.Random, token: str) -> BadInput:
    where = rng.choice(("context", "question", "batch_question", "batch_document"))
    if where in ("context", "question"):
        msg = good_generate(rng)
        setattr(msg, where, not_utf8(rng, getattr(msg, where).decode()))
        method = rng.choice(("Generate", "GenerateStream"))
        return grpc_case("bad_utf8", where, method, msg, {"INVALID_ARGUMENT"}, token, needle="UTF-8")
    msg = good_batch(rng)
    if where == "batch_question":
        msg.jobs[rng.randrange(len(msg.jobs))].question = not_utf8(rng, "What colour is the sky?")
    else:
        import hashlib

        content = not_utf8(rng, "A shared document about the sky.")
        ref = hashlib.sha256(content).hexdigest()
        msg.documents.append(pb.Document(ref=ref, content=content))
    return grpc_case("bad_utf8", where, "SubmitBatch", msg, {"INVALID_ARGUMENT"}, token, needle="UTF-8")


def undecodable(rng: random.Random, token: str) -> BadInput:
    method = rng.choice(UNARY + STREAMING)
    good = good_generate(rng).SerializeToString()
    kind = rng.choice(("truncated", "field_zero", "wire_type_6_7", "overlong_varint", "length_past_end", "string"))
    if kind == "truncated":  # cut inside the context field's bytes
        raw = good[: rng.randrange(3, 12)]
        method = rng.choice(("Generate", "GenerateStream"))
    elif kind == "field_zero":
        raw = key(0, rng.choice((0, 2))) + rng.randbytes(rng.randrange(0, 64))
    elif kind == "wire_type_6_7":
        raw = key(rng.randrange(1, 20), rng.choice((6, 7))) + rng.randbytes(rng.randrange(0, 64))
    elif kind == "overlong_varint":
        raw = key(rng.randrange(1, 6), 0) + b"\xff" * rng.randrange(10, 40)
    elif kind == "length_past_end":
        body = rng.randbytes(rng.randrange(0, 32))
        raw = key(rng.randrange(1, 6), 2) + varint(len(body) + rng.randrange(1, 1 << 20)) + body
    else:  # a proto3 `string` field (model / request_id / batch_id) that is not UTF-8
        number = rng.choice((4, 5)) if method in ("Generate", "GenerateStream") else 1
        if method in ("Health", "ModelInfo", "ListBatches"):
            method = rng.choice(("GetBatch", "CancelBatch"))
        body = not_utf8(rng, "an-id")
        raw = key(number, 2) + varint(len(body)) + body
    return grpc_case("undecodable", f"{method}: {kind}", method, raw, {"INVALID_ARGUMENT"}, token,
                     needle="is not a valid")  # fmt: skip


def auth(rng: random.Random, token: str) -> BadInput:
    kind = rng.choice(("missing", "wrong", "scheme", "lowercase", "padded", "prefix", "suffix", "empty"))
    value = {
        "missing": None,
        "wrong": "Bearer " + rng.randbytes(rng.randrange(1, 64)).hex(),
        "scheme": rng.choice(("Basic ", "Token ", "")) + token,
        "lowercase": "bearer " + token,
        "padded": "Bearer  " + token,
        "prefix": "Bearer " + token[: rng.randrange(1, len(token))],
        "suffix": "Bearer " + token + rng.choice(("x", "=", "0")),
        "empty": "Bearer ",
    }[kind]
    method = rng.choice(UNARY + STREAMING)
    message = good_generate(rng) if "Generate" in method else b""
    return grpc_case("auth", f"{method}: {kind}", method, message, {"UNAUTHENTICATED"}, token, auth=value)


def grpc_framing(rng: random.Random, token: str) -> BadInput:
    """One raw HTTP/2 stream; a correct server answers each with a non-OK grpc-status and a message. (Two messages
    on a call that takes one are not here: gRPC's Python server reads the first and ignores the rest.)"""
    good = good_generate(rng).SerializeToString()
    kind = rng.choice(
        ("length_long", "length_short", "length_huge", "compressed", "flag_byte", "empty", "short_prefix",
         "unknown_method", "gzip_garbage")
    )  # fmt: skip
    method, body, headers = rng.choice(("Generate", "GenerateStream")), b"", None
    if kind == "length_long":
        body = wire.grpc_message(good, length=len(good) + rng.randrange(1, 1000))
    elif kind == "length_short":
        body = wire.grpc_message(good, length=rng.randrange(1, len(good) - 1))
    elif kind == "length_huge":
        body = wire.grpc_message(good, length=rng.randrange(1 << 27, 1 << 32))
    elif kind == "compressed":
        body = wire.grpc_message(good, compressed=True)
    elif kind == "flag_byte":
        body = bytes([rng.randrange(2, 256)]) + wire.grpc_message(good)[1:]
    elif kind == "short_prefix":
        body = wire.grpc_message(good)[: rng.randrange(1, 5)]
    elif kind == "unknown_method":
        method = rng.choice(("Nope", "generate", "Generate/extra", "GenerateStreams"))
        body = wire.grpc_message(good)
    elif kind == "gzip_garbage":
        body = wire.grpc_message(rng.randbytes(rng.randrange(8, 64)), compressed=True)
        headers = ("grpc-encoding", "gzip")
    return BadInput(
        "grpc_framing",
        f"{method}: {kind}",
        "h2",
        method,
        body,
        GRPC_REFUSALS,
        auth=f"Bearer {token}",
        headers=None if headers is None else (headers,),
    )


def h2_frame_garbage(rng: random.Random) -> tuple[str, bytes]:
    """After a valid preface: one frame the protocol forbids and gRPC's transport refuses. (DATA or RST_STREAM on
    stream 0 and HEADERS on an even stream are forbidden too, but gRPC ignores them and keeps the connection.)"""
    kind = rng.choice(
        ("bad_hpack", "settings_length", "window_update_0", "oversized_frame", "ping_length", "continuation_alone",
         "settings_push_2")
    )  # fmt: skip
    f = wire.frame
    if kind == "bad_hpack":  # indexed field 0 does not exist
        return kind, f(wire.HEADERS, wire.END_HEADERS, 1, b"\x80" + rng.randbytes(rng.randrange(0, 30)))
    if kind == "settings_length":
        return kind, f(wire.SETTINGS, 0, 0, rng.randbytes(rng.choice((1, 5, 7, 11))))
    if kind == "window_update_0":
        return kind, f(wire.WINDOW_UPDATE, 0, 0, struct.pack(">I", 0))
    if kind == "oversized_frame":  # header of a frame longer than the 16 KiB the server allows
        length = rng.randrange(1 << 15, 1 << 24)
        return kind, struct.pack(">I", length)[1:] + bytes([wire.DATA, 0]) + struct.pack(">I", 1)
    if kind == "ping_length":
        return kind, f(wire.PING, 0, 0, rng.randbytes(rng.choice((0, 4, 9, 16))))
    if kind == "continuation_alone":
        return kind, f(wire.CONTINUATION, wire.END_HEADERS, 1, rng.randbytes(8))
    return kind, f(wire.SETTINGS, 0, 0, struct.pack(">HI", 0x2, rng.randrange(2, 1 << 16)))


def transport(rng: random.Random, token: str) -> BadInput:
    kind = rng.choice(("random_bytes", "http1", "tls_hello", "after_preface", "after_preface"))
    if kind == "random_bytes":
        payload = b"\x00" + rng.randbytes(rng.randrange(24, 4096))  # never the start of "PRI * HTTP/2.0"
        return BadInput("transport", kind, "tcp", "", payload, TRANSPORT_ENDINGS, preface=False)
    if kind == "http1":
        path = rng.choice(("/", "/pdllm.v1.Pdllm/Generate", "/metrics"))
        payload = f"{rng.choice(('GET', 'POST'))} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
        return BadInput("transport", kind, "tcp", "", payload, TRANSPORT_ENDINGS, preface=False)
    if kind == "tls_hello":  # a TLS record header and random handshake bytes on the plaintext port
        body = rng.randbytes(rng.randrange(40, 300))
        payload = b"\x16\x03\x01" + struct.pack(">H", len(body)) + body
        return BadInput("transport", kind, "tcp", "", payload, TRANSPORT_ENDINGS, preface=False)
    name, payload = h2_frame_garbage(rng)
    return BadInput("transport", name, "tcp", "", payload, TRANSPORT_ENDINGS, preface=True)


def bad_inputs(seed: int, per_category: int, token: str, limits: ApiLimits, max_message_bytes: int) -> list[BadInput]:
    """`per_category` cases of every category, the same list for the same seed."""
    rng = random.Random(seed)
    makers = {
        "wrong_types": wrong_types,
        "bad_values": bad_values,
        "huge_fields": lambda r, t: huge_fields(r, t, limits, max_message_bytes),
        "bad_utf8": bad_utf8,
        "undecodable": undecodable,
        "auth": auth,
        "grpc_framing": grpc_framing,
        "transport": transport,
    }
    return [makers[c](rng, token) for c in CATEGORIES for _ in range(per_category)]
