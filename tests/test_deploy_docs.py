"""docs/deployment.md: its sizing numbers are the ones ModelSpec computes, and what it names exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pdllm.models.spec import ModelSpec
from pdllm.observability import metrics

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "docs" / "deployment.md").read_text()


def spec(layers: int, heads: int, kv_heads: int, hidden: int) -> ModelSpec:
    return ModelSpec(
        family="x", vocab_size=1, hidden_size=hidden, intermediate_size=1, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, rope_theta=1.0, rms_norm_eps=1e-6, max_position=1, mask_token_id=0, bos_token_id=None,
    )  # fmt: skip


LLADA_8B = spec(layers=32, heads=32, kv_heads=32, hidden=4096)
DREAM_7B = spec(layers=28, heads=28, kv_heads=4, hidden=3584)


@pytest.mark.parametrize("name,model", [("LLaDA-8B", LLADA_8B), ("Dream-7B", DREAM_7B)])
def test_sizing_table_matches_model_spec(name, model):
    per_token = model.kv_bytes_per_token(2)
    row = next(line for line in GUIDE.splitlines() if line.startswith(f"| {name} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == [str(model.num_layers), cells[2], str(model.head_dim)]
    assert cells[2].split()[0] == str(model.num_kv_heads)
    assert f"**{per_token:,} B ({per_token // 1024} KiB)**" in cells[4]
    assert cells[5] == f"{512 * per_token // 2**20} MiB"
    gib = 10**6 * per_token / 2**30
    assert cells[6] == (f"{gib:.0f} GiB" if gib > 100 else f"{gib:.1f} GiB")


def test_worked_example_arithmetic():
    chunk = 512 * LLADA_8B.kv_bytes_per_token(2)
    assert "per chunk  = 512 x 524,288 B = 256 MiB" in GUIDE and chunk == 256 * 2**20
    store_gib = round(79.1 - 14.9 - 4 - 7.9, 1)
    assert f"= {store_gib} GiB per prefill GPU" in GUIDE
    chunks = int(store_gib * 2**30 // chunk)
    assert f"= {chunks} chunks = {chunks * 512:,} tokens" in GUIDE
    assert f"4 prefill GPUs: {4 * chunks} chunks, {4 * chunks * 512:,} tokens" in GUIDE
    dream_chunks = int(round(79.1 - 14.2 - 4 - 7.9, 1) * 2**30 // (512 * DREAM_7B.kv_bytes_per_token(2)))
    assert f"{dream_chunks:,} chunks = {dream_chunks * 512:,} tokens" in GUIDE


def test_named_files_and_metrics_exist():
    for path in set(re.findall(r"`(deploy/[\w./-]+)`", GUIDE)):
        assert (ROOT / path).is_file(), f"the guide names {path}, which does not exist"
    names = {f.name for f in metrics.REGISTRY.collect()}
    for name in set(re.findall(r"`(pdllm_[a-z_]+)", GUIDE)):
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert base in names, f"the guide names metric {name}, which metrics.py does not define"


def test_readme_links_the_guide():
    assert "docs/deployment.md" in (ROOT / "README.md").read_text()
