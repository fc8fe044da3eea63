"""The cluster's configuration: one flat dataclass, loaded from YAML and overridden by the commands' flags.

Every option is documented here and, line by line, in deploy/config.example.yaml (a test keeps the two equal).
Knobs that only tune the runtime (queue bounds, timeouts, piece sizes) are `ClusterLimits` (cluster/common/limits.py),
set from the YAML's `limits:` mapping (every field of it, listed in the example too).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.kv.collective_group import KV_TRANSPORTS
from pdllm.decode_node.engine import EngineConfig, parse_buckets

from pdllm.errors import PdllmError
from pdllm.method.config import CHUNKINGS, MIN_CHUNK_SIZE, MethodConfig

RAY_LOCAL = "local"


class ConfigError(PdllmError):
    """The cluster configuration is unreadable or an option is out of range."""


@dataclass(frozen=True)
class ClusterConfig:
    # Local model directory in Hugging Face layout; the same path must exist on every node that runs an actor.
    model_dir: str = ""
    # redis:// or rediss:// URL of the chunk index (password in the URL); "": an embedded, persistent Valkey.
    redis_url: str = ""
    # Ray cluster to join: "auto", "host:port", or "local" (a private Ray on this machine, loopback only).
    ray_address: str = RAY_LOCAL
    # Prefill actors and the GPUs each asks for (fractions share a GPU; 0: run on CPU). Each also asks for as many
    # units of the custom resource "prefill_gpu" (at least 0.001), so it only lands on nodes advertising it.
    num_prefill_actors: int = 1
    prefill_gpus_per_actor: float = 0.0
    # Decode actors, GPUs each, custom resource "decode_gpu" (same rules as prefill).
    num_decode_actors: int = 1
    decode_gpus_per_actor: float = 0.0
    # CPU cores Ray reserves for each actor (fractions allowed); also the actor's torch thread count (at least 1).
    cpus_per_actor: float = 1.0
    # Context tokens per chunk (each encoded once as [BOS] + chunk): the unit of reuse and of selection.
    chunk_size: int = 512
    # Where chunks end: "text" (at a sentence, clause or word border in each chunk's last half, so a sentence or a
    # JSON pair is not cut in two) or "fixed" (every chunk_size tokens).
    chunking: str = "text"
    # Chunks each question attends to (top-K by predicted relevance).
    top_k: int = 8
    # Fraction of each selected chunk's tokens kept per layer and KV head, in (0, 1].
    keep_ratio: float = 1.0
    # Bytes of chunk KV each prefill actor keeps before evicting (LRU); 0: derived (GPU: 90% of free memory after
    # the weights; CPU: 2 GiB).
    store_capacity_bytes: int = 0
    # How chunk KV moves from prefill to decode actors: "auto" (NCCL between actors on different GPUs, gRPC or
    # same-node reads otherwise), "grpc" (never NCCL), "gloo" (a gloo group among all actors: CPU clusters, tests).
    # Whatever it says, actors sharing one GPU hand KV over by CUDA IPC (cluster/kv/kv_paths.py chooses per holder).
    kv_transport: str = "auto"
    # Jobs one decode actor batches into each denoising step (continuous batching; more wait in its queue).
    decode_max_batch: int = 32
    # Bytes of the decode actor's resident chunk-KV pool (K+V); 0: derived (GPU: 90% of free memory after the
    # weights less an 8 GiB reserve for activations and graphs; CPU: 1 GiB).
    decode_pool_bytes: int = 0
    # Batch sizes a CUDA graph of the decode step is captured for (a step runs at the smallest bucket that fits).
    decode_graph_buckets: str = "1,2,4,8,16,32,64"
    # Default for requests: keep the question's KV after the first step and recompute only the generated tokens.
    keep_question_kv: bool = False
    # Runtime limits (queue bounds, timeouts, the decode pool's reuse, restarts...): a mapping of ClusterLimits
    # fields; those not given keep their defaults.
    limits: ClusterLimits = field(default_factory=ClusterLimits)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        """Read a flat YAML mapping of option -> value; unknown options are an error (typos must not pass)."""
        path = Path(path).expanduser()
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read cluster config {path}: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"cluster config {path} is not valid YAML: {e}") from e
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"cluster config {path} must be a mapping of option: value, got {type(data).__name__}")
        return cls().with_overrides(**data)

    def with_overrides(self, **values) -> ClusterConfig:
        """A copy with `values` set (None values are ignored, so unset CLI flags keep the file's value)."""
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown cluster option(s): {', '.join(unknown)}; known: {', '.join(known)}")
        changes = {}
        for name, value in values.items():
            if value is None:
                continue
            if name == "limits":
                changes[name] = limits_with(self.limits, value)
            else:
                changes[name] = _coerce(name, known[name].type, value)
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad option."""
        if not isinstance(self.model_dir, str) or not self.model_dir:
            raise ConfigError("model_dir is required: a local model directory (config.json, weights, tokenizer)")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"redis_url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        if not self.ray_address:
            raise ConfigError('ray_address must be "local", "auto" or host:port')
        for name in ("num_prefill_actors", "num_decode_actors"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("prefill_gpus_per_actor", "decode_gpus_per_actor"):
            gpus = getattr(self, name)
            if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
                raise ConfigError(f"{name} must be 0, a fraction in (0, 1], or a whole number, got {gpus}")
        if self.cpus_per_actor <= 0:
            raise ConfigError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        if self.chunk_size < MIN_CHUNK_SIZE:
            raise ConfigError(f"chunk_size must be >= {MIN_CHUNK_SIZE}, got {self.chunk_size}")
        if self.chunking not in CHUNKINGS:
            raise ConfigError(f"chunking must be one of {', '.join(CHUNKINGS)}, got {self.chunking!r}")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ConfigError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.store_capacity_bytes < 0:
            raise ConfigError(f"store_capacity_bytes must be >= 0 (0: derived), got {self.store_capacity_bytes}")
        if self.decode_max_batch < 1:
            raise ConfigError(f"decode_max_batch must be >= 1, got {self.decode_max_batch}")
        if self.decode_pool_bytes < 0:
            raise ConfigError(f"decode_pool_bytes must be >= 0 (0: derived), got {self.decode_pool_bytes}")
        try:
            parse_buckets(self.decode_graph_buckets)
        except ValueError as e:
            raise ConfigError(f"decode_graph_buckets: {e}") from None
        if self.kv_transport not in KV_TRANSPORTS:
            raise ConfigError(f"kv_transport must be one of {', '.join(KV_TRANSPORTS)}, got {self.kv_transport!r}")

    def method(self) -> MethodConfig:
        """The default method parameters of requests that do not set their own."""
        return MethodConfig(
            chunk_size=self.chunk_size,
            chunking=self.chunking,
            top_k=self.top_k,
            keep_ratio=self.keep_ratio,
            keep_question_kv=self.keep_question_kv,
        )

    def engine(self, reuse_fetched: bool = True) -> EngineConfig:
        """The decode actors' engine settings."""
        return EngineConfig(
            max_batch=self.decode_max_batch,
            pool_bytes=self.decode_pool_bytes,
            graph_buckets=parse_buckets(self.decode_graph_buckets),
            keep_unpinned=reuse_fetched,
        )


def limits_with(base: ClusterLimits, values) -> ClusterLimits:
    """`base` with the `limits:` mapping's values set (each coerced to its field's type, then checked), naming a bad
    or unknown key."""
    if isinstance(values, ClusterLimits):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"limits must be a mapping of limit: value, got {type(values).__name__}")
    known = {f.name: f for f in fields(ClusterLimits)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown limit(s): {', '.join(unknown)}; known: {', '.join(known)}")
    changes = {k: _coerce(f"limits.{k}", known[k].type, v) for k, v in values.items()}
    limits = dataclasses.replace(base, **changes)
    try:
        limits.validate()
    except ValueError as e:
        raise ConfigError(f"limits: {e}") from None
    return limits


def _coerce(name: str, annotation: str, value):
    """YAML/CLI value -> the option's type, with a clear error (ints stay ints: 2.0 GPUs may be written as 2)."""
    annotation = str(annotation)
    if annotation.endswith(" | None"):  # an optional setting: null keeps "not set"
        if value is None:
            return None
        annotation = annotation.removesuffix(" | None")
    kind = {"str": str, "int": int, "float": float, "bool": bool}[annotation]
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or (kind is not str and isinstance(value, str)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    return value
