"""Compare training directories on the same held-out probe sets (`python -m pdllm.training.compare DIR...`): the
command apart from `probe`, since it builds models as `train` does and `train` imports `probe`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pdllm.training.data import CURRICULUM
from pdllm.training.probe import probe_accuracy, probe_batches
from pdllm.training.state import load_state
from pdllm.training.train import build_model


def main(argv: list[str] | None = None) -> int:
    """Compare training directories on the same held-out probe sets; optionally write the best one's path."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--train-length", type=int, default=2048)
    p.add_argument("--best-to", type=Path, help="write the path of the directory with the best final-stage score")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sets = {s.name: probe_batches(s, args.train_length, args.samples, seed=11) for s in CURRICULUM}
    best, best_key = None, (-1.0,)
    for d in args.dirs:
        meta = json.loads((d / "state.json").read_text())
        model = build_model(meta["args"]["shape"], device)
        load_state(d, model, torch.optim.AdamW(model.parameters()))
        scores = {name: probe_accuracy(model, batches, device) for name, batches in sets.items()}
        print(json.dumps({"dir": str(d), "step": meta["step"], "stage": meta.get("stage")} | scores), flush=True)
        key = tuple(scores[s.name]["em"] for s in reversed(CURRICULUM))  # the final stage first, then earlier ones
        if key > best_key:
            best, best_key = d, key
    if args.best_to and best is not None:
        args.best_to.write_text(str(best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
