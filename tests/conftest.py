"""Shared fixtures: tiny checkpoints written in each family's real layout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `python -m pytest` puts the checkout's root first on sys.path, where the top-level folders kernels/ and proto/
# shadow the PyPI packages of those names (transformers 5.25 imports `kernels`, the Hugging Face kernel hub, with its
# models). The project is installed under pdllm (pdllm.kernels, pdllm.proto): nothing needs the root on the path.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != ROOT]


@pytest.fixture(scope="session")
def tiny_llada(tmp_path_factory):
    from pdllm.models.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llada"), "llada", seed=1)


@pytest.fixture(scope="session")
def tiny_dream(tmp_path_factory):
    from pdllm.models.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_dream"), "dream", seed=2, kv_heads=2)


@pytest.fixture(scope="session")
def short_llada(tmp_path_factory):
    """A tiny LLaDA whose maximum length (256) is below the API's answer limit (1024)."""
    from pdllm.models.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("short_llada"), "llada", seed=3, max_position=256)


@pytest.fixture(scope="session")
def lm(tiny_llada):
    """The tiny LLaDA loaded once, for in-process reference answers (read only: no test may change it)."""
    from pdllm.models.loader import load_model

    return load_model(tiny_llada)


@pytest.fixture(scope="session")
def bundled_lm():
    """The bundled trained model, loaded once (read only)."""
    from pdllm.assets import default_model_dir
    from pdllm.models.loader import load_model

    return load_model(default_model_dir())
