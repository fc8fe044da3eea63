"""`pdllm` command line: each subcommand lives in pdllm/commands/<name>.py with `register(subparsers)`.

User errors (PdllmError), and what the environment refuses (a file that cannot be read, memory that cannot be had)
print one line naming the cause and exit with code 2, never a traceback. `--help` shows every option's default.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pdllm.errors import PdllmError

COMMANDS = ("generate", "make_tiny", "eval", "longbench", "serve", "batch", "status")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help, for options without a description too (flags and unset options have
    none to show)."""

    @staticmethod
    def _has_default(action: argparse.Action) -> bool:
        return action.default is not None and action.default is not False and action.default != argparse.SUPPRESS

    def add_argument(self, action: argparse.Action) -> None:
        if action.help is None and action.option_strings and self._has_default(action):
            action.help = "(default: %(default)s)"
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return super()._get_help_string(action) if self._has_default(action) else action.help


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def out_of_memory(exc: BaseException) -> bool:
    """An allocation the device or the host refused (torch raises RuntimeError subclasses for these)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pdllm", description="Serve long-context diffusion LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pdllm.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pdllm import progress

    progress.configure(quiet=bool(getattr(args, "quiet", False)))  # per command: nothing carries over between calls
    try:
        return int(args.func(args) or 0)
    except PdllmError as exc:
        print(f"pdllm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or port the system refused
        print(f"pdllm: error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"pdllm: error: out of memory ({first[:300]}); ask for less (--gen-length, context)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pdllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
