"""`pdllm serve`: the pdllm.v1 gRPC API over a model, with batch jobs in Redis.

Where answers come from, as in `pdllm generate`: by default an embedded cluster (a private local Ray with a prefill
and a decode actor, an embedded Valkey for the chunk index, the bundled model); `--config F` the Ray cluster that
file describes; `--in-process` the engine in this process (the only mode serving the vanilla and prefix baselines).
`--model DIR` picks the checkpoint in every mode. Prometheus metrics are served on `--metrics-port` (9090).
A shared token is required on every call: `--auth-token`, else $PDLLM_AUTH_TOKEN, else a new one printed once
at start (and never logged again). `--no-auth` turns it off for loopback development.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from pdllm.commands.engine_args import add_engine_args, cluster_overrides, engine_config
from pdllm.commands.generate import model_dir
from pdllm.errors import PdllmError
from pdllm.observability import metrics
from pdllm.observability.logs import configure_logging

TOKEN_ENV = "PDLLM_AUTH_TOKEN"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the gRPC API (generation, streaming, batch jobs)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", help="cluster config (YAML): serve through the Ray cluster it describes")
    where.add_argument("--in-process", action="store_true", help="run the model in this process (no Ray)")
    p.add_argument("--model", help="local model directory (default: the bundled model, or the config's model_dir)")
    p.add_argument("--device", default=None, help="cpu or cuda (--in-process)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port")
    p.add_argument(
        "--http-port", type=int, default=None, help="also serve the OpenAI-compatible HTTP API on this port (0: any)"
    )
    p.add_argument("--auth-token", default=None, help=f"shared secret (default: ${TOKEN_ENV} or a new one)")
    p.add_argument("--no-auth", action="store_true", help="accept calls without a token (loopback development)")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--redis-url", default=None, help="Redis for batch jobs (default: an embedded Valkey)")
    p.add_argument("--data-dir", default=str(Path.home() / ".cache" / "pdllm"), help="embedded Valkey data, models")
    p.add_argument("--no-batch", action="store_true", help="serve without batch jobs (no Redis)")
    p.add_argument(
        "--max-running",
        type=int,
        default=None,
        help="generation calls running at once (default: as many as the decode engines batch)",
    )
    p.add_argument("--max-waiting", type=int, default=None, help="calls queued beyond those (default: max-running)")
    add_engine_args(p)
    p.add_argument(
        "--actor-max-restarts",
        type=_count,
        default=None,
        help="Ray restarts a dead prefill/decode actor this often (default: the config's limits, 8)",
    )
    p.add_argument(
        "--actor-memory-budget-mib",
        type=_count,
        default=None,
        help="an actor whose RSS is above this many MiB refuses new work (RESOURCE_EXHAUSTED); 0: off (default: "
        "the config's limits, off)",
    )
    p.add_argument(
        "--actor-memory-limit-mib",
        type=_count,
        default=None,
        help="an actor whose RSS passes this many MiB ends (cause: out of memory) and is restarted; 0: off "
        "(default: the config's limits, off)",
    )
    p.add_argument(
        "--node-memory-refuse-fraction",
        type=_fraction,
        default=None,
        help="actors refuse new work while their node's memory is fuller than this (default: Ray's memory monitor "
        "threshold less 0.05, 0.90 with Ray's defaults); 0: off",
    )
    p.add_argument("--batch-concurrency", type=int, default=1, help="batch jobs running at once")
    p.add_argument("--worker-name", default="router-0", help="batch worker identity (stable across restarts)")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port on --host (0: any free)")
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    p.add_argument("--log-json", action="store_true", help="log JSON lines (with request ids) instead of text")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=run)


def _count(text: str) -> int:
    """A whole number >= 0 (argparse type: a bad value is one line naming the flag, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _fraction(text: str) -> float:
    """A number in [0, 1] (argparse type: a bad value is one line naming the flag, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def resolve_token(args: argparse.Namespace) -> str | None:
    from pdllm.cluster.common.auth import new_token

    if args.no_auth:
        return None
    token = args.auth_token or os.environ.get(TOKEN_ENV)
    if token:
        return token
    token = new_token()
    print(f"auth token (shown once; clients pass --auth-token or set ${TOKEN_ENV}): {token}", flush=True)
    return token


def cluster_backend(args: argparse.Namespace):
    """The Ray cluster behind the API: the one --config describes, else an embedded one on this machine."""
    from pdllm.cluster.cluster_backend import ClusterBackend
    from pdllm.cluster.config import ClusterConfig
    from pdllm.cluster.runtime import start_cluster

    config = ClusterConfig.from_yaml(args.config) if args.config else ClusterConfig()
    if args.model or not config.model_dir:
        config = config.with_overrides(model_dir=model_dir(args))
    config = config.with_overrides(**cluster_overrides(args))
    config.validate()
    if args.max_running is None:  # every decode actor's batch can be filled
        args.max_running = config.decode_max_batch * config.num_decode_actors
    where = f"config {args.config}" if args.config else "embedded: local Ray, embedded Valkey"
    print(f"starting the cluster ({where}; model {config.model_dir})", flush=True)
    given = {  # flags given win over the config's `limits:`
        "actor_max_restarts": args.actor_max_restarts,
        "node_memory_refuse_fraction": args.node_memory_refuse_fraction,
    }
    for flag, limit in (
        ("actor_memory_budget_mib", "actor_memory_budget_bytes"),
        ("actor_memory_limit_mib", "actor_memory_limit_bytes"),
    ):
        if getattr(args, flag) is not None:
            given[limit] = getattr(args, flag) << 20
    overrides = {k: v for k, v in given.items() if v is not None}
    limits = replace(config.limits, log_json=args.log_json, log_level=args.log_level, **overrides)  # log as the server
    started = time.monotonic()
    stage = lambda text: print(f"  {text} ({time.monotonic() - started:.1f} s)", flush=True)  # noqa: E731
    return ClusterBackend(start_cluster(config, limits, on_stage=stage))


def local_backend(args: argparse.Namespace):
    from pdllm.cluster.api.in_process import InProcessBackend

    device = args.device or ("cuda" if _cuda() else "cpu")
    engine = engine_config(args)
    if args.max_running is None:  # the engine's batch can be filled
        args.max_running = engine.max_batch
    return InProcessBackend.from_directory(model_dir(args), device=device, concurrency=args.max_running, engine=engine)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def start_http(args: argparse.Namespace, token: str | None):
    """The OpenAI-compatible HTTP API (--http-port), started before the backend so it can say "not ready"."""
    if args.http_port is None:
        return None
    from pdllm.cluster.api.http_api import HttpApiConfig, HttpApiServer

    if args.tls_cert:
        raise PdllmError("--http-port serves plain HTTP: put a TLS proxy in front of it instead of --tls-cert")
    http = HttpApiServer(HttpApiConfig(host=args.host, port=args.http_port, auth_token=token)).start()
    print(f"OpenAI-compatible HTTP API on {http.url}/v1", flush=True)
    return http


def batch_store(args: argparse.Namespace, closers: list):
    from pdllm.cluster.batch.store import BatchStore
    from pdllm.cluster.kv.redis_server import EmbeddedRedis

    if args.redis_url:
        return BatchStore.from_url(args.redis_url)
    data = Path(args.data_dir) / "valkey"
    password_file = data / "password"
    password = password_file.read_text().strip() if password_file.is_file() else None
    server = EmbeddedRedis(data, password=password).start()  # same directory + password: batches persist
    if password is None:
        password_file.write_text(server.password)
        password_file.chmod(0o600)
    closers.append(server.stop)
    return BatchStore(server.client(decode_responses=True, socket_timeout=10))


def run(args: argparse.Namespace) -> int:
    from pdllm.cluster.api.server import ApiServer, ApiServerConfig
    from pdllm.cluster.batch.worker import BatchWorker

    if bool(args.tls_cert) != bool(args.tls_key):
        raise PdllmError("--tls-cert and --tls-key go together")
    if args.actor_memory_limit_mib and args.actor_memory_budget_mib >= args.actor_memory_limit_mib:
        raise PdllmError("--actor-memory-budget-mib must be below --actor-memory-limit-mib (refuse work before ending)")
    configure_logging(json=args.log_json, level=args.log_level)
    token = resolve_token(args)
    http = start_http(args, token)  # answers 503 "not ready" until the backend is up
    try:
        backend = local_backend(args) if args.in_process else cluster_backend(args)
    except BaseException:
        if http is not None:
            http.stop()
        raise
    closers: list = [backend.close] if hasattr(backend, "close") else []
    if http is not None:
        closers.append(http.stop)  # closed first: no HTTP call reaches a stopped backend
    server = worker = None
    try:  # whatever fails from here on, what was started is stopped (a cluster, a Valkey, a metrics port)
        if not args.no_metrics:
            port = metrics.start_metrics_server(args.metrics_port, host=args.host)
            closers.insert(0, metrics.stop_metrics_servers)
            print(f"metrics on http://{args.host}:{port}/metrics", flush=True)
        store = None if args.no_batch else batch_store(args, closers)
        cfg = ApiServerConfig(
            host=args.host,
            port=args.port,
            auth_token=token,
            tls_cert=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
            tls_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
            max_running=args.max_running,
            max_waiting=args.max_running if args.max_waiting is None else args.max_waiting,
        )
        server = ApiServer(backend, cfg, store).start()
        if http is not None:
            http.attach(server.servicer)
        if store is not None:
            worker = BatchWorker(store, backend, args.worker_name, concurrency=args.batch_concurrency).start()
        print(f"pdllm serving on {server.address} ({'TLS' if args.tls_cert else 'plaintext'})", flush=True)
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
    finally:
        if worker is not None:
            worker.stop(wait=False)  # unfinished jobs keep their leases: the next start requeues them
        if server is not None:
            server.stop()
        for close in reversed(closers):  # the Valkey of batch jobs first, the backend (cluster) last
            close()
    print("pdllm: stopped", file=sys.stderr)
    return 0
