"""Does a recorded training run's step time follow the number of new batch shapes? Rebuilds the exact batches a run
of `pdllm.training.train` drew (the stream is a function of seed, step and stage; the stage changes at the steps
its log records), counts per log window the (rows, length) shapes never seen before (the main forward) and the
(rows, question length) shapes of chunked batches (the ranking loss's question forward), and fits the logged
`step_s` as a + b * new shapes per step. A per-shape host cost (cuDNN builds an attention plan for every new
shape it sees) shows as a large b and a good fit; data loading or a fixed per-step cost would not.

    python benchmarks/training_step_shapes.py benchmarks/results/eval_2026-11-30_h200_training_log.txt
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from pdllm.training.data import curriculum, make_batch


def read_log(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.startswith("{")]


def shape_counts(log: list[dict], seed: int, tokens: int, length: int, chunked_frac: float, mix: str) -> list[dict]:
    """Per log window: steps, new forward shapes, new question shapes."""
    stages = curriculum(mix)
    switches = {e["step"]: e["stage"] + 1 for e in log if "advance" in e}  # the stage from the step after
    seen_fwd, seen_q = set(), set()
    stage, step, rows = 0, 0, []
    for entry in log:
        new_fwd = new_q = 0
        start = step
        while step < entry["step"]:
            rng = random.Random(f"{seed}:{step}")
            b = make_batch(rng, stages[stage], length, tokens, (chunked_frac, 0.0))
            key = tuple(b.ids.shape)
            new_fwd += key not in seen_fwd
            seen_fwd.add(key)
            if bool((b.needle_seg >= 0).any()):
                q = tuple(b.question.shape)
                new_q += q not in seen_q
                seen_q.add(q)
            step += 1
            stage = switches.get(step, stage)
        rows.append({"step": entry["step"], "steps": step - start, "new_fwd": new_fwd, "new_q": new_q})
    return rows


def fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x; returns (a, b, r^2)."""
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    a_mat = torch.stack([torch.ones_like(x), x], 1)
    coef = torch.linalg.lstsq(a_mat, y[:, None]).solution[:, 0]
    pred = a_mat @ coef
    r2 = 1 - float(((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    return float(coef[0]), float(coef[1]), r2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("log", help="a training log (JSON lines as train.py prints them)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--mix", default=None, help="default: the run's own (varied when its log has facts, else official)")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--chunked-frac", type=float, default=0.5)
    p.add_argument("--json", help="write the rows and the fit here")
    args = p.parse_args(argv)
    log = [e for e in read_log(args.log) if "step_s" in e]
    mix = args.mix or ("varied" if "varied" in args.log else "official")
    rows = shape_counts(log, args.seed, args.tokens, args.length, args.chunked_frac, mix)
    for r, e in zip(rows, log, strict=True):
        r |= {"stage": e["stage"], "step_s": e["step_s"], "new_per_step": (r["new_fwd"] + r["new_q"]) / r["steps"]}
    body = rows[1:]  # the first window holds start-up (kernels loaded, allocator grown)
    a, b, r2 = fit([r["new_per_step"] for r in body], [r["step_s"] for r in body])
    print(f"{args.log} (mix {mix}, seed {args.seed})")
    print(f"{'step':>5} {'stage':>5} {'new fwd':>7} {'new q':>6} {'step_s':>7}")
    for r in rows:
        print(f"{r['step']:>5} {r['stage']:>5} {r['new_fwd']:>7} {r['new_q']:>6} {r['step_s']:>7.3f}")
    print(
        f"fit over windows 2..{len(rows)}: step_s = {a * 1000:.1f} ms + {b * 1000:.1f} ms x new shapes per step "
        f"(r^2 {r2:.2f}); shapes seen: {sum(r['new_fwd'] for r in rows)} forward, {sum(r['new_q'] for r in rows)} "
        f"question"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"log": args.log, "mix": mix, "rows": rows, "fit": {"a_s": a, "b_s": b, "r2": r2}}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
