"""Train a chain of runs in one process: each run starts from the one before it, as a train.py run started with
--init-from the previous run's export would, but the model, its compiled graphs and CUDA stay up between runs.

    python -m pdllm.training.chain --out OUT --from START reading:4394 recall_notes:2000 -- --seed 1234 ...

Each [MIX:]STEPS run (a bare number is a `reading` run) trains with the train.py flags after `--` plus --mix, --steps
and --out OUT/ckpt; a run given as MIX:STEPS:FLAGS adds its own flags after those, comma-separated (so the last run
can train the served layout: `recall_notes:1000:--instruction-apart,--text-chunks=0.8`). Each run writes its log to
OUT/train_run{i}_log.txt and its export to OUT/run{i} (the float32 weights the next run starts from, so the chain
equals separate train.py runs joined by exports: tests/test_training_chain.py checks it weight for weight), then
runs --after-run, if given, with bash (RUN_DIR: that export).

The chain's first run waits on compiling: on an H100 it reached its 50th step 105-162 s after it started, the later
runs of the same process 4-26 s (benchmarks/NOTES.md, "The whole script with FlexAttention tuned"). With
--warm-up the process compiles the steps' graphs first, on a few batches of every stage its runs train (forward and
backward, no update) and each stage's probe, and with --await-start it then waits for a line on stdin before it
reads --from: so reproduce_bundle.sh starts the chain with the script, to compile while the official run trains
(end of input instead of a line: the chain stops without a run). On an H100 the warm-up of two mixes took 204-286 s,
and the first run after it reached its 50th step in 12.6 s; what it still compiles is about 4 s in a stage's first
steps (benchmarks/NOTES.md, "The served layout on a GPU").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TextIO

import torch

from pdllm.models.transformer import DllmModel
from pdllm.training.data import make_batch
from pdllm.training.objective import LossTerms, batch_layout
from pdllm.training.optim import make_optimizer
from pdllm.training.probe import probe_batches
from pdllm.training.train import (
    attention_class_of,
    build_model,
    compile_model,
    export,
    init_from,
    parse_args,
    run_probe,
    run_stages,
    step_backward,
    step_loss,
    train_device,
    train_run,
)

# warm-up batches of each layout (chunked, dense) for every stage a run trains: a layer stack compiled with dynamic
# shapes took all its graphs from the first few batches of each stage (tests/test_training_chain.py counts them)
WARM_BATCHES = 2
# held-out probe rows of each stage: two batches of probe_batches' 16 rows, so a graph compiled for dynamic shapes sees
# two lengths, as a run's probe (64 samples, four batches) will
WARM_PROBE_SAMPLES = 32


# train.py flags the chain sets for each run itself: refused after `--` and in a run's own flags
CHAIN_SET_FLAGS = ("--out", "--mix", "--steps", "--init-from", "--resume", "--export")


def chain_set(flags: list[str] | tuple[str, ...]) -> list[str]:
    """The CHAIN_SET_FLAGS among `flags` (`--flag` or `--flag=value`), sorted."""
    return sorted({f.split("=")[0] for f in flags} & set(CHAIN_SET_FLAGS))


class Run(NamedTuple):
    """One run of the chain: its mix, its planned steps, and train.py flags of its own (after the chain's)."""

    mix: str
    steps: int
    flags: tuple[str, ...] = ()


def parse_run(text: str) -> Run:
    """`STEPS` (a reading run), `MIX:STEPS` or `MIX:STEPS:FLAGS` (train.py flags for this run alone, comma-separated,
    a value after `=`: `recall_notes:1000:--instruction-apart,--text-chunks=0.8`); bad input: ValueError naming it."""
    parts = text.split(":")
    if len(parts) > 3 or (len(parts) == 3 and not parts[0]):
        raise ValueError(f"run {text!r}: expected [MIX:]STEPS or MIX:STEPS:FLAGS")
    mix, steps = (parts[0], parts[1]) if len(parts) > 1 else ("reading", parts[0])
    if not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"run {text!r}: expected [MIX:]STEPS with STEPS a positive number")
    flags = tuple(parts[2].split(",")) if len(parts) == 3 else ()
    if not all(f.startswith("--") for f in flags):
        raise ValueError(f"run {text!r}: its flags are train.py flags, comma-separated, each starting with --")
    if set_here := chain_set(flags):
        raise ValueError(f"run {text!r}: {', '.join(set_here)}: the chain sets these for each run")
    return Run(mix or "reading", int(steps), flags)


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


