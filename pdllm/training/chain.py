"""Train a chain of runs in one process: each run starts from the one before it, as a train.py run started with
--init-from the previous run's export would, but the model, its compiled graphs and CUDA stay up between runs.

    python -m pdllm.training.chain --out OUT --from START reading:4394 recall_notes:2000 -- --seed 1234 ...

Each [MIX:]STEPS run (a bare number is a `reading` run) trains with the train.py flags after `--` plus --mix, --steps
and --out OUT/ckpt, writes its log to OUT/train_run{i}_log.txt and its export to OUT/run{i} (the float32 weights the
next run starts from, so the chain equals separate train.py runs joined by exports: tests/test_training_chain.py
checks it weight for weight), then runs --after-run, if given, with bash (RUN_DIR: that export). On an H100 a run in
a new process spent 22-85 s before its 50th step with a warm compile cache, about 2.5 s of it in steps, and an export
process after it (benchmarks/NOTES.md, "The reproduction script end to end"); how much of that one process saves
is to be measured on the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TextIO

import torch

from pdllm.training.optim import make_optimizer
from pdllm.training.train import build_model, compile_model, export, init_from, parse_args, train_device, train_run


def parse_run(text: str) -> tuple[str, int]:
    """`MIX:STEPS` or `STEPS` (a reading run) as (mix, steps); bad input: ValueError naming it."""
    mix, _, steps = text.rpartition(":")
    if not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"run {text!r}: expected [MIX:]STEPS with STEPS a positive number")
    return mix or "reading", int(steps)


class Tee:
    """Write to several text streams at once (a run's log file and the console)."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if device.type == "cuda" else None


def set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def run_chain(out: Path, start: Path, runs: list[tuple[str, int]], flags: list[str], after_run: str | None) -> Path:
    """Train `runs` one after another from checkpoint `start`; returns the last run's export."""
    device = train_device()
    model, terms, fresh_process = None, None, None
    for i, (mix, steps) in enumerate(runs, 1):
        args = parse_args([*flags, "--out", str(out / "ckpt"), "--mix", mix, "--steps", str(steps)])
        with open(out / f"train_run{i}_log.txt", "w") as log:
            tee = Tee(sys.stdout, log)
            with contextlib.redirect_stdout(tee), contextlib.redirect_stderr(Tee(sys.stderr, log)):
                print(f"run {i}: mix {mix}, {steps} steps, from {start}", flush=True)
                torch.manual_seed(args.seed)
                if model is None:
                    model = build_model(args.shape, device)
                    fresh_process = rng_state(device)  # what a new train.py process holds when its loop starts
                    init_from(model, start)
                    terms = compile_model(model, args.compile, pack=args.pack_tokens, flex_options=args.flex_options)
                else:
                    set_rng_state(fresh_process)
                args.init_from = start  # for the run's record (state.json), as a separate run would have it
                train_run(model, make_optimizer(model, args.lr), args, device, terms)
                export(out / "ckpt", out / f"run{i}")
        shutil.rmtree(out / "ckpt")  # optimizer state: each run starts a fresh AdamW
        start = out / f"run{i}"
        if after_run:
            after(after_run, start)
    return start


def after(command: str, run_dir: Path) -> None:
    """Run the --after-run command for a finished run; its failure is reported and the chain goes on (packing
    results is not worth the runs still to come)."""
    try:
        done = subprocess.run(["bash", "-c", command], env=os.environ | {"RUN_DIR": str(run_dir)}, timeout=600)
        if done.returncode:
            print(f"chain: --after-run exited {done.returncode} after {run_dir.name}; going on", file=sys.stderr)
    except subprocess.TimeoutExpired:
        print(f"chain: --after-run ran past 600 s after {run_dir.name}; going on", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, flags = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--from", dest="start", type=Path, required=True, help="the checkpoint the first run starts from")
    p.add_argument("--after-run", help="a bash command run after each run's export (e.g. to pack results)")
    p.add_argument("runs", nargs="+", help="[MIX:]STEPS per run, in order")
    args = p.parse_args(ours)
    try:
        runs = [parse_run(r) for r in args.runs]
    except ValueError as e:
        p.error(str(e))
    bad = {"--out", "--mix", "--steps", "--init-from", "--resume", "--export"} & set(flags)
    if bad:
        p.error(f"{', '.join(sorted(bad))} after --: the chain sets these for each run")
    args.out.mkdir(parents=True, exist_ok=True)
    run_chain(args.out, args.start, runs, flags, args.after_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
