"""Bootstrap: join or start Ray, connect to Redis or start the embedded Valkey, and the resources actors ask for.

Ray 2.60 turns token authentication on for a new local cluster (the token goes to ~/.ray/auth_token, or comes
from $RAY_AUTH_TOKEN / $RAY_AUTH_TOKEN_PATH); we keep it on. Joining an existing cluster needs that cluster's token
in one of those places; without it Ray refuses, and we say where to put it.
"""

from __future__ import annotations

import logging
import math
import os

import ray
from pdllm.cluster.config import RAY_LOCAL, ClusterConfig
from pdllm.cluster.kv.redis_server import EmbeddedRedis

from pdllm.errors import PdllmError

PREFILL_RESOURCE = "prefill_gpu"
DECODE_RESOURCE = "decode_gpu"
ROLE_MARKER = 0.001  # units of the role resource a CPU-only actor asks for (placement only)
NAMESPACE = "pdllm"


class BootstrapError(PdllmError):
    """Ray or Redis could not be reached or started."""


def role_resources(resource: str, gpus: float) -> dict[str, float]:
    """Custom resources of an actor: its GPU share of the role resource, so it lands only on nodes of that role."""
    return {resource: max(float(gpus), ROLE_MARKER)}


def loopback_only() -> None:
    """A private Ray binds to 127.0.0.1 (Ray otherwise swaps loopback for the host's routable address)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read by the Ray processes this one starts
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


class _DropTokenAuthNotice(logging.Filter):
    """Ray 2.60 announces, at every new local cluster, the token authentication we keep on: not news to our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def connect_ray(config: ClusterConfig) -> bool:
    """Make this process a Ray driver; returns True if it started a private Ray (and so must shut it down)."""
    if ray.is_initialized():
        return False
    if config.ray_address == RAY_LOCAL:
        loopback_only()
        notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
        if not any(isinstance(f, _DropTokenAuthNotice) for f in notice.filters):
            notice.addFilter(_DropTokenAuthNotice())
        needed_cpus = config.cpus_per_actor * (config.num_prefill_actors + config.num_decode_actors)
        resources = {
            # node resources must be whole numbers
            PREFILL_RESOURCE: math.ceil(config.num_prefill_actors * max(config.prefill_gpus_per_actor, ROLE_MARKER)),
            DECODE_RESOURCE: math.ceil(config.num_decode_actors * max(config.decode_gpus_per_actor, ROLE_MARKER)),
        }
        ray.init(
            address="local",  # always a new private Ray, never a leftover one found through /tmp/ray
            num_cpus=max(os.cpu_count() or 1, int(needed_cpus + 0.999)),
            resources=resources,
            include_dashboard=False,
            namespace=NAMESPACE,
            logging_level="warning",
            _node_ip_address="127.0.0.1",
        )
        return True
    try:
        ray.init(address=config.ray_address, namespace=NAMESPACE, logging_level="warning")
    except Exception as e:  # Ray raises several types here (ConnectionError, AuthenticationError, RuntimeError)
        hint = ""
        if "auth" in str(e).lower() or "token" in str(e).lower():
            hint = " (token authentication: put the cluster's token in $RAY_AUTH_TOKEN or ~/.ray/auth_token)"
        raise BootstrapError(f"cannot join the Ray cluster at {config.ray_address!r}: {e}{hint}") from e
    return False


def connect_redis(config: ClusterConfig, data_dir: str = "") -> tuple[str, EmbeddedRedis | None]:
    """The Redis URL to use, starting the embedded Valkey (persistent, random password) when none is configured."""
    if config.redis_url:
        return config.redis_url, None
    try:
        server = EmbeddedRedis(data_dir or None).start()
    except (OSError, RuntimeError) as e:
        raise BootstrapError(f"cannot start the embedded Redis server: {e}") from e
    return server.url, server
