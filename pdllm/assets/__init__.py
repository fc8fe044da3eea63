"""Files shipped inside the package: the bundled tiny dLLM and the prose corpus for haystacks."""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_NAME = "pdllm-tiny-llada"


def default_model_dir() -> Path:
    """The bundled model (LLaDA layout, byte tokenizer): what `pdllm generate` loads when no --model is given."""
    return ASSETS_DIR / DEFAULT_MODEL_NAME
