"""The model id names the weights' content: chunk ids carry it, so KV of one checkpoint never serves another."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pdllm.models import loader
from pdllm.models.loader import load_model, weight_files


def retrained(src, dst):
    """A copy of the checkpoint at src with other weights of the same names, shapes and dtypes (file sizes equal)."""
    shutil.copytree(src, dst)
    for f in weight_files(dst):
        tensors = load_file(f)
        with safe_open(f, "pt") as fh:
            metadata = fh.metadata()
        new = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(new, f, metadata=metadata)
    return dst


@pytest.mark.parametrize("whole_file_bytes", [loader.WHOLE_FILE_BYTES, 0], ids=["hashed whole", "sampled"])
def test_retrained_weights_of_the_same_shape_get_another_id_and_a_copy_the_same(
    tiny_llada, tmp_path, monkeypatch, whole_file_bytes
):
    monkeypatch.setattr(loader, "WHOLE_FILE_BYTES", whole_file_bytes)
    other = retrained(tiny_llada, tmp_path / "retrained")
    copy = shutil.copytree(tiny_llada, tmp_path / "copy")
    sizes = lambda d: [f.stat().st_size for f in weight_files(d)]  # noqa: E731
    assert sizes(other) == sizes(tiny_llada)  # what the id was made of before: names, sizes, config
    original = load_model(tiny_llada).model_id
    assert load_model(other).model_id != original
    assert load_model(copy).model_id == original  # the directory is not part of it
