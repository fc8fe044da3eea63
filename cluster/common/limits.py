"""Runtime limits of the cluster: queue bounds, concurrency, timeouts, transfer piece size.

Kept apart from ClusterConfig (the deployment's YAML schema): these tune behaviour, not what runs where, and their
defaults suit every deployment the project targets.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClusterLimits:
    max_queued_per_decode_actor: int = 64  # jobs sent to one decode actor and not finished; beyond: ClusterBusy
    max_queued_per_prefill_actor: int = 16  # prefill calls in flight per prefill actor; beyond: ClusterBusy
    prefill_batch_size: int = 8  # chunks encoded per forward pass
    claim_ttl_s: float = 60.0  # a prefill claim expires after this, so a dead claimant blocks no one for longer
    call_timeout_s: float = 300.0  # every Ray call, gRPC fetch and wait for another actor's prefill
    redis_timeout_s: float = 5.0  # socket timeout of every Redis command
    transfer_piece_bytes: int = 1 << 20  # bytes of KV per gRPC message (gRPC's default limit is 4 MiB)
    decode_reuse_fetched: bool = True  # fetched chunk KV stays in the decode pool (LRU) after its jobs finish
    redis_data_dir: str = ""  # embedded Valkey's directory ("": a new temporary one)
    index_prefix: str = "pdllm:kv"  # Redis key prefix of the chunk index (one per cluster sharing a Redis)
    max_retries: int = 2  # decode retries after a selected chunk vanished (evicted) between lookup and fetch
    start_timeout_s: float = 180.0  # actors loading the model and starting their transfer servers
    collective_timeout_s: float = 30.0  # NCCL/gloo group rendezvous, and each collective transfer before gRPC fallback
    fetch_timeout_s: float = 30.0  # one KV fetch from one holder (a stalled stream fails after this, then retried)
    same_gpu_ipc: bool = True  # chunk KV between actors on one GPU by CUDA IPC (off: through host memory)
    ipc_lease_s: float = 60.0  # a holder keeps KV it exported over CUDA IPC alive this long for an unfinished copy
    fetch_retries: int = 1  # further tries of a failed fetch from the same holder before the chunks are re-prefilled
    stream_events: int = 8  # progress events buffered per streamed job (older step events give way to newer ones)
    probe_timeout_s: float = 3.0  # an actor asked "are you alive?" after a failure; no answer counts as down
    actor_max_restarts: int = 8  # Ray restarts a dead prefill/decode actor this many times (0: a death is final)
    restart_timeout_s: float = 180.0  # a request with no live actor of a kind waits this long for a restarted one
    actor_memory_budget_bytes: int = 0  # an actor whose RSS is above this refuses new work (ClusterBusy); 0: off
    actor_memory_limit_bytes: int = 0  # an actor whose RSS passes this ends (out of memory) and restarts; 0: off
    # actors refuse new work while their node's memory is fuller than this fraction; None: Ray's memory monitor
    # threshold less 0.05 (0.90 by default), derived on each actor's node (cluster/common/node_memory.py); 0: off
    node_memory_refuse_fraction: float | None = None
    log_json: bool = False  # actors log JSON lines (each with its request id) instead of text
    log_level: str = "INFO"  # actors' log level; their lines reach the driver's stderr and Ray's worker logs

    def validate(self) -> None:
        for name in ("max_queued_per_decode_actor", "max_queued_per_prefill_actor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.ipc_lease_s <= 0:
            raise ValueError(f"ipc_lease_s must be > 0, got {self.ipc_lease_s}")
        if self.fetch_timeout_s <= 0 or self.probe_timeout_s <= 0 or self.fetch_retries < 0 or self.stream_events < 1:
            raise ValueError("fetch_timeout_s and probe_timeout_s must be > 0, fetch_retries >= 0, stream_events >= 1")
        if self.actor_max_restarts < 0 or self.restart_timeout_s <= 0 or self.actor_memory_budget_bytes < 0:
            raise ValueError("actor_max_restarts and actor_memory_budget_bytes must be >= 0, restart_timeout_s > 0")
        if self.actor_memory_limit_bytes < 0:
            raise ValueError(f"actor_memory_limit_bytes must be >= 0, got {self.actor_memory_limit_bytes}")
        if self.actor_memory_limit_bytes and self.actor_memory_budget_bytes >= self.actor_memory_limit_bytes:
            raise ValueError("actor_memory_budget_bytes must be below actor_memory_limit_bytes (refuse before ending)")
        fraction = self.node_memory_refuse_fraction
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"node_memory_refuse_fraction must be in [0, 1] (0: off), got {fraction}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {self.log_level!r}")
        if self.transfer_piece_bytes < 1024 or self.transfer_piece_bytes > (4 << 20) - 4096:
            raise ValueError("transfer_piece_bytes must be in [1 KiB, 4 MiB - 4 KiB] (gRPC's message limit)")
