"""Request parameters as one plain dict with documented keys, checked at the edge so backends get sane values.

Keys (all optional in a request; `complete_params` fills the defaults):
  gen_length, block_length, steps (ints), temperature (>= 0), threshold (None or (0, 1]; set: parallel decoding),
  mode (a backend mode), chunk_size, top_k (ints), chunking (text | fixed), keep_ratio ((0, 1]), remasking, seed,
  scoring (summary | draft), selected_kv (reuse | joint), instruction (text kept whole before the context), and
  preset (paper | fast: its values fill every key the request leaves unset, see pdllm.method.presets),
  keep_question_kv (bool).
The same dict is what `GenerationBackend.generate` receives, so a cluster adapter maps it without translation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pdllm.errors import InvalidRequest
from pdllm.method.config import CHUNKINGS, SCORINGS, SELECTED_KVS
from pdllm.models.generation_defaults import request_defaults
from pdllm.observability.counters import count
from pdllm.sampler import SamplerConfig

DEFAULT_PARAMS: dict = {
    "gen_length": 64,
    "block_length": 32,
    "steps": 64,
    "temperature": 0.0,
    "threshold": None,
    "mode": "vanilla",
    "chunk_size": 512,
    "chunking": "text",
    "top_k": 8,
    "keep_ratio": 1.0,
    "remasking": "low_confidence",
    "seed": 0,
    "scoring": "summary",
    "selected_kv": "reuse",
    "instruction": "",
    "preset": None,
    "keep_question_kv": False,
}
PARAM_KEYS = tuple(DEFAULT_PARAMS)


@dataclass(frozen=True)
class ApiLimits:
    """Upper bounds a request may ask for; anything beyond is INVALID_ARGUMENT, not a slow or crashing server."""

    max_context_bytes: int = 8 << 20
    max_question_bytes: int = 16 << 10
    max_gen_length: int = 1024
    max_steps: int = 4096
    max_top_k: int = 1024
    max_chunk_size: int = 8192
    max_temperature: float = 2.0
    max_batch_jobs: int = 100_000
    max_request_id_chars: int = 128
    max_model_length: int | None = None  # the model's maximum sequence length: no answer may be longer
    max_instruction_bytes: int = 64 << 10

    def for_model(self, max_length: int | None) -> ApiLimits:
        """These limits, with answers also bounded by a model's maximum length (None: unknown, no bound)."""
        return self if not max_length else replace(self, max_model_length=int(max_length))


def decode_text(field: str, data: bytes | str, max_bytes: int, allow_empty: bool = False) -> str:
    """UTF-8 bytes from the wire to text, rejecting invalid encodings, empty and oversized values by name."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise InvalidRequest(f"{field} is {len(raw)} bytes, more than the limit of {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{field} is not valid UTF-8 (byte {exc.start})") from None
    if not allow_empty and not text.strip():
        raise InvalidRequest(f"{field} is empty")
    return text


def check_request_id(value: str, limits: ApiLimits) -> str:
    """A client's request id: it is echoed in every event and written into every log line on its way, so it must
    be short and printable (no spaces or control characters that could forge a log line)."""
    if len(value) > limits.max_request_id_chars or not value.isascii() or not value.isprintable() or " " in value:
        raise InvalidRequest(
            f"request_id must be at most {limits.max_request_id_chars} printable ASCII characters without spaces "
            f"(got {len(value)} characters)"
        )
    return value


def _int(params: dict, key: str, lo: int, hi: int) -> int:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequest(f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _float(params: dict, key: str, lo: float, hi: float, open_lo: bool = False) -> float:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"{key} must be a finite number, got {value!r}")
    if value > hi or value < lo or (open_lo and value == lo):
        raise InvalidRequest(f"{key} must be in {'(' if open_lo else '['}{lo}, {hi}], got {value!r}")
    return float(value)


class CheckedParams(dict):
    """Parameters `complete_params` filled in and checked against an entry point's limits (the server's own, or
    a batch's at submission): a backend runs them as they are instead of checking again with other limits."""


def checked_params(params: dict | None, modes: tuple[str, ...], limits: ApiLimits, defaults: dict) -> CheckedParams:
    """`params` as they are when an entry point checked them already, else completed over `defaults` and checked
    (a library caller of a backend)."""
    if isinstance(params, CheckedParams):
        return params
    params = params or {}
    return complete_params({**request_defaults(params, defaults), **params}, modes, limits)


def complete_params(params: dict | None, modes: tuple[str, ...], limits: ApiLimits = ApiLimits()) -> CheckedParams:
    """Defaults filled in, unknown keys and out-of-range values rejected (InvalidRequest names the key)."""
    count("params.complete")
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if unknown:
        raise InvalidRequest(f"unknown parameter(s): {', '.join(unknown)}; known: {', '.join(PARAM_KEYS)}")
    given = {k: v for k, v in params.items() if v is not None}
    preset = {}
    if given.get("preset") is not None:
        from pdllm.method.presets import preset_params

        if not isinstance(given["preset"], str):
            raise InvalidRequest(f"preset must be a name, got {given['preset']!r}")
        preset = preset_params(given["preset"])
        preset = {k: v for k, v in preset.items() if not (k == "mode" and v not in modes)}
    out = {**DEFAULT_PARAMS, **preset, **given}
    _int(out, "gen_length", 1, limits.max_gen_length)
    if limits.max_model_length is not None and out["gen_length"] > limits.max_model_length:
        raise InvalidRequest(
            f"gen_length {out['gen_length']} is more than the model's maximum length of {limits.max_model_length}"
        )
    _int(out, "block_length", 1, limits.max_gen_length)
    _int(out, "steps", 1, limits.max_steps)
    _int(out, "top_k", 1, limits.max_top_k)
    _int(out, "chunk_size", 1, limits.max_chunk_size)
    _int(out, "seed", 0, 2**63 - 1)
    out["temperature"] = _float(out, "temperature", 0.0, limits.max_temperature)
    out["keep_ratio"] = _float(out, "keep_ratio", 0.0, 1.0, open_lo=True)
    if out["threshold"] is not None:
        out["threshold"] = _float(out, "threshold", 0.0, 1.0, open_lo=True)
    for key, choices in (("scoring", SCORINGS), ("selected_kv", SELECTED_KVS), ("chunking", CHUNKINGS)):
        if out[key] not in choices:
            raise InvalidRequest(f"{key} must be one of {', '.join(choices)}, got {out[key]!r}")
    if not isinstance(out["keep_question_kv"], bool):
        raise InvalidRequest(f"keep_question_kv must be true or false, got {out['keep_question_kv']!r}")
    out["instruction"] = decode_text("instruction", out["instruction"], limits.max_instruction_bytes, True)
    if out["mode"] not in modes:
        raise InvalidRequest(f"unknown mode {out['mode']!r}; this server supports {', '.join(modes)}")
    sampler_from_params(out).validate()  # divisibility of gen_length / block_length / steps, remasking
    return CheckedParams(out)


def sampler_from_params(params: dict) -> SamplerConfig:
    return SamplerConfig(
        gen_length=params["gen_length"],
        block_length=params["block_length"],
        steps=params["steps"],
        temperature=params["temperature"],
        remasking=params["remasking"],
        threshold=params["threshold"],
    )
