"""Does a model read a task from chunks laid out as the engine serves them? A one-step exact match on CPU in a minute.

The engine keeps a task's instruction whole as a chunk of its own and cuts the context after it, at text borders
by default (prompt.py, method.instruction, `chunking: text`); training rows had the instruction at the head of the
first chunk and fixed cuts (data.build_example). For kv_retrieval the two differ most: served, every chunk holds
whole 80-byte pairs at the same positions. Each layout (instruction joined or apart, cuts fixed or at text borders)
gets the same number of held-out rows, every chunk visible, the answer fully masked and read in one step
(probe.exact_match, as training's probe reads it). A model that reads `apart text` as the engine's eval does and
`joined` differently shows the training/serving skew; `pdllm eval` is the served path's own measure.

    python benchmarks/layout_probe.py MODEL [MODEL ...] --task kv_retrieval --chunk-size 256 --rows 16
"""

from __future__ import annotations

import argparse
import random
import sys

import torch

from pdllm.models.loader import load_model
from pdllm.training.data import Example, build_example, collate
from pdllm.training.probe import exact_match

LAYOUTS = (("joined", "fixed"), ("joined", "text"), ("apart", "fixed"), ("apart", "text"))


def layout_rows(task: str, chunk_size: int, rows: int, length: int, seed: int) -> dict[str, list[Example]]:
    """`rows` held-out rows in each layout, the same draws in each: row i has its own rng, and a row's layout draws
    (the text cut's) come after everything that makes its sample."""
    return {
        f"{instruction} {cut}": [
            build_example(random.Random(f"layout-probe:{seed}:{task}:{i}"), length, True, {task: 1.0}, (chunk_size,),
                          split="heldout", text_chunks=float(cut == "text"), instruction_apart=instruction == "apart")
            for i in range(rows)
        ]
        for instruction, cut in LAYOUTS
    }  # fmt: skip


def layout_em(model, rows: dict[str, list[Example]]) -> dict[str, float]:
    """One-step exact match of each layout's rows, 8 rows a forward."""
    out = {}
    for layout, built in rows.items():
        hits = [exact_match(model, collate(built[i : i + 8])) for i in range(0, len(built), 8)]
        out[layout] = float(torch.cat(hits).float().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="model directories")
    p.add_argument("--task", default="kv_retrieval")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--rows", type=int, default=16, help="held-out rows per layout")
    p.add_argument("--length", type=int, default=2048, help="context tokens a row")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    print(f"{args.task}, chunks of {args.chunk_size}, {args.rows} rows of {args.length} tokens a layout, one step")
    print("| model | " + " | ".join(f"{i} {c}" for i, c in LAYOUTS) + " |")
    print("| --- |" + " --- |" * len(LAYOUTS))
    rows = layout_rows(args.task, args.chunk_size, args.rows, args.length, args.seed)
    for path in args.models:
        em = layout_em(load_model(path).model, rows)
        print(f"| {path} | " + " | ".join(f"{v:.3f}" for v in em.values()) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
