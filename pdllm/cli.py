"""`pdllm` command line: each subcommand lives in pdllm/commands/<name>.py with `register(subparsers)`.

User errors (PdllmError) print one line naming the cause and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pdllm.errors import PdllmError

COMMANDS = ("generate", "make_tiny", "eval", "longbench", "serve", "batch", "status")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdllm", description="Serve long-context diffusion LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pdllm.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PdllmError as exc:
        print(f"pdllm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pdllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
