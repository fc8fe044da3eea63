"""Bad checkpoints fail with one clear line naming the cause (CLI exit code 2)."""

from __future__ import annotations

import json
import shutil

import pytest

from pdllm.cli import main
from pdllm.errors import CheckpointError
from pdllm.models.loader import load_model


@pytest.fixture
def ckpt(tmp_path, tiny_llada):
    dst = tmp_path / "m"
    shutil.copytree(tiny_llada, dst)
    return dst


def expect(path, fragment):
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_missing_dir(tmp_path):
    expect(tmp_path / "absent", "does not exist")


def test_no_config(ckpt):
    (ckpt / "config.json").unlink()
    expect(ckpt, "no config.json")


def test_corrupt_config(ckpt):
    (ckpt / "config.json").write_text("{not json")
    expect(ckpt, "not valid JSON")


def test_unknown_family(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect(ckpt, "unknown model family 'gpt2'")


def test_missing_config_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["d_model"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect(ckpt, "lacks field 'd_model'")


def test_shape_mismatch(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mlp_hidden_size"] = cfg["mlp_hidden_size"] * 2
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect(ckpt, "has shape")


def test_truncated_weights(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    expect(ckpt, "cannot read weights file")


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    expect(ckpt, "no *.safetensors")


def test_missing_tensor(ckpt):
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / "model.safetensors"))
    del state["model.transformer.blocks.1.up_proj.weight"]
    save_file(state, str(ckpt / "model.safetensors"))
    expect(ckpt, "model.transformer.blocks.1.up_proj.weight")


def test_cli_exit_code_2(ckpt, capsys):
    (ckpt / "config.json").unlink()
    assert main(["generate", "--in-process", "--model", str(ckpt), "--context", "x", "--question", "q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pdllm: error:") and "config.json" in err and len(err.splitlines()) == 1


def test_cli_empty_question_and_long_context(tiny_llada, capsys):
    assert main(["generate", "--in-process", "--model", str(tiny_llada), "--context", "x", "--question", "  "]) == 2
    assert "question is empty" in capsys.readouterr().err
    args = ["generate", "--in-process", "--model", str(tiny_llada), "--question", "q", "--context", "x" * 50]
    assert main([*args, "--max-context-tokens", "10"]) == 2
    assert "more than the configured maximum of 10" in capsys.readouterr().err
