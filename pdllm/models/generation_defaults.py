"""How a model likes to be decoded when a request does not say: `generation_defaults.json` in its directory.

A model trained on short answers loses its way when asked to denoise a longer span than it ever saw (the bundled
tiny model answers a note's code right in a 48-token span and writes noise in a 64-token one), so the answer length,
block length, steps and parallel-decoding threshold a request leaves unset come from the model's own file, as a
Hugging Face checkpoint carries its generation_config.json. Every key is optional; a model without the file decodes
with the built-in defaults, and so does a request that sets any decoding key itself (request_defaults). Batch jobs
take the built-in defaults too: a batch's settings are per job.
"""

from __future__ import annotations

import json
from pathlib import Path

from pdllm.errors import CheckpointError

FILE = "generation_defaults.json"
KEYS = ("gen_length", "block_length", "steps", "threshold")


def generation_defaults(model_dir: str | Path) -> dict:
    """The decoding defaults `model_dir` ships ({} without the file). A file that is not a JSON object of these keys
    is a CheckpointError naming the file and the key: a typo must not silently decode with other settings."""
    path = Path(model_dir).expanduser() / FILE
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} must hold a JSON object of {', '.join(KEYS)}")
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise CheckpointError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    return values


def request_defaults(request: dict, defaults: dict) -> dict:
    """`defaults` (a backend's, its model's decoding settings among them) as `request` takes them. The model's
    decoding settings are one recipe: a request that sets any of them gets none (the built-in defaults fill the
    rest), so a request for 32 tokens is not handed the model's 48-token block, nor its threshold."""
    if any(request.get(k) is not None for k in KEYS):
        return {k: v for k, v in defaults.items() if k not in KEYS}
    return defaults


def write_generation_defaults(model_dir: str | Path, values: dict) -> None:
    """Write the file (training's export: the answer span the model was trained on)."""
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown generation default(s) {', '.join(unknown)}")
    (Path(model_dir) / FILE).write_text(json.dumps(values, indent=1) + "\n")
