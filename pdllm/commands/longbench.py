"""`pdllm longbench`: the LongBench English tasks from a local directory of their JSONL files, scored with the
official metrics (one command to reproduce the paper's table with a real checkpoint and the data)."""

from __future__ import annotations

import argparse
import json
import sys

from pdllm.errors import InvalidRequest


def register(sub: argparse._SubParsersAction) -> None:
    from pdllm.commands.generate import add_method_args

    p = sub.add_parser("longbench", help="score LongBench tasks from a local data directory (official metrics)")
    p.add_argument("--data-dir", required=True, help="directory holding <task>.jsonl files in LongBench's format")
    p.add_argument("--tasks", default="all", help="comma list of LongBench tasks, or 'all' (the 16 English ones)")
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--mode", choices=["vanilla", "prefix", "sparse"], default=None, help="default sparse")
    p.add_argument("--limit", type=int, default=None, help="first N records of each task")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write records and scores as JSON here")
    p.add_argument("--threshold", type=float, default=None, help="parallel decoding threshold (default: preset's)")
    add_method_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pdllm.commands.generate import _cuda, apply_preset, method_from_args, model_dir
    from pdllm.engine import release_engine
    from pdllm.evaluation.longbench import TASKS, run_longbench
    from pdllm.models.loader import load_model

    apply_preset(args)  # chunking, selection and threshold; each task sets its own generation length
    tasks = list(TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise InvalidRequest(f"unknown LongBench task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if args.limit is not None and args.limit < 1:
        raise InvalidRequest(f"--limit must be >= 1, got {args.limit}")
    method = method_from_args(args)
    method.validate()
    lm = load_model(model_dir(args), device=args.device or ("cuda" if _cuda() else "cpu"))
    try:
        mode = args.mode or "sparse"
        records, scores = run_longbench(lm, args.data_dir, tasks, mode, method, args.limit, args.threshold)
    finally:
        release_engine(lm)  # the model was loaded for this run: its engine's pool is freed now
    for name, value in scores.items():
        print(f"{name:22} {value:6.2f}  ({sum(r['task'] == name for r in records)} records)")
    if scores:
        print(f"{'average':22} {sum(scores.values()) / len(scores):6.2f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"scores": scores, "records": records, "method": vars(method)}, f, indent=1, default=str)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
