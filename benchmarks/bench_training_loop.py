"""The training loop's step against the bench's step, in one process and on the same batches: what train.py's loop
(DataLoader workers, metrics, the LR schedule) adds to the step bench_training_step.py times.

Conditions, each `--steps` steps of one curriculum stage (the first 50-step window of each is dropped):
  premade   train_run over batches made beforehand by its loader: the loop without its loader
  bench     bench_training_step.step_ms over those same batches: the step alone
  loop      train_run as a run trains (its DataLoader with --workers workers)
  packed    the same with --packed-batches (one pinned buffer a batch, training.packed)
  repeated  step_ms over the first 6 batches again and again: shapes it has seen (the step bench's warm rows)
A first `loop` run compiles the model's graphs and is not counted.

    python benchmarks/bench_training_loop.py                                    # the chain's recall step, 64K
    source benchmarks/train_defaults.sh     # the official run's long stage: its flags, without the chain's losses
    python benchmarks/bench_training_loop.py --mix official --stage 2 --tokens 32768 --workers 3 -- $DEFAULT_TRAIN_FLAGS
    python benchmarks/bench_training_loop.py --smoke --steps 100 --workers 2      # a CPU check

Flags after `--` replace the chain's (reproduce_bundle.sh: the default TRAIN_FLAGS and the chain's loss weights).
Prints a row per condition as it is measured (stderr) and a table of ms a step at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pdllm.training import train
from pdllm.training.data import ExampleStream
from pdllm.training.optim import make_optimizer

sys.path.insert(0, str(Path(__file__).parent))
from bench_training_step import step_ms  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHAIN_LOSS_FLAGS = ["--lr", "1e-3", "--pointer-weight", "0.5", "--key-weight", "0.5", "--match-weight", "0.5"]
CONDITIONS = ("premade", "bench", "loop", "packed", "repeated")
WINDOW = 50  # train_run logs every 50 steps; the first window holds the loader's start


def default_train_flags() -> list[str]:
    """The flags the training scripts run with when TRAIN_FLAGS is unset, as bash reads benchmarks/train_defaults.sh."""
    read = subprocess.run(
        ["bash", "-c", 'source benchmarks/train_defaults.sh && printf "%s" "$DEFAULT_TRAIN_FLAGS"'],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return read.stdout.split()


class Bench:
    """One model, compiled once, and the run flags every condition shares."""

    def __init__(self, flags: list[str], workers: int, out: Path) -> None:
        self.flags, self.workers, self.out = flags, workers, out  # out: the runs' checkpoint, written and dropped
        self.device = train.train_device()
        first = self.args(1)
        self.model = train.build_model(first.shape, self.device)
        self.terms = train.compile_model(self.model, first.compile, pack=first.pack_tokens,
                                         flex_options=first.flex_options)  # fmt: skip

    def args(self, steps: int) -> argparse.Namespace:
        """A run's flags for `steps` steps, without probes or saves on the way."""
        return train.parse_args([*self.flags, "--out", str(self.out), "--steps", str(steps), "--max-steps", str(steps),
                                 "--workers", str(self.workers), "--probe-every", str(10**9),
                                 "--save-every", str(10**9), "--minutes", "600"])  # fmt: skip

    def loop(self, steps: int, batches: list | None = None, packed: bool = False) -> float:
        """ms a step of train_run after its first window: over `batches` (no DataLoader) or its own loader
        (`packed`: with --packed-batches)."""
        args, log = self.args(steps), []
        args.packed_batches = packed
        opt = make_optimizer(self.model, args.lr)
        train.train_run(self.model, opt, args, self.device, self.terms, log=log, batches=batches)
        windows = [e["step_s"] * 1000 for e in log[1:]]
        if not windows:
            raise ValueError(f"{steps} steps logged no window after the first")
        return sum(windows) / len(windows)

    def premade(self, n: int) -> list:
        """n batches of the run's stream, made by a loader as a run's are."""
        a = self.args(n)
        stream = ExampleStream(a.seed, a.tokens_per_batch, a.max_len, a.chunked_frac, 0, a.pretrain_frac, a.stage,
                               stages=train.run_stages(a))  # fmt: skip
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.workers,
                                             prefetch_factor=2 if self.workers else None)  # fmt: skip
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                return out
        return out

    def step(self, batches: list) -> float:
        """bench_training_step's step (the step train.py runs, without the loop) over `batches`."""
        a = self.args(1)
        losses = train.loss_options(a, self.terms)
        return step_ms(self.model, batches, self.device, True, losses, train.attention_class_of(a))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, flags = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, None)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mix", default="recall_facts")
    p.add_argument("--stage", type=int, default=1, help="curriculum stage (default 1: the recall stage)")
    p.add_argument("--tokens", type=int, default=65536, help="tokens a batch (default: the chain's 64K)")
    p.add_argument("--workers", type=int, default=12, help="loader workers (the script gives a chain run 12)")
    p.add_argument("--steps", type=int, default=150, help="steps a condition (at least two 50-step windows)")
    p.add_argument("--conditions", default=",".join(CONDITIONS), help=f"comma list of {', '.join(CONDITIONS)}")
    p.add_argument("--smoke", action="store_true",
                   help="train.py --smoke (a tiny model, eager, its own 4096-token batches): a CPU check")  # fmt: skip
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(ours)
    conditions = args.conditions.split(",")
    if unknown := set(conditions) - set(CONDITIONS):
        p.error(f"--conditions: unknown {', '.join(sorted(unknown))}; choose from {', '.join(CONDITIONS)}")
    window = 1 if args.smoke else WINDOW  # train.py --smoke logs every step
    if args.steps < 2 * window:
        p.error(f"--steps {args.steps}: at least {2 * window}, so a {window}-step window follows the first")
    base = [] if args.smoke else ([*default_train_flags(), *CHAIN_LOSS_FLAGS] if flags is None else flags)
    smoke = ["--smoke"] if args.smoke else []  # train.py's: the smoke shape, 4096-token batches, a log line a step
    run_flags = [*base, *smoke, "--mix", args.mix, "--stage", str(args.stage), "--tokens-per-batch", str(args.tokens)]
    rows: list[dict] = []

    def add(what: str, ms: float) -> None:
        rows.append({"what": what, "ms_per_step": round(ms, 1)})
        print(f"{what:<12} {ms:8.1f} ms a step", file=sys.stderr, flush=True)

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(run_flags, args.workers, Path(tmp) / "run")
        add("compile", bench.loop(args.steps))
        print(f"compiled and warmed in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        run_conditions(bench, conditions, args.steps, add)
    print(f"\n{args.mix} stage {args.stage}, {bench.args(1).tokens_per_batch} tokens a batch, {args.workers} workers, "
          f"{bench.device.type}:\n| condition | ms a step |\n| --- | --- |")  # fmt: skip
    for r in rows[1:]:
        print(f"| {r['what']} | {r['ms_per_step']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": argv, "rows": rows}, indent=1))
    return 0


def run_conditions(bench: Bench, conditions: list[str], steps: int, add: Callable[[str, float], None]) -> None:
    """Each condition in turn on one compiled model; the pre-made batches are shared, so loop and step compare."""
    batches = bench.premade(max(steps, 6)) if {"premade", "bench", "repeated"} & set(conditions) else []
    for name in conditions:
        if name == "premade":
            add(name, bench.loop(steps, batches[:steps]))
        elif name == "bench":
            add(name, bench.step(batches[:steps]))
        elif name == "loop":
            add(name, bench.loop(steps))
        elif name == "packed":
            add(name, bench.loop(steps, packed=True))
        else:
            add(name, bench.step([batches[i % 6] for i in range(steps)]))


if __name__ == "__main__":
    sys.exit(main())
