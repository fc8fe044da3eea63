"""Decode-engine and chunk-store flags shared by `pdllm generate` and `pdllm serve`: they set the cluster's decode
actors (the YAML's decode_* options) and prefill actors' chunk stores (store_capacity_bytes), or, with --in-process,
the engine in this process."""

from __future__ import annotations

import argparse

from pdllm.errors import InvalidRequest

# EngineConfig's defaults, written out so `--help` does not import torch (tests/test_generate_cli.py keeps them equal)
MAX_BATCH, GRAPH_BUCKETS = 32, "1,2,4,8,16,32,64"


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decode engine (default: the config's decode_* options, else these)")
    g.add_argument("--max-batch", type=int, default=None, help=f"jobs batched per step (default {MAX_BATCH})")
    g.add_argument(
        "--pool-bytes", type=int, default=None, help="resident chunk-KV pool bytes (default 0: from free memory)"
    )
    g.add_argument(
        "--graph-buckets",
        default=None,
        help=f"batch sizes a CUDA graph is captured for (default {GRAPH_BUCKETS})",
    )
    s = p.add_argument_group("prefill actors (default: the config's store_capacity_bytes, else this)")
    s.add_argument("--store-bytes", type=int, default=None, help="chunk KV bytes each prefill actor keeps before "
                   "evicting (default 0: from free memory); a context whose chunks do not fit is refused")  # fmt: skip


# each flag's parsed name: (the flag, the ClusterConfig option it sets)
FLAGS = {
    "max_batch": ("--max-batch", "decode_max_batch"),
    "pool_bytes": ("--pool-bytes", "decode_pool_bytes"),
    "graph_buckets": ("--graph-buckets", "decode_graph_buckets"),
    "store_bytes": ("--store-bytes", "store_capacity_bytes"),
}


def cluster_overrides(args: argparse.Namespace) -> dict:
    """The ClusterConfig options the flags set (unset flags keep the config's values)."""
    return {option: getattr(args, name, None) for name, (_, option) in FLAGS.items()}


def given_flags(args: argparse.Namespace) -> list[str]:
    """The engine and store flags set on the command line (a --server request cannot change the server's)."""
    return [flag for name, (flag, _) in FLAGS.items() if getattr(args, name, None) is not None]


def engine_config(args: argparse.Namespace):
    """The in-process engine's settings (an EngineConfig) from the flags; bad values raise InvalidRequest naming
    the flag."""
    from pdllm.decode_node.engine import EngineConfig, parse_buckets

    if getattr(args, "store_bytes", None) is not None:
        raise InvalidRequest("--store-bytes sizes the cluster's prefill actors' chunk stores: --in-process has none")
    max_batch = MAX_BATCH if args.max_batch is None else args.max_batch
    pool = 0 if args.pool_bytes is None else args.pool_bytes
    if max_batch < 1:
        raise InvalidRequest(f"--max-batch must be >= 1, got {max_batch}")
    if pool < 0:
        raise InvalidRequest(f"--pool-bytes must be >= 0, got {pool}")
    try:
        buckets = parse_buckets(GRAPH_BUCKETS if args.graph_buckets is None else args.graph_buckets)
    except ValueError as e:
        raise InvalidRequest(f"--graph-buckets: {e}") from None
    return EngineConfig(max_batch=max_batch, pool_bytes=pool, graph_buckets=buckets)
