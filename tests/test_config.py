"""Cluster config: YAML loading (its `limits:` too), overrides, validation errors that name the option;
proto/build.py regenerates the committed code byte for byte."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.config import ClusterConfig, ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_dir: /m\nnum_decode_actors: 2\ndecode_gpus_per_actor: 0.5\ntop_k: 4\n")
    cfg = ClusterConfig.from_yaml(path).with_overrides(top_k=6, cpus_per_actor=0.25, chunk_size=None)
    cfg.validate()
    assert (cfg.model_dir, cfg.num_decode_actors, cfg.decode_gpus_per_actor, cfg.top_k) == ("/m", 2, 0.5, 6)
    assert cfg.cpus_per_actor == 0.25 and cfg.num_prefill_actors == 1  # unset values keep the file / default value
    assert cfg.method().top_k == 6 and cfg.chunk_size == 512


def test_every_limit_is_set_from_the_yaml(tmp_path):
    """The `limits:` mapping reaches ClusterLimits field by field, coerced to each field's type; the rest keep
    their defaults; an override of one limit keeps the file's others."""

    def changed(default):
        if default is None:  # an optional fraction
            return 0.5
        if isinstance(default, bool):
            return not default
        return f"x{default}" if isinstance(default, str) else default * 2 + 1

    values = {f.name: changed(getattr(ClusterLimits(), f.name)) for f in dataclasses.fields(ClusterLimits)}
    values.update(log_level="DEBUG", transfer_piece_bytes=2 << 20, ipc_lease_s=5, actor_memory_limit_bytes=1 << 30)
    path = tmp_path / "limits.yaml"
    path.write_text(yaml.safe_dump({"model_dir": "/m", "limits": values}))
    cfg = ClusterConfig.from_yaml(path)
    assert dataclasses.asdict(cfg.limits) == values
    again = cfg.with_overrides(limits={"call_timeout_s": 7.5})
    assert again.limits.call_timeout_s == 7.5 and again.limits.claim_ttl_s == values["claim_ttl_s"]


@pytest.mark.parametrize(
    "limits, message",
    [
        ({"call_timeout": 5}, "unknown limit"),
        ({"claim_ttl_s": "long"}, "limits.claim_ttl_s must be a number"),
        ({"max_queued_per_decode_actor": 0}, "limits: max_queued_per_decode_actor must be >= 1"),
        ([1, 2], "limits must be a mapping"),
    ],
)
def test_bad_limits_are_rejected_naming_the_limit(tmp_path, limits, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model_dir": "/m", "limits": limits}))
    with pytest.raises(ConfigError, match=message):
        ClusterConfig.from_yaml(path)


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
        ({"chunking": "sentences"}, "chunking must be one of text, fixed"),
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
