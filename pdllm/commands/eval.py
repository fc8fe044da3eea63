"""`pdllm eval`: accuracy, step time and KV read of the generation modes on the long-context tasks."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from pdllm.errors import InvalidRequest


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(
            int(x.lower().replace("k", "")) * (1024 if x.lower().endswith("k") else 1) for x in text.split(",")
        )
    except ValueError:
        raise InvalidRequest(f"--lengths must be comma-separated integers (e.g. 4096,16k), got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate modes on synthetic long-context tasks (passkey, kv_retrieval, niah...)")
    p.add_argument("--model", default=None, help="model directory (default: the bundled tiny model)")
    p.add_argument("--task", default="all", help="task name, comma list, or 'all'")
    p.add_argument("--lengths", default="2048", help="prompt lengths in tokens, comma-separated (4096,16k)")
    p.add_argument("--modes", default="vanilla", help="comma list of vanilla, prefix, sparse")
    p.add_argument("--samples", type=int, default=10, help="samples per task and length (per depth with a sweep)")
    p.add_argument("--seed", type=int, default=0, help="of the generated samples")
    p.add_argument("--threshold", type=float, default=0.9, help="parallel-decoding threshold; 0: one token per step")
    p.add_argument("--depth-sweep", metavar="PNG", help="fix needle depths 0,10,..,100%% and plot accuracy to PNG")
    p.add_argument("--depths", type=int, default=11, help="number of depths in a sweep")
    p.add_argument("--no-bos", action="store_true", help="ablation: encode chunks without their BOS anchor")
    p.add_argument("--method", default="{}", help="MethodConfig fields as JSON, e.g. '{\"top_k\": 4}'")
    p.add_argument("--cell-seconds", type=float, default=None, help="time budget per task and length (all modes)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda where available)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH", help="save records and summary as JSON (- stdout)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pdllm import progress
    from pdllm.commands.generate import _cuda, check_device
    from pdllm.engine import release_engine
    from pdllm.evaluation.report import plot_depth, summarize, table
    from pdllm.evaluation.runner import EvalConfig, method_config, run_eval
    from pdllm.models.loader import load_model
    from pdllm.tasks import TASKS

    try:
        method = json.loads(args.method)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"--method is not valid JSON: {exc}") from None
    if not isinstance(method, dict):
        raise InvalidRequest("--method must be a JSON object")
    tasks = tuple(TASKS) if args.task == "all" else tuple(t.strip() for t in args.task.split(",") if t.strip())
    depths = None
    if args.depth_sweep:
        if args.depths < 2:
            raise InvalidRequest("--depths must be >= 2")
        depths = tuple(round(i / (args.depths - 1), 4) for i in range(args.depths))
    cfg = EvalConfig(
        tasks=tasks,
        lengths=_ints(args.lengths),
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        samples=args.samples,
        seed=args.seed,
        depths=depths,
        threshold=args.threshold or None,
        bos_anchor=not args.no_bos,
        method=method,
        cell_seconds=args.cell_seconds,
    )
    cfg.validate()
    if args.model is None:
        from pdllm.assets import default_model_dir

        args.model = str(default_model_dir())
    progress.configure(quiet=args.quiet)
    device = check_device(args.device or ("cuda" if _cuda() else "cpu"))
    progress.note(f"loading the model ({args.model}) on {device}")
    lm = load_model(args.model, device=device)
    t0 = time.time()
    n_depths = len(depths) if depths else 1
    total = len(cfg.tasks) * len(cfg.lengths) * cfg.samples * n_depths * len(cfg.modes)
    try:
        with progress.Bar("eval", total, "generations") as bar:
            records = run_eval(lm, cfg, lambda n=1: bar.update_to(bar.n + n))
    finally:
        release_engine(lm)  # the model was loaded for this run: its engine's pool is freed now
    rows = summarize(records)
    text = table(rows)
    print(text, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.depth_sweep:
        print(f"depth plot: {plot_depth(records, args.depth_sweep)}", file=sys.stderr)
    if args.json:
        doc = {
            "config": {k: v for k, v in vars(args).items() if k != "func"},
            "method": dataclasses.asdict(method_config(cfg)) if any(m != "vanilla" for m in cfg.modes) else None,
            "model": args.model,
            "model_id": lm.model_id,
            "device": str(lm.model.device),
            "seconds": round(time.time() - t0, 1),
            "summary": rows,
            "records": records,
        }
        if args.json == "-":
            json.dump(doc, sys.stdout, indent=1)
            sys.stdout.write("\n")
        else:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0
