"""`pdllm make-tiny DIR`: write a tiny random checkpoint (for smoke runs and tests)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny", help="write a tiny random LLaDA or Dream checkpoint to DIR")
    p.add_argument("out_dir")
    p.add_argument("--family", choices=["llada", "dream"], default="llada")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pdllm.models.tiny import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.out_dir, args.family, args.seed))
    return 0
