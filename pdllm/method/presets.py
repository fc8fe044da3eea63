"""Named settings: `paper` (the authors' best LongBench run with Dream: fixed chunks of 1024 with BOS inside them,
top-4, draft scoring, joint selected KV, one 32-token block, threshold 0.9) and `fast` (ours: chunks of up to 512
ending at text borders, top-8, summary scoring, cached chunk KV reused). One table, read by the CLI (`pdllm generate
--preset`) and the API (`preset`)."""

from __future__ import annotations

from pdllm.errors import InvalidRequest

PRESETS: dict[str, dict] = {
    "paper": {
        "mode": "sparse",
        "chunk_size": 1024,
        "chunking": "fixed",
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
        "chunking": "text",
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
