"""Named settings: `paper` (the authors' best LongBench run with Dream: chunk 1024 with BOS inside it, top-4,
draft scoring, joint selected KV, one 32-token block, threshold 0.9) and `fast` (ours: chunk 512, top-8, summary
scoring, cached chunk KV reused). One table, read by the CLI (`pdllm generate --preset`) and the API (`preset`)."""

from __future__ import annotations

from pdllm.errors import InvalidRequest

PRESETS: dict[str, dict] = {
    "paper": {
        "mode": "sparse",
        "chunk_size": 1024,
        "top_k": 4,
        "keep_ratio": 1.0,
        "scoring": "draft",
        "selected_kv": "joint",
        "gen_length": 32,
        "block_length": 32,
        "steps": 32,
        "threshold": 0.9,
    },
    "fast": {
        "mode": "sparse",
        "chunk_size": 512,
        "top_k": 8,
        "keep_ratio": 1.0,
        "scoring": "summary",
        "selected_kv": "reuse",
        "gen_length": 64,
        "block_length": 32,
        "steps": 64,
        "threshold": None,
    },
}


def preset_params(name: str) -> dict:
    """The parameters of preset `name` (a copy)."""
    if name not in PRESETS:
        raise InvalidRequest(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def describe(name: str) -> str:
    return ", ".join(f"{k}={v}" for k, v in PRESETS[name].items())
