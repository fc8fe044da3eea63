"""Between the wire messages of pdllm.v1 and the plain dicts that backends, the batch store and clients use."""

from __future__ import annotations

from google.protobuf import struct_pb2
from pdllm.proto import pdllm_api_pb2 as pb

PARAM_FIELDS = tuple(f.name for f in pb.GenerationParams.DESCRIPTOR.fields)
STATS_FIELDS = tuple(f.name for f in pb.GenerationStats.DESCRIPTOR.fields if f.name != "extra")
_FLOAT_PARAMS = {"temperature", "threshold", "keep_ratio"}


def params_to_dict(msg: pb.GenerationParams | None) -> dict:
    """Only the fields the caller set: the rest take the server's defaults."""
    if msg is None:
        return {}
    out = {}
    for name in PARAM_FIELDS:
        if msg.HasField(name):
            value = getattr(msg, name)
            out[name] = round(value, 6) if name in _FLOAT_PARAMS else value  # float32 on the wire
    return out


def params_to_proto(params: dict | None) -> pb.GenerationParams:
    params = {k: v for k, v in (params or {}).items() if v is not None}
    unknown = sorted(set(params) - set(PARAM_FIELDS))
    if unknown:
        raise ValueError(f"unknown parameter(s): {', '.join(unknown)}; known: {', '.join(PARAM_FIELDS)}")
    return pb.GenerationParams(**params)


def struct_from_dict(d: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update({k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, list, dict)) or v is None})
    return s


def _ints_back(value):
    """Struct holds every number as a double: counts come back as ints."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _ints_back(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints_back(v) for v in value]
    return value


def struct_to_dict(s: struct_pb2.Struct) -> dict:
    from google.protobuf.json_format import MessageToDict

    return _ints_back(MessageToDict(s))


def stats_to_proto(stats: dict) -> pb.GenerationStats:
    known = {k: stats[k] for k in STATS_FIELDS if stats.get(k) is not None}
    for k in ("steps", "prefill_chunks", "reused_chunks", "selected_chunks"):
        known[k] = int(known.get(k, 0))
    extra = {k: v for k, v in stats.items() if k not in STATS_FIELDS}
    return pb.GenerationStats(**known, extra=struct_from_dict(extra))


def stats_to_dict(msg: pb.GenerationStats) -> dict:
    out = {name: getattr(msg, name) for name in STATS_FIELDS}
    out.update(struct_to_dict(msg.extra))
    return out


def response_to_dict(msg: pb.GenerateResponse) -> dict:
    return {"request_id": msg.request_id, "answer": msg.answer, "stats": stats_to_dict(msg.stats)}


def event_to_proto(request_id: str, event: dict) -> pb.GenerateEvent:
    kind = event["type"]
    fields = {k: v for k, v in event.items() if k != "type"}
    if kind == "queued":
        return pb.GenerateEvent(request_id=request_id, queued=pb.Queued(**fields))
    if kind == "prefill":
        return pb.GenerateEvent(request_id=request_id, prefill=pb.PrefillProgress(**fields))
    if kind == "step":
        return pb.GenerateEvent(request_id=request_id, step=pb.DenoiseStep(**fields))
    raise ValueError(f"unknown event type {kind!r}")


def event_to_dict(msg: pb.GenerateEvent) -> dict:
    kind = msg.WhichOneof("event")
    if kind == "final":
        return {"type": "final", **response_to_dict(msg.final)}
    body = getattr(msg, kind)
    return {
        "type": "step" if kind == "step" else kind,
        **{f.name: getattr(body, f.name) for f in body.DESCRIPTOR.fields},
    }


def batch_status_to_proto(status: dict) -> pb.BatchStatus:
    return pb.BatchStatus(**{f.name: status[f.name] for f in pb.BatchStatus.DESCRIPTOR.fields if f.name in status})


def batch_status_to_dict(msg: pb.BatchStatus) -> dict:
    return {f.name: getattr(msg, f.name) for f in pb.BatchStatus.DESCRIPTOR.fields}


def job_result_to_proto(result: dict) -> pb.JobResult:
    return pb.JobResult(
        id=result["id"],
        state=result["state"],
        answer=result.get("answer") or "",
        stats=stats_to_proto(result.get("stats") or {}),
        error=result.get("error") or "",
        attempts=int(result.get("attempts") or 0),
    )


def job_result_to_dict(msg: pb.JobResult) -> dict:
    out = {"id": msg.id, "state": msg.state, "attempts": msg.attempts}
    if msg.state == "done":
        out["answer"] = msg.answer
        out["stats"] = stats_to_dict(msg.stats)
    if msg.error:
        out["error"] = msg.error
    return out
