"""How much of a training step is padding: the share of a batch's positions that are padding (what the compiled
stack's per-token parts skip with train.py --pack-tokens), and the blocks FlexAttention computes when a padding
query sees every key (the rule until 2026-12-07) against when it sees itself alone (data.attention_mask now). Counts,
not times: the batches are those a run's loader draws (seed:step, half of them chunked), on the CPU.

    python benchmarks/padding_blocks.py --tokens 65536 --batches 8 --json benchmarks/results/padding_blocks.json
"""

from __future__ import annotations

import argparse
import json
import random

import torch
from torch.nn.attention.flex_attention import create_block_mask

from pdllm.training.data import PAD_SEGMENT, curriculum, make_batch
from pdllm.training.flex import allowed

# the chain's mixes at their recall stage (80% of a recall run's steps), and the tasks and long stages
CELLS = (
    ("reading", "recall"),
    ("recall_facts", "recall"),
    ("recall_facts_long", "recall"),
    ("recall_wordings", "recall"),
    ("recall_open", "recall"),
    ("reading", "tasks"),
    ("reading", "long"),
)


def padding_sees_all(seg: torch.Tensor, full: torch.Tensor):
    """The mask rule before 2026-12-07: a padding query sees every key (its block row computed whole)."""
    now = allowed(seg, full)
    return lambda b, h, q, k: now(b, h, q, k) | (seg[b, q] == PAD_SEGMENT)


def computed_blocks(rule, seg: torch.Tensor) -> int:
    """Blocks (128 x 128) FlexAttention computes under `rule`: partial and full."""
    b, t = seg.shape
    mask = create_block_mask(rule, b, None, t, t, device="cpu", _compile=False)
    full = 0 if mask.full_kv_num_blocks is None else int(mask.full_kv_num_blocks.sum())
    return int(mask.kv_num_blocks.sum()) + full


def count(mix: str, stage_name: str, tokens: int, length: int, batches: int, seed: int) -> dict:
    stage = next(s for s in curriculum(mix) if s.name == stage_name)
    padding = positions = before = now = 0
    for step in range(batches):
        batch = make_batch(random.Random(f"{seed}:{step}"), stage, length, tokens, (0.5, 0.0))
        padding += int((batch.seg == PAD_SEGMENT).sum())
        positions += batch.seg.numel()
        before += computed_blocks(padding_sees_all(batch.seg, batch.full), batch.seg)
        now += computed_blocks(allowed(batch.seg, batch.full), batch.seg)
    return {"mix": mix, "stage": stage_name, "batches": batches, "padding_share": padding / positions,
            "blocks_before": before, "blocks_now": now, "blocks_now_share": now / before}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=65536, help="tokens a batch (train.py --tokens-per-batch)")
    p.add_argument("--length", type=int, default=2048, help="training length (train.py --max-len)")
    p.add_argument("--batches", type=int, default=8, help="batches a cell")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    rows = [count(mix, stage, args.tokens, args.length, args.batches, args.seed) for mix, stage in CELLS]
    print(f"{args.tokens} tokens a batch, {args.batches} batches a cell, seed {args.seed}")
    print(f"{'mix / stage':<28} {'padding':>8} {'blocks before':>14} {'blocks now':>11} {'now/before':>11}")
    for r in rows:
        print(f"{r['mix'] + ' / ' + r['stage']:<28} {r['padding_share']:>8.3f} {r['blocks_before']:>14} "
              f"{r['blocks_now']:>11} {r['blocks_now_share']:>11.3f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
