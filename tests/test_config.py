"""Cluster config: YAML loading, CLI overrides, validation errors that name the option; proto/build.py regenerates
the committed code byte for byte."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from pdllm.cluster.config import ClusterConfig, ConfigError, add_arguments

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_dir: /m\nnum_decode_actors: 2\ndecode_gpus_per_actor: 0.5\ntop_k: 4\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--top-k", "6", "--cpus-per-actor", "0.25"])
    cfg = ClusterConfig.from_args(args)
    cfg.validate()
    assert (cfg.model_dir, cfg.num_decode_actors, cfg.decode_gpus_per_actor, cfg.top_k) == ("/m", 2, 0.5, 6)
    assert cfg.cpus_per_actor == 0.25 and cfg.num_prefill_actors == 1  # unset flags keep the file / default value
    assert cfg.method().top_k == 6


@pytest.mark.parametrize(
    "text, message",
    [
        ("model_dir: /m\nnum_decode_actor: 2\n", "unknown cluster option"),
        ("model_dir: /m\ntop_k: many\n", "top_k must be a number"),
        ("model_dir: /m\nchunk_size: 12.5\n", "chunk_size must be an integer"),
        ("- a\n- b\n", "must be a mapping"),
        ("model_dir: [\n", "not valid YAML"),
    ],
)
def test_bad_files_are_rejected_with_the_reason(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        ClusterConfig.from_yaml(path)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_dir": ""}, "model_dir is required"),
        ({"num_prefill_actors": 0}, "num_prefill_actors must be >= 1"),
        ({"decode_gpus_per_actor": 1.5}, "decode_gpus_per_actor must be 0, a fraction"),
        ({"cpus_per_actor": 0}, "cpus_per_actor must be > 0"),
        ({"chunk_size": 8}, "chunk_size must be >= 16"),
        ({"keep_ratio": 0.0}, "keep_ratio must be in"),
        ({"redis_url": "localhost:6379"}, "redis_url must start with"),
        ({"store_capacity_bytes": -1}, "store_capacity_bytes must be >= 0"),
    ],
)
def test_validate_names_the_bad_option(changes, message):
    with pytest.raises(ConfigError, match=message):
        ClusterConfig(model_dir="/m").with_overrides(**changes).validate()


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        ClusterConfig.from_yaml(tmp_path / "absent.yaml")


def test_proto_build_regenerates_the_committed_code(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "proto" / "build.py"), "--out", str(tmp_path)], check=True, timeout=120)
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert "chunk_transfer_pb2.py" in generated and "chunk_transfer_pb2_grpc.py" in generated
    assert len(generated) == 3 * len(list((ROOT / "proto").glob("*.proto")))
    for name in generated:
        assert (tmp_path / name).read_text() == (ROOT / "proto" / name).read_text(), f"{name} is stale: rebuild it"


def test_generated_code_imports_as_pdllm_proto():
    from pdllm.proto import chunk_transfer_pb2, chunk_transfer_pb2_grpc

    assert chunk_transfer_pb2.DESCRIPTOR.package == "pdllm.transfer.v1"
    assert hasattr(chunk_transfer_pb2_grpc, "ChunkTransferStub")