def run_args(flags: list[str], out: Path, run: Run) -> argparse.Namespace:
    """The train.py flags of one run of the chain: the chain's, then the run's own (which override them)."""
    return parse_args([*flags, *run.flags, "--out", str(out / "ckpt"), "--mix", run.mix, "--steps", str(run.steps)])


def warm_up(model: DllmModel, terms: LossTerms, runs: list[Run], flags: list[str]) -> int:
    """Run the forwards and backwards of WARM_BATCHES batches of each layout for every stage the runs train, with
    no update, and each stage's held-out probe, so the compiled steps' and probe's graphs are built before the first
    run starts; the weights are untouched and the gradients dropped. Returns the training batches run."""
    done = 0
    device = next(model.parameters()).device
    # a run's fused AdamW imports torch.distributed.tensor, which registers a pytree node: made after the warm-up, it
    # failed the guards of every FlexAttention graph, compiled again at the first run's start (seen on an H100)
    make_optimizer(model, 0.0)
    for run in {(run.mix, run.flags): run for run in runs}.values():  # one of each mix and flags
        args = run_args(flags, Path(os.devnull), run)  # the run's flags; it writes nothing
        attention_class = attention_class_of(args)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        rng = random.Random(f"warm-up:{run.mix}:{','.join(run.flags)}")
        for stage in run_stages(args)[args.stage or 0 :]:
            for chunked in (1.0, 0.0) * WARM_BATCHES:
                batch = make_batch(rng, stage, args.max_len, args.tokens_per_batch, (chunked, args.pretrain_frac))
                layout = batch_layout(batch, args.pack_tokens)
                loss, _ = step_loss(model, batch.to(device), layout, args, gen, attention_class, terms)
                step_backward(loss)
                done += 1
            run_probe(model, probe_batches(stage, args.max_len, WARM_PROBE_SAMPLES), device)
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":  # the official run's tries train on the same GPU while this process waits for its start
        torch.cuda.empty_cache()
    return done


def run_chain(
    out: Path,
    start: Path,
    runs: list[Run],
    flags: list[str],
    after_run: str | None,
    warm: bool = False,
    await_start: Callable[[], bool] | None = None,
) -> Path | None:
    """Train `runs` one after another from checkpoint `start`; returns the last run's export. `warm`: compile the
    steps first (warm_up); `await_start`: called before `start` is read, False to stop with no run (None)."""
    device = train_device()
    every = [run_args(flags, out, run) for run in runs]  # a run's bad flag fails here, before any run trains
    first = every[0]
    model = build_model(first.shape, device)
    fresh_process = rng_state(device)  # what a new train.py process holds when its loop starts
    terms = compile_model(model, first.compile, pack=first.pack_tokens, flex_options=first.flex_options)
    if warm:
        began = time.time()
        batches = warm_up(model, terms, runs, flags)
        print(f"chain: warmed up the steps on {batches} batches in {time.time() - began:.0f}s", flush=True)
    if await_start is not None and not await_start():
        print(f"chain: no start given for {start}; stopping before the first run", flush=True)
        return None
    for i, (run, args) in enumerate(zip(runs, every, strict=True), 1):
        own = f" ({' '.join(run.flags)})" if run.flags else ""
        with open(out / f"train_run{i}_log.txt", "w") as log:
            tee = Tee(sys.stdout, log)
            with contextlib.redirect_stdout(tee), contextlib.redirect_stderr(Tee(sys.stderr, log)):
                print(f"run {i}: mix {run.mix}, {run.steps} steps{own}, from {start}", flush=True)
                if i == 1:
                    init_from(model, start)
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
    p.add_argument("--warm-up", action="store_true", help="compile the steps on a few batches of every stage first")
    p.add_argument("--await-start", action="store_true",
                   help="read --from only once a line comes on stdin (end of input: stop with no run), so the chain "
                   "can compile while its start is still training")  # fmt: skip
    p.add_argument("runs", nargs="+", help="[MIX:]STEPS or MIX:STEPS:FLAGS per run, in order")
    args = p.parse_args(ours)
    try:
        runs = [parse_run(r) for r in args.runs]
    except ValueError as e:
        p.error(str(e))
    if bad := chain_set(flags):
        p.error(f"{', '.join(bad)} after --: the chain sets these for each run")
    args.out.mkdir(parents=True, exist_ok=True)
    await_start = (lambda: bool(sys.stdin.readline())) if args.await_start else None
    run_chain(args.out, args.start, runs, flags, args.after_run, args.warm_up, await_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
