"""Start the whole cluster from a config: Ray (joined or local), Redis (external or embedded Valkey), the prefill
and decode actors placed by custom resources, and the router. `start_cluster(config).router.generate(...)`."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray
from pdllm.cluster.bootstrap import (
    DECODE_RESOURCE,
    PREFILL_RESOURCE,
    BootstrapError,
    connect_ray,
    connect_redis,
    role_resources,
)
from pdllm.cluster.common.auth import new_token
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.config import ClusterConfig
from pdllm.cluster.kv.chunk_index import ChunkIndex
from pdllm.cluster.kv.collective_group import DECODE, PREFILL, Formation, form_group, with_actor_env
from pdllm.cluster.kv.redis_server import EmbeddedRedis
from pdllm.cluster.router.router import Router
from pdllm.cluster.router.slots import CONTROL, ActorSlot
from pdllm.decode_node.actor import DecodeWorker
from pdllm.prefill_node.actor import PrefillWorker

from pdllm.models.loader import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class ClusterHandle:
    router: Router
    config: ClusterConfig
    limits: ClusterLimits
    redis_url: str
    prefill_actors: list = field(default_factory=list)
    decode_actors: list = field(default_factory=list)
    embedded_redis: EmbeddedRedis | None = None
    owns_ray: bool = False
    collective: Formation | None = None  # the NCCL/gloo group for chunk KV (spec None: gRPC only, reason says why)
    model: dict = field(default_factory=dict)  # the model as a prefill actor loaded it (family, sizes, model_id)

    def shutdown(self) -> None:
        """Stop the actors (their chunks leave the index), then Ray and the embedded Redis if we started them."""
        self.router.close()
        stops = [a.stop.remote() for a in self.prefill_actors]
        try:
            ray.wait(stops, num_returns=len(stops), timeout=10)
        except Exception as e:  # an actor already dead: nothing of its to stop
            log.warning("stopping prefill actors: %s", e)
        for actor in self.prefill_actors + self.decode_actors:
            ray.kill(actor, no_restart=True)
        self.prefill_actors, self.decode_actors = [], []
        if self.owns_ray:
            ray.shutdown()
        if self.embedded_redis is not None:
            self.embedded_redis.stop()

    def reform_group(self, kind: str, slot: ActorSlot) -> None:
        """A restarted actor is outside the collective group (its process is new, the group's ranks are fixed):
        every live member leaves and the group forms again with it, so its KV moves device to device again."""
        if self.collective is None or self.collective.spec is None:
            return
        members = [(PREFILL, s.name, s.handle) for s in self.router.prefill if s.alive]
        members += [(DECODE, s.name, s.handle) for s in self.router.decode if s.alive]
        leaves = [h.collective_leave.remote() for _, _, h in members]
        ray.wait(leaves, num_returns=len(leaves), timeout=self.limits.collective_timeout_s)
        self.collective = form_group(members, self.config.kv_transport, self.limits.collective_timeout_s)
        log.info("collective group formed again after %s actor %s restarted: %s", kind, slot.name,
                 "ok" if self.collective.spec is not None else self.collective.reason)  # fmt: skip

    def __enter__(self) -> ClusterHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def start_cluster(
    config: ClusterConfig, limits: ClusterLimits | None = None, on_stage: Callable[[str], None] | None = None
) -> ClusterHandle:
    """Bring the cluster up and return a handle whose `router` answers requests; call `shutdown()` when done.
    `on_stage(text)` hears each stage as it completes (Redis, Ray, each actor ready): progress for a waiting user.
    `limits`: in place of the config's (`limits:` in its YAML) as a whole."""
    config.validate()
    limits = limits or config.limits
    limits.validate()
    stage = on_stage or (lambda text: None)
    redis_url, embedded = connect_redis(config, limits.redis_data_dir)
    stage("Redis ready (embedded Valkey)" if embedded is not None else "Redis connected")
    owns_ray = False
    try:
        owns_ray = connect_ray(config)
        stage("Ray ready")
        return _start_actors(config, limits, redis_url, embedded, owns_ray, stage)
    except BaseException:
        if owns_ray:
            ray.shutdown()
        if embedded is not None:
            embedded.stop()
        raise


def _wait_ready(actors: list, timeout_s: float, stage: Callable[[str], None]) -> list[dict]:
    """Every actor's info, in order, once each has loaded its model; `stage` hears "actors ready k/n" as they do."""
    refs = [a.info.remote() for a in actors]
    pending, deadline = list(refs), time.monotonic() + timeout_s
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ray.exceptions.GetTimeoutError(f"{len(pending)} of {len(refs)} actors not ready")
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if done:
            stage(f"actors ready {len(refs) - len(pending)}/{len(refs)} (model loaded)")
    return ray.get(refs, timeout=max(1.0, deadline - time.monotonic()))


def _start_actors(
    config: ClusterConfig,
    limits: ClusterLimits,
    redis_url: str,
    embedded: EmbeddedRedis | None,
    owns_ray: bool,
    stage: Callable[[str], None],
) -> ClusterHandle:
    token = new_token()  # the chunk transfer services' shared secret, for this cluster's lifetime
    run = uuid.uuid4().hex[:8]
    groups = {CONTROL: 2}  # status, cancel and probes answer even when every job thread is busy
    prefill_cls = ray.remote(concurrency_groups=groups)(PrefillWorker)
    decode_cls = ray.remote(concurrency_groups=groups)(DecodeWorker)
    prefill, decode = [], []
    for i in range(config.num_prefill_actors):
        name = f"pdllm-prefill-{run}-{i}"
        prefill.append(
            prefill_cls.options(
                name=name,
                num_cpus=config.cpus_per_actor,
                num_gpus=config.prefill_gpus_per_actor,
                resources=role_resources(PREFILL_RESOURCE, config.prefill_gpus_per_actor),
                max_concurrency=4,  # status and same-node reads answer while a prefill runs
                max_restarts=limits.actor_max_restarts,  # __init__ again: weights, store, transfer server
                max_task_retries=0,  # the router retries a lost call itself, once, where it cannot run twice
                runtime_env=with_actor_env(),  # NVLink multicast off (and NCCL errors raise) before NCCL loads
            ).remote(
                name,
                config.model_dir,
                config.prefill_gpus_per_actor,
                config.cpus_per_actor,
                config.store_capacity_bytes,
                redis_url,
                limits,
                token,
            )
        )
    for i in range(config.num_decode_actors):
        name = f"pdllm-decode-{run}-{i}"
        decode.append(
            decode_cls.options(
                name=name,
                num_cpus=config.cpus_per_actor,
                num_gpus=config.decode_gpus_per_actor,
                resources=role_resources(DECODE_RESOURCE, config.decode_gpus_per_actor),
                max_concurrency=limits.max_queued_per_decode_actor + 1,  # a thread per queued job (they wait
                max_restarts=limits.actor_max_restarts,
                max_task_retries=0,
                runtime_env=with_actor_env(),  # on the actor's engine, which batches them), + 1 for status
            ).remote(
                name,
                config.model_dir,
                config.decode_gpus_per_actor,
                config.cpus_per_actor,
                redis_url,
                limits,
                token,
                config.engine(limits.decode_reuse_fetched),
            )
        )
    try:
        infos = _wait_ready(prefill + decode, limits.start_timeout_s, stage)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
        for actor in prefill + decode:
            ray.kill(actor, no_restart=True)
        raise BootstrapError(
            f"actors did not start within {limits.start_timeout_s}s (enough CPUs/GPUs and "
            f"'{PREFILL_RESOURCE}'/'{DECODE_RESOURCE}' resources in the cluster?): {e}"
        ) from e
    p_info, d_info = infos[: len(prefill)], infos[len(prefill) :]
    model_ids = {i["model_id"] for i in infos}
    if len(model_ids) != 1:
        raise BootstrapError(f"actors loaded different models from {config.model_dir}: {sorted(model_ids)}")
    members = [(PREFILL, i["name"], a) for i, a in zip(p_info, prefill, strict=True)]
    members += [(DECODE, i["name"], a) for i, a in zip(d_info, decode, strict=True)]
    collective = form_group(members, config.kv_transport, limits.collective_timeout_s)
    index = ChunkIndex.from_url(redis_url, limits.index_prefix, limits.redis_timeout_s)
    pq, dq = limits.max_queued_per_prefill_actor, limits.max_queued_per_decode_actor
    again = limits.actor_max_restarts > 0
    router = Router(
        prefill=[
            ActorSlot(i["name"], i["node"], a, pq, pid=i["pid"], restartable=again)
            for i, a in zip(p_info, prefill, strict=True)
        ],
        decode=[
            ActorSlot(i["name"], i["node"], a, dq, batch=config.decode_max_batch, pid=i["pid"], restartable=again)
            for i, a in zip(d_info, decode, strict=True)
        ],
        index=index,
        tokenizer=load_tokenizer(Path(config.model_dir).expanduser()),
        model_id=model_ids.pop(),
        default_method=config.method(),
        limits=limits,
        max_position=p_info[0]["max_position"],
    )
    stale = router.sweep()  # entries that outlived their holders (Redis persists across runs)
    if stale:
        log.info("removed %d index entries left by holders of an earlier run", stale)
    handle = ClusterHandle(
        router, config, limits, redis_url, prefill, decode, embedded, owns_ray, collective, p_info[0]
    )
    router.on_readmit = handle.reform_group
    return handle
