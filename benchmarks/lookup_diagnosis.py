"""Why a model fails a key -> value lookup: does it find the right needle, or copy whichever value looks like one?

For held-out rows of niah_multikey (2 and 4 needles), kv_retrieval and niah_single, dense and chunked, the whole
answer is masked and predicted in one forward (the probe's setting). Printed per cell: the share of answer tokens
right, of rows right, and, for the pointer head (`objective.pointer_layer`, head 0: what `--pointer-weight` trains),
the share of answer tokens whose strongest attention lands on the byte they copy ("pointer") or on any context token
holding that byte ("same byte": another needle's digit counts), and, for the key head (`objective.key_layer`,
head 0: what `--key-weight` and `--match-weight` train), the share of those tokens whose key-head output is closest
(cosine) to a context value under the right key ("key match", `objective.match_loss`'s accuracy; "-" where a row's
context values all sit under one key). A pointer at 1/needles is a model that does not match keys; a key match near
1 with such a pointer is one whose key head says which key it saw and whose pointer head does not use it. CPU is
enough:

    python benchmarks/lookup_diagnosis.py pdllm/assets/pdllm-tiny-llada --rows 16
"""

from __future__ import annotations

import argparse
import math
import random

import torch

from pdllm.models.loader import load_model
from pdllm.training.data import build_example, collate
from pdllm.training.objective import (
    MaskedAttention,
    attention_mask,
    head_scores,
    key_layer,
    match_loss,
    pointer_layer,
)

CELLS = (("niah_multikey", (2, 2)), ("niah_multikey", (4, 4)), ("kv_retrieval", None), ("niah_single", None))


@torch.no_grad()
def diagnose(
    model, task: str, keys, chunked: bool, rows: int, length: int, seed: int, point_layer: int | None = None
) -> dict[str, float]:
    rng = random.Random(f"diagnosis:{seed}:{task}:{keys}:{chunked}")
    b = collate(
        [build_example(rng, length, chunked, {task: 1.0}, (256,), split="heldout", keys=keys) for _ in range(rows)]
    )
    noisy = torch.where(b.answer, torch.full_like(b.ids, model.spec.mask_token_id), b.ids)
    layer = pointer_layer(model.spec.num_layers) if point_layer is None else point_layer
    keys = key_layer(model.spec.num_layers)
    attention = MaskedAttention(attention_mask(b.seg, b.full), (layer,), (keys,))
    out = model(noisy, b.pos, attention)
    top, valid = head_scores(attention.qk[layer], b.pointer_at, attention.mask).argmax(-1), b.pointer >= 0
    n = valid.sum().item()
    pred = out.logits.argmax(-1)
    match = match_loss(b, attention.head0[keys])[1].item() if task != "niah_single" else float("nan")
    return {
        "token": ((pred == b.ids) & b.core).sum().item() / b.core.sum().item(),
        "row": (~((pred != b.ids) & b.core).any(-1)).float().mean().item(),
        "pointer": ((top == b.pointer) & valid).sum().item() / n,
        "same_byte": ((b.ids.gather(1, top) == b.ids.gather(1, b.pointer.clamp_min(0))) & valid).sum().item() / n,
        "key_match": match,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--length", type=int, default=500, help="context tokens per row (the lookup stages' range)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pointer-layer", type=int, help="the layer the run's --pointer-layer named (default: 3/4 up)")
    args = p.parse_args(argv)
    model = load_model(args.model, device="cpu", dtype=torch.float32).model.eval()
    print(f"{args.model}: {args.rows} rows per cell, {args.length} tokens, whole answer masked, one forward")
    print(
        f"{'task':14s} {'needles':>7s} {'layout':8s} {'token':>6s} {'row':>6s} {'pointer':>8s} {'same byte':>9s} "
        f"{'key match':>9s}"
    )
    for task, keys in CELLS:
        for chunked in (False, True):
            r = diagnose(model, task, keys, chunked, args.rows, args.length, args.seed, args.pointer_layer)
            needles = str(keys[0]) if keys else ("pairs" if task == "kv_retrieval" else "1")
            layout = "chunked" if chunked else "dense"
            match = "-" if math.isnan(r["key_match"]) else f"{r['key_match']:.2f}"
            print(
                f"{task:14s} {needles:>7s} {layout:8s} {r['token']:6.2f} {r['row']:6.2f} {r['pointer']:8.2f} "
                f"{r['same_byte']:9.2f} {match:>9s}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
