"""Held-out exact match while training: does the model copy the right value, not merely the answer's format?

Examples come from the held-out prose split, half dense and half chunked (every chunk visible, as sparse mode with
a large top-K). The whole answer span is masked and predicted in one forward (the denoiser's first step, the
hardest one); a row counts when every token of the answer text and its end token is right. The loss cannot tell
retrieval from guessing the format; this can.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from pdllm.models.transformer import DllmModel
from pdllm.training.data import Batch, Stage, build_example, collate
from pdllm.training.objective import MaskedAttention, attention_mask


def probe_batches(
    stage: Stage, train_length: int, samples: int, seed: int = 7, rows: int = 16
) -> list[tuple[Batch, Tensor, list[str]]]:
    """`samples` held-out examples of the stage's tasks at its longest length, in batches of `rows`, each with a
    [B] bool telling the chunked rows and the rows' task names."""
    rng = random.Random(f"probe:{seed}:{stage.name}")
    length = stage.max_len or train_length
    examples = [
        build_example(
            rng,
            length,
            i % 2 == 1,
            stage.tasks,
            stage.chunk_sizes[-1:],
            split="heldout",
            text_chunks=stage.text_chunks,
            instruction_apart=stage.instruction_apart,
        )
        for i in range(samples)
    ]
    flags = torch.arange(samples) % 2 == 1
    tasks = [e.task for e in examples]
    return [
        (collate(examples[i : i + rows]), flags[i : i + rows], tasks[i : i + rows]) for i in range(0, samples, rows)
    ]


@torch.no_grad()
def exact_match(model: DllmModel, batch: Batch) -> Tensor:
    """[B] bool: the fully masked answer span, argmax in one step, is right on every answer-text token."""
    noisy = torch.where(batch.answer, torch.full_like(batch.ids, model.spec.mask_token_id), batch.ids)
    out = model(noisy, batch.pos, MaskedAttention(attention_mask(batch.seg, batch.full)))
    wrong = (out.logits.argmax(-1) != batch.ids) & batch.core
    return ~wrong.any(-1)


def probe_accuracy(
    model: DllmModel, batches: list[tuple[Batch, Tensor, list[str]]], device: torch.device
) -> dict[str, float]:
    """Exact match over the probe set: all rows, dense rows, chunked rows, and each task's rows (`em_<task>`)."""
    was = model.training
    model.eval()
    hit, chunked, tasks = [], [], []
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for b, flags, names in batches:
        with amp:
            hit.append(exact_match(model, b.to(device)).cpu())
        chunked.append(flags)
        tasks += names
    model.train(was)
    h, c = torch.cat(hit).float(), torch.cat(chunked)
    mean = lambda x: round(float(x.mean()), 3) if x.numel() else float("nan")
    out = {"em": mean(h), "em_dense": mean(h[~c]), "em_chunked": mean(h[c])}
    for task in sorted(set(tasks)):
        out[f"em_{task}"] = mean(h[torch.tensor([t == task for t in tasks])])
    return out
