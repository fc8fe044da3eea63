"""Training examples as token tensors, in two layouts the engine uses at inference time.

dense:   [BOS] context question answer, positions 0..T-1, everything attends to everything (vanilla / prefix).
chunked: [BOS] chunk_1 [BOS] chunk_2 ... question answer; each chunk has chunk-local positions 0..C and attends only
         to itself (as chunk prefill encodes it); question + answer attend to every chunk and to themselves, at a
         random position offset (the sparse decoder places the question after a selection of chunks).
Prose comes from the training split only; evaluation uses the held-out split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from pdllm.models.tokenizer import BOS, EOS, PAD, special_ids
from pdllm.prompt import QUESTION_TEMPLATE
from pdllm.tasks import TASKS, byte_counter

IDS = special_ids()
BOS_ID, EOS_ID, PAD_ID = IDS[BOS], IDS[EOS], IDS[PAD]
TASK_WEIGHTS = {"passkey": 0.15, "number_string": 0.15, "kv_retrieval": 0.25, "niah_single": 0.2, "niah_multikey": 0.25}
CHUNK_SIZES = (128, 256, 512)
SHORTEST = {"niah_multikey": 600, "niah_single": 400, "kv_retrieval": 400}  # room for preamble, needles, question
QUERY_SEGMENT = -1


@dataclass
class Example:
    ids: list[int]
    pos: list[int]
    seg: list[int]  # chunk index for context tokens (0 for the whole dense context); QUERY_SEGMENT for q + answer
    answer_start: int  # tokens from here on are the answer span (answer text + EOS padding)
    full: bool = False  # dense only: the context also attends to question + answer (vanilla re-encoding)
    pretrain: bool = False  # mask the whole sequence (LLaDA pre-training) instead of only the answer


def byte_ids(text: str) -> list[int]:
    """The byte tokenizer's ids (id == byte), without the tokenizer's per-call overhead."""
    return list(text.encode("utf-8"))


def build_example(rng: random.Random, length: int, chunked: bool, train_length: int, full: bool = False) -> Example:
    task = rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()))[0]
    kw = {"split": "train"}
    if task in ("passkey", "number_string"):
        kw["haystack"] = "noise" if rng.random() < 0.3 else "prose"
    length = max(length, SHORTEST.get(task, 0))
    sample = TASKS[task].make(length, rng.getrandbits(48), byte_counter, None, **kw)  # short lengths allowed
    ctx = byte_ids(sample.context)
    span = byte_ids(QUESTION_TEMPLATE.format(question=sample.question))
    gen = TASKS[task].gen_length
    answer = byte_ids(sample.target)[: gen - 1]
    answer += [EOS_ID] * (gen - len(answer))
    if not chunked:
        ids = [BOS_ID] + ctx + span + answer
        return Example(
            ids,
            list(range(len(ids))),
            [0] * (1 + len(ctx)) + [QUERY_SEGMENT] * (len(span) + gen),
            1 + len(ctx) + len(span),
            full,
        )
    size = rng.choice(CHUNK_SIZES)
    ids, pos, seg = [], [], []
    for c, lo in enumerate(range(0, len(ctx), size)):
        piece = [BOS_ID] + ctx[lo : lo + size]
        ids += piece
        pos += list(range(len(piece)))
        seg += [c] * len(piece)
    tail = span + answer
    hi = max(size + 2, min(len(ids), train_length - len(tail)))
    start = rng.randint(size + 1, hi)
    answer_start = len(ids) + len(span)
    return Example(
        ids + tail, pos + list(range(start, start + len(tail))), seg + [QUERY_SEGMENT] * len(tail), answer_start
    )


@dataclass
class Batch:
    ids: Tensor  # [B, T]
    pos: Tensor  # [B, T]
    seg: Tensor  # [B, T] (padding: -2)
    answer: Tensor  # [B, T] bool: the answer span (where the loss lives)
    full: Tensor  # [B] bool: dense rows whose context attends to everything
    pretrain: Tensor  # [B] bool: rows trained with whole-sequence masking

    def to(self, device) -> Batch:
        fields = (self.ids, self.pos, self.seg, self.answer, self.full, self.pretrain)
        return Batch(*(t.to(device, non_blocking=True) for t in fields))


def collate(examples: list[Example]) -> Batch:
    t = -(-max(len(e.ids) for e in examples) // 8) * 8  # a multiple of 8 keeps SDPA on its fused masked kernel
    b = len(examples)
    ids = torch.full((b, t), PAD_ID, dtype=torch.long)
    pos = torch.zeros((b, t), dtype=torch.long)
    seg = torch.full((b, t), -2, dtype=torch.long)
    answer = torch.zeros((b, t), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n], pos[i, :n], seg[i, :n] = torch.tensor(e.ids), torch.tensor(e.pos), torch.tensor(e.seg)
        answer[i, e.answer_start : n] = True
    flags = [torch.tensor([getattr(e, f) for e in examples]) for f in ("full", "pretrain")]
    return Batch(ids, pos, seg, answer, *flags)


def attention_mask(seg: Tensor, full: Tensor | None = None) -> Tensor:
    """[B, 1, T, T] bool: query q may attend key k. Context sees its own segment (all of it in `full` rows); the
    query span sees all."""
    valid = seg >= QUERY_SEGMENT
    same = seg[:, :, None] == seg[:, None, :]
    query = (seg == QUERY_SEGMENT)[:, :, None] & valid[:, None, :]
    if full is not None:
        query = query | full[:, None, None]
    allowed = (same | query) & valid[:, None, :]
    allowed |= ~valid[:, :, None]  # padding queries attend to anything valid-free: keep rows non-empty
    return allowed[:, None]


class ExampleStream(torch.utils.data.IterableDataset):
    """Endless batches with a token budget; the longest context grows from `min_len` to `max_len` over warmup."""

    def __init__(
        self,
        seed: int,
        tokens_per_batch: int,
        min_len: int,
        max_len: int,
        chunked_frac: float,
        start_step: int = 0,
        ramp_steps: int = 1,
        pretrain_frac: float = 0.0,
        ramp_from: int = 0,
    ) -> None:
        super().__init__()
        self.seed, self.tokens, self.min_len, self.max_len = seed, tokens_per_batch, min_len, max_len
        self.chunked_frac, self.start_step, self.ramp_steps = chunked_frac, start_step, ramp_steps
        self.pretrain_frac, self.ramp_from = pretrain_frac, ramp_from

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        step = self.start_step + wid
        while True:
            rng = random.Random(f"{self.seed}:{step}")
            frac = min(1.0, max(0, step - self.ramp_from) / self.ramp_steps)
            cap = int(self.min_len + frac * (self.max_len - self.min_len))
            top = rng.randint(self.min_len, max(self.min_len, cap))
            n = max(1, self.tokens // top)
            layout = rng.random()
            chunked, full = layout < self.chunked_frac, layout > (1 + self.chunked_frac) / 2
            lengths = [rng.randint(max(self.min_len, int(0.75 * top)), top) for _ in range(n)]
            examples = [build_example(rng, L, chunked, self.max_len, full) for L in lengths]
            for e in examples:
                e.pretrain = rng.random() < self.pretrain_frac
            yield collate(examples)
            step += nw
