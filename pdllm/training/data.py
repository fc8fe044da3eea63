"""Training examples as token tensors, in the layouts the engine uses at inference time, and the curriculum.

dense:   [BOS] context question answer, positions 0..T-1, everything attends to everything (vanilla / prefix).
chunked: [BOS] chunk_1 [BOS] chunk_2 ... question answer; each chunk has chunk-local positions 0..C and attends only
         to itself (as chunk prefill encodes it); question + answer attend to every chunk and to themselves, starting
         at the longest chunk's length, exactly where the sparse decoder places them.
The answer span is the answer text, its end token, and end-token padding up to the task's generation length; the
`core` part (text + first end token) is what the loss concentrates on. Chunked rows also record which chunk holds
the answer, for the chunk-ranking loss. Prose comes from the training split only; evaluation uses the held-out one.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import multiprocessing
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from pdllm.errors import InvalidRequest
from pdllm.method.boundaries import TextBreaks
from pdllm.method.chunks import split_chunks
from pdllm.models.tokenizer import BOS, EOS, PAD, build_byte_tokenizer, special_ids
from pdllm.prompt import QUESTION_TEMPLATE
from pdllm.tasks import HELDOUT_TASKS, TASKS, byte_counter, facts, infinitebench, ruler

IDS = special_ids()
BOS_ID, EOS_ID, PAD_ID = IDS[BOS], IDS[EOS], IDS[PAD]
ALL_TASKS = {"passkey": 0.15, "number_string": 0.15, "kv_retrieval": 0.25, "niah_single": 0.2, "niah_multikey": 0.25}
VARIED_TASKS = {  # the official tasks plus facts in trained wordings, values of every kind, with distractor facts
    "passkey": 0.1,
    "number_string": 0.1,
    "kv_retrieval": 0.2,
    "niah_single": 0.12,
    "niah_multikey": 0.2,
    "facts": 0.28,
}
LOOKUP_TASKS = {  # the key -> value stage: every row must find its key among others before it copies the value
    "niah_multikey": 0.3,
    "kv_retrieval": 0.3,
    "facts": 0.25,
    "niah_single": 0.1,
    "passkey": 0.05,
}
SHORTEST = {
    "passkey": 270,
    "number_string": 310,
    "kv_retrieval": 300,
    "niah_single": 330,
    "niah_multikey": 520,
    "facts": 420,
}
ASKED_TASKS = ("niah_multikey", "kv_retrieval")  # tasks whose rows may ask about several keys (Stage.queries)
QUERY_SEGMENT = -1  # a row's (first) question and answer
PAD_SEGMENT = -2  # padding; extra questions of a row take -3, -4, ... (extra_segment)
ROW_FLAGS = ("full", "pretrain", "needle_seg", "ranked_from")  # Example's one-per-row fields, in Batch's order


@dataclass(frozen=True)
class Stage:
    """One step of the curriculum: which tasks, how long the contexts, which chunk sizes. Training moves on to the
    next stage once the held-out exact match (probe.py) reaches `advance_at`, or at the latest when `until` of the
    planned run (its time, or its steps: train.planned_frac) is done (None: the last stage)."""

    name: str
    tasks: dict[str, float]
    min_len: int
    max_len: int  # 0: the training length
    chunk_sizes: tuple[int, ...]
    advance_at: float | None
    until: float | None
    long_values: float = 0.2  # share of passkey / number_string rows whose value has 5-32 digits
    keys: tuple[int, int] | None = None  # niah_multikey rows draw this many needles (None: the benchmark's 4)
    queries: int = 1  # questions per row of the `asking` tasks (build_example)
    asking: tuple[str, ...] = ASKED_TASKS  # ... and those tasks (KEYED_TASKS in the recall_facts mixes)
    wording: str = "train"  # facts rows' needles and questions: "train" templates, "varied", "broad", "open" (facts)
    text_chunks: float = 0.0  # share of chunked rows cut as `chunking: text` serves them (at text borders)
    notes: float = 0.0  # share of facts rows that are a user's short note, not a document (facts.facts `note`)
    instruction_apart: bool = False  # chunked rows: a task's instruction is a chunk of its own, as the engine keeps it


COPY_TASKS = {"passkey": 0.6, "number_string": 0.4}
COPY_STAGE = Stage("copy", COPY_TASKS, 270, 400, (64, 128), 0.5, 0.3, long_values=0.7)
# Short rows of the tasks that need a key matched before a value is copied: kv_retrieval at 300-640 tokens holds
# 1-5 pairs (one pair: a plain 36-character copy), niah_multikey 2-4 needles, facts 2-5 subjects.
LOOKUP_STAGE = Stage("lookup", LOOKUP_TASKS, 300, 640, (64, 128, 256), 0.6, 0.35, keys=(2, 4))
# The same lookup rows, each asking about up to 4 of its keys, for most of the run (the `recall` mix).
RECALL_TASKS = {"niah_multikey": 0.4, "kv_retrieval": 0.4, "niah_single": 0.1, "passkey": 0.1}
RECALL_STAGE = Stage("recall", RECALL_TASKS, 300, 900, (128, 256), 0.8, 0.6, keys=(2, 4), queries=4)
# `reading` (the bundled model's recipe after the official run): the recall stage until 80% of the time, because the
# lookup appears as a phase change after ~4000 recall steps and not before (NOTES, "The lookup learned").
READING_RECALL_STAGE = dataclasses.replace(RECALL_STAGE, until=0.8)
# `recall_facts`: reading with facts asked several questions too (their subjects are the keys), and more kv rows,
# whose lookup reading did not learn (NOTES, "The bundle reads multi-key needles").
KEYED_TASKS = (*ASKED_TASKS, "facts")
RECALL_FACTS_TASKS = {"kv_retrieval": 0.45, "facts": 0.3, "niah_multikey": 0.15, "niah_single": 0.05, "passkey": 0.05}
RECALL_FACTS_STAGE = dataclasses.replace(READING_RECALL_STAGE, tasks=RECALL_FACTS_TASKS, asking=KEYED_TASKS)
# `recall_facts_long`: the same rows out to the training length, where kv's chunk is ranked among many and most of
# a row's pairs lie in chunks the question does not need (recall_facts read kv at 2K, rarely at 8K and beyond).
RECALL_FACTS_LONG_STAGE = dataclasses.replace(RECALL_FACTS_STAGE, min_len=600, max_len=0)
# `recall_wordings`: recall_facts_long whose facts are worded by the `varied` grammar in every stage (held-out
# wordings were read half the time at 2K: the model had learned a dozen sentences, not the binding of a value to
# its subject), and whose ranking loss ranks each question against the chunks of every row of the batch.
RECALL_WORDINGS_STAGE = dataclasses.replace(RECALL_FACTS_LONG_STAGE, wording="varied")
# `recall_broad`: recall_wordings in the `broad` wording (the varied grammar plus the orders it lacks: a value inside
# the sentence before its subject, a subject and value held apart; questions asked as requests). Held-out wordings
# were misread most in the first of those orders.
RECALL_BROAD_STAGE = dataclasses.replace(RECALL_FACTS_LONG_STAGE, wording="broad")
# `recall_open`: recall_wordings in the `open` wording (broad, with the value before its subject joined by any of
# dozens of links: the bundle had learned only "is" and "as" there).
RECALL_OPEN_STAGE = dataclasses.replace(RECALL_FACTS_LONG_STAGE, wording="open")


@dataclass(frozen=True)
class Mix:
    """A training mix: the `tasks` stage's task weights and time limit, the key -> value stage between copy and
    tasks (None: none), and how many questions the later stages' rows of the `asking` tasks carry."""

    tasks: dict[str, float]
    until: float
    lookup: Stage | None = None
    queries: int = 1
    asking: tuple[str, ...] = ASKED_TASKS
    wording: str = "train"
    rank_across_rows: bool = False  # the ranking loss's negatives: the row's own chunks, or every row's (objective.py)
    text_chunks: float = 0.0  # every stage's Stage.text_chunks
    notes: float = 0.0  # every stage's Stage.notes


MIXES = {
    "official": Mix(ALL_TASKS, 0.55),
    "varied": Mix(VARIED_TASKS, 0.6),
    "lookup": Mix(VARIED_TASKS, 0.7, LOOKUP_STAGE),
    "recall": Mix(VARIED_TASKS, 0.85, RECALL_STAGE, queries=2),
    "reading": Mix(VARIED_TASKS, 0.9, READING_RECALL_STAGE, queries=2),
    "recall_facts": Mix(VARIED_TASKS, 0.9, RECALL_FACTS_STAGE, queries=2, asking=KEYED_TASKS),
    "recall_facts_long": Mix(VARIED_TASKS, 0.9, RECALL_FACTS_LONG_STAGE, queries=2, asking=KEYED_TASKS),
    "recall_wordings": Mix(
        VARIED_TASKS, 0.9, RECALL_WORDINGS_STAGE, 2, KEYED_TASKS, wording="varied", rank_across_rows=True
    ),
    "recall_text": Mix(
        VARIED_TASKS, 0.9, RECALL_WORDINGS_STAGE, 2, KEYED_TASKS, "varied", rank_across_rows=True, text_chunks=0.8
    ),
    "recall_broad": Mix(VARIED_TASKS, 0.9, RECALL_BROAD_STAGE, 2, KEYED_TASKS, "broad", rank_across_rows=True),
    "recall_open": Mix(VARIED_TASKS, 0.9, RECALL_OPEN_STAGE, 2, KEYED_TASKS, "open", rank_across_rows=True),
    # recall_open with a fifth of its facts rows a user's short note (1-5 facts, up to two sentences of prose, no
    # preface): recall_open had read only documents of 600+ tokens for its last 5500 steps and misread "The vault
    # code is 4471-KESTREL." asked alone
    "recall_notes": Mix(VARIED_TASKS, 0.9, RECALL_OPEN_STAGE, 2, KEYED_TASKS, "open", rank_across_rows=True, notes=0.2),
}


def curriculum(
    mix: str = "official", text_chunks: float | None = None, instruction_apart: bool = False
) -> tuple[Stage, ...]:
    """The stages for a training mix: `official` (the five benchmark tasks; the bundled model's first run), `varied`
    (plus facts in many wordings and value kinds), `lookup` (varied with a key -> value stage after the copy
    stage, for the tasks that need a key matched: niah_multikey, kv_retrieval, facts) or `recall` (varied with
    a longer key -> value stage whose rows ask about several keys of one context, and two questions per lookup
    row after it) or `reading` (recall with its key -> value stage kept to 80% of the time) or `recall_facts`
    (reading whose rows of facts, keyed by subject, are asked several questions too, with more kv rows) or
    `recall_facts_long` (its recall rows out to the training length) or `recall_wordings` (recall_facts_long with
    facts in the `varied` grammar's wordings and the ranking loss across rows) or `recall_text` (recall_wordings
    with 80% of its chunked rows cut at text borders, as `chunking: text` serves contexts) or `recall_broad`
    (recall_wordings in the `broad` wording: more sentence orders) or `recall_open` (in the `open` wording: a value
    before its subject joined by any of dozens of links) or `recall_notes` (recall_open with a fifth of its facts
    rows a user's short note). `text_chunks` sets every stage's share of chunked rows cut at text borders (None: the
    mix's own); `instruction_apart` makes each chunked row's instruction a chunk of its own (Stage)."""
    if mix not in MIXES:
        raise ValueError(f"unknown training mix {mix!r}; choose from {', '.join(MIXES)}")
    m = MIXES[mix]
    later = {"queries": m.queries, "asking": m.asking, "wording": m.wording}
    stages = (
        COPY_STAGE,
        *((m.lookup,) if m.lookup else ()),
        Stage("tasks", m.tasks, 270, 768, (128, 256), 0.4, m.until, **later),
        Stage("long", m.tasks, 400, 0, (128, 256, 512), None, None, **later),
    )
    if text_chunks is not None and not 0.0 <= text_chunks <= 1.0:
        raise ValueError(f"text_chunks is a share of the chunked rows, 0 to 1; got {text_chunks}")
    cut = m.text_chunks if text_chunks is None else text_chunks
    every = {k: v for k, v in (("text_chunks", cut), ("notes", m.notes), ("instruction_apart", instruction_apart)) if v}
    return tuple(dataclasses.replace(s, **every) for s in stages) if every else stages


CURRICULUM = curriculum("official")
LONG_VALUE_SPAN = 48  # answer span of a long-value row (value + end token + padding)


@dataclass
class Example:
    ids: list[int]
    pos: list[int]
    seg: list[int]  # chunk index for context tokens (0 for the whole dense context); QUERY_SEGMENT for q + answer
    answer_start: int  # tokens from here on are the (first question's) answer span (answer text + EOS padding)
    core_len: int  # answer text + first EOS: the tokens the loss is about
    question: list[int]  # the templated question alone (chunk ranking runs it on its own)
    needle_seg: int = -1  # chunked rows: the chunk holding the answer (-1: unknown or dense)
    ranked_from: int = 0  # chunks before this one (an instruction kept apart) are kept, never ranked, as served
    full: bool = False  # dense only: the context also attends to question + answer (vanilla re-encoding)
    pretrain: bool = False  # mask the whole sequence (LLaDA pre-training) instead of only the answer
    task: str = ""
    pointer_at: list[int] = field(default_factory=list)  # answer tokens that copy a context token ...
    pointer: list[int] = field(default_factory=list)  # ... and the index of the token each copies
    extra: list[tuple[int, int, int]] = field(default_factory=list)  # other questions' answers: (start, core, len)
    key_from: list[int] = field(default_factory=list)  # value tokens (context and answers) whose key is known ...
    key_span: list[tuple[int, int]] = field(default_factory=list)  # ... and that key's index range [lo, hi)


@functools.cache
def byte_tokenizer():
    """The byte tokenizer, built once per process (data-loader workers each keep their own)."""
    return build_byte_tokenizer()


def byte_breaks() -> TextBreaks:
    """The byte tokenizer's text borders (training rows cut as `chunking: text` serves them)."""
    return TextBreaks.of(byte_tokenizer())


def byte_ids(text: str) -> list[int]:
    """The byte tokenizer's ids (id == byte), without the tokenizer's per-call overhead."""
    return list(text.encode("utf-8"))


def answer_offset(sample) -> int:
    """Byte offset of the queried value in the prompt text (instruction + context): inside its needle sentence when
    the task records it (a word value may also occur in the prose), else its first occurrence in the context; -1 if
    absent."""
    value = sample.answers[0].encode()
    text, ctx = sample.prompt_text.encode(), sample.context.encode()
    base = text.find(ctx)  # the instruction, when the task has one, comes first
    needles = sample.meta.get("needles")
    if needles:
        at = ctx.find(needles[0].encode())
        if at >= 0:
            return base + at + needles[0].encode().find(value)
    at = ctx.find(value)
    return base + at if at >= 0 else -1


def value_offsets(sample) -> tuple[int, int, int]:
    """(byte offset of the value in the prompt text or -1, its offset in the answer text, its length in bytes)."""
    value = sample.answers[0].encode()
    return answer_offset(sample), sample.target.encode().find(value), len(value)


def pointers(core_len: int, offsets: tuple[int, int, int], index) -> list[int]:
    """The context index each answer-text token copies (`index` maps a prompt byte offset to an index in the
    row), -1 for tokens that copy nothing (the leading space, the end token) or when the value is not found."""
    at, off, n = offsets
    if at < 0 or off < 0:
        return [-1] * core_len
    return [index(at + j - off) if off <= j < off + n else -1 for j in range(core_len)]


OTHER_QUESTIONS = {
    "niah_multikey": ruler.niah_other_questions,
    "kv_retrieval": infinitebench.kv_other_questions,
    "facts": facts.facts_other_questions,
}
KEY_SPANS = {  # (key start, key end, value start, value end) prompt byte offsets of a sample's key -> value pairs
    "niah_single": ruler.niah_key_spans,
    "niah_multikey": ruler.niah_key_spans,
    "kv_retrieval": infinitebench.kv_key_spans,
    "facts": facts.facts_key_spans,
}


def extra_segment(i: int) -> int:
    """The segment of a row's i-th extra question (i >= 1): below the padding's, so each is a query of its own."""
    return PAD_SEGMENT - i


def answer_span(text: str, gen: int) -> tuple[list[int], int]:
    """(the answer's ids padded with end tokens to `gen`, its core length: answer text + first end token)."""
    answer = byte_ids(text)[: gen - 1]
    core = len(answer) + 1
    return answer + [EOS_ID] * (gen - len(answer)), core


def build_example(
    rng: random.Random,
    length: int,
    chunked: bool,
    tasks: dict[str, float] | None = None,
    chunk_sizes: tuple[int, ...] = (128, 256, 512),
    full: bool = False,
    split: str = "train",
    long_values: float = 0.0,
    keys: tuple[int, int] | None = None,
    queries: int = 1,
    asking: tuple[str, ...] = ASKED_TASKS,
    wording: str = "train",
    text_chunks: float = 0.0,
    notes: float = 0.0,
    instruction_apart: bool = False,
) -> Example:
    """One example; `long_values` of the passkey / number_string rows get a 5-32 digit value: a needle in the
    official wording with more to copy, so a row teaches copying at many offsets, not one 5-digit guess. `keys`
    (lo, hi): niah_multikey rows hold that many needles (fewer distractors than the benchmark's 4). `queries` > 1:
    rows of the `asking` tasks (niah_multikey, kv_retrieval, facts; not dense-full rows) also ask about up to
    queries - 1 other keys of the same context, each question and answer placed where the engine places a lone one
    and attending only to the context and itself: answers that differ only by their key are what teach a small
    model to match it. Facts rows carry their subjects as keys (the key and match losses) only when asked, and are
    worded from `wording`'s templates (facts.py), `notes` of them a short note. `text_chunks` of the chunked rows end
    their chunks at text borders (pdllm.method.chunks.split_chunks), the rest every `size` tokens. With
    `instruction_apart` a chunked row's instruction (the task's text before its context) is a chunk of its own and
    the context is cut from its start, as the engine lays a prompt out (prompt.py, method.instruction); otherwise
    the instruction heads the first chunk, and every cut after it sits that many tokens later than served."""
    tasks = tasks or ALL_TASKS
    task = rng.choices(list(tasks), weights=list(tasks.values()))[0]
    if task in HELDOUT_TASKS:
        raise ValueError(f"{task} is held out of training: its wordings are only for evaluation")
    kw: dict = {"split": split}
    gen = TASKS[task].gen_length
    if task in ("passkey", "number_string"):
        kw["haystack"] = "noise" if rng.random() < 0.3 else "prose"
        if rng.random() < long_values:
            kw["digits"], gen = rng.randint(5, 32), LONG_VALUE_SPAN
    if task == "facts":
        kw["wording"] = wording
        if notes and rng.random() < notes:  # no draw for mixes without notes
            kw["note"] = True
    if task == "niah_multikey" and keys is not None:
        kw["keys"] = rng.randint(*keys)
    length, seed = max(length, SHORTEST[task]), rng.getrandbits(48)
    while True:  # long keys or needles can leave a short target no room for haystack: lengthen it
        try:
            sample = TASKS[task].make(length, seed, byte_counter, None, **kw)
            break
        except InvalidRequest:
            length += 32
    ctx = byte_ids(sample.prompt_text)  # the instruction stays at the start, where the engine keeps it
    text = sample.prompt_text.encode()
    asked = [(sample.question, sample.target, value_offsets(sample))]
    keyed = task in KEY_SPANS and (task != "facts" or task in asking)  # facts carry keys only when asked
    pairs = KEY_SPANS[task](sample) if keyed else []
    value_at = {text[vs:ve]: vs for _, _, vs, ve in reversed(pairs)}  # a value where its key names it
    if queries > 1 and not full and task in asking:
        others = OTHER_QUESTIONS[task](sample)
        rng.shuffle(others)
        for question, value in others[: queries - 1]:
            raw = value.encode()
            asked.append((question, " " + value, (value_at.get(raw, text.find(raw)), 1, len(raw))))
    if not chunked:
        ids, pos, seg = [BOS_ID] + ctx, list(range(1 + len(ctx))), [0] * (1 + len(ctx))
        index, chunk_of, needle_seg, ranked_from = (lambda p: 1 + p), (lambda p: 0), -1, 0
    else:
        size = rng.choice(chunk_sizes)
        text_cut = text_chunks > 0 and rng.random() < text_chunks  # no draw for mixes without text chunks
        head = len(byte_ids(sample.instruction)) if instruction_apart else 0  # the prompt opens with its instruction
        cut = split_chunks(ctx[head:], size, byte_breaks() if text_cut else None)
        pieces = [ctx[:head], *cut] if head else cut
        ranked_from = 1 if head else 0
        starts = list(itertools.accumulate((len(p) for p in pieces[:-1]), initial=0))
        ids, pos, seg = [], [], []
        for c, piece in enumerate(pieces):
            ids += [BOS_ID] + piece
            pos += list(range(1 + len(piece)))
            seg += [c] * (1 + len(piece))
        chunk_of = lambda p: bisect.bisect_right(starts, p) - 1  # noqa: E731
        index = lambda p: p + chunk_of(p) + 1  # noqa: E731  (one BOS before each chunk up to p's)
        at = asked[0][2][0]
        needle_seg = chunk_of(at) if at >= 0 else -1
    start = max(pos) + 1  # dense: right after the context; chunked: after the longest chunk, as the sparse decoder
    key_from, key_span = [], []
    for ks, ke, vs, ve in pairs:  # a value token and its key in the same chunk: the key it sits under
        for p in range(vs, ve):
            if chunk_of(ks) == chunk_of(ke - 1) == chunk_of(p):
                key_from.append(index(p))
                key_span.append((index(ks), index(ke - 1) + 1))
    key_of = {text[vs:ve]: text[ks:ke] for ks, ke, vs, ve in pairs}
    spans, pointer_at, pointer = [], [], []
    for i, (question, target, offsets) in enumerate(asked):
        span = byte_ids(QUESTION_TEMPLATE.format(question=question))
        answer, core = answer_span(target, gen)
        tail = span + answer
        begin = len(ids) + len(span)
        spans.append((begin, core, gen))
        copied = [(begin + j, p) for j, p in enumerate(pointers(core, offsets, index)) if p >= 0]
        pointer_at += [a for a, _ in copied]
        pointer += [p for _, p in copied]
        key = key_of.get(target.strip().encode())
        at = bytes(span).lower().find(key.lower()) if key else -1  # a fact's subject may open its needle
        if at >= 0:  # answer tokens: the key as the question names it
            key_from += [a for a, _ in copied]
            key_span += [(len(ids) + at, len(ids) + at + len(key))] * len(copied)
        ids += tail
        pos += list(range(start, start + len(tail)))
        seg += [QUERY_SEGMENT if i == 0 else extra_segment(i)] * len(tail)
        if i == 0:
            question_ids = span
    begin, core, _ = spans[0]
    return Example(
        ids,
        pos,
        seg,
        begin,
        core,
        question_ids,
        needle_seg=needle_seg,
        ranked_from=ranked_from,
        full=full,
        task=task,
        pointer_at=pointer_at,
        pointer=pointer,
        extra=spans[1:],
        key_from=key_from,
        key_span=key_span,
    )


@dataclass
class Batch:
    ids: Tensor  # [B, T]
    pos: Tensor  # [B, T]
    seg: Tensor  # [B, T] (padding: -2)
    answer: Tensor  # [B, T] bool: the answer span
    core: Tensor  # [B, T] bool: the answer text and its first end token
    full: Tensor  # [B] bool: dense rows whose context attends to everything
    pretrain: Tensor  # [B] bool: rows trained with whole-sequence masking
    needle_seg: Tensor  # [B] long: chunk holding the answer (-1: none)
    ranked_from: Tensor  # [B] long: the first chunk the ranking loss may rank (1 past an instruction kept apart)
    question: Tensor  # [B, Q] the question alone, padded with PAD
    question_valid: Tensor  # [B, Q] bool
    pointer_at: Tensor  # [B, P] long: answer tokens that copy a context token (padding: 0) ...
    pointer: Tensor  # [B, P] long: ... the context index each copies (padding: -1)
    key_from: Tensor  # [B, K] long: value tokens whose key is known (padding: 0) ...
    key_lo: Tensor  # [B, K] long: ... the first index of that key ...
    key_hi: Tensor  # [B, K] long: ... and one past its last (padding: 0, an empty range)

    def to(self, device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in vars(self).values()))


def padded(rows: list[list[int]], width: int, fill: int) -> Tensor:
    """[len(rows), width] long: each row left-aligned, `fill` after it (numpy: ~8x faster than torch.tensor)."""
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def collate(examples: list[Example]) -> Batch:
    t = -(-max(len(e.ids) for e in examples) // 8) * 8  # a multiple of 8 keeps SDPA on its fused masked kernel
    tq = max(len(e.question) for e in examples)
    b = len(examples)
    answer = np.zeros((b, t), dtype=bool)
    core = np.zeros((b, t), dtype=bool)
    question_valid = np.zeros((b, tq), dtype=bool)
    for i, e in enumerate(examples):
        first = (e.answer_start, e.core_len, (e.extra[0][0] if e.extra else len(e.ids)) - e.answer_start)
        for begin, n_core, n in (first, *e.extra):
            answer[i, begin : begin + n] = True
            core[i, begin : begin + n_core] = True
        question_valid[i, : len(e.question)] = True
    flags = [torch.tensor([getattr(e, f) for e in examples]) for f in ROW_FLAGS]
    return Batch(
        padded([e.ids for e in examples], t, PAD_ID),
        padded([e.pos for e in examples], t, 0),
        padded([e.seg for e in examples], t, PAD_SEGMENT),
        torch.from_numpy(answer),
        torch.from_numpy(core),
        *flags,
        padded([e.question for e in examples], tq, PAD_ID),
        torch.from_numpy(question_valid),
        padded([e.pointer_at for e in examples], max(1, *(len(e.pointer) for e in examples)), 0),
        padded([e.pointer for e in examples], max(1, *(len(e.pointer) for e in examples)), -1),
        *key_tensors(examples),
    )


def key_tensors(examples: list[Example]) -> tuple[Tensor, Tensor, Tensor]:
    width = max(1, *(len(e.key_from) for e in examples))
    return (
        padded([e.key_from for e in examples], width, 0),
        padded([[lo for lo, _ in e.key_span] for e in examples], width, 0),
        padded([[hi for _, hi in e.key_span] for e in examples], width, 0),
    )


def attention_mask(seg: Tensor, full: Tensor | None = None) -> Tensor:
    """[B, 1, T, T] bool: query q may attend key k. Context sees its own segment (all of it in `full` rows); a
    question and its answer see the whole context and themselves (not a row's other questions); no one sees padding."""
    valid = seg != PAD_SEGMENT
    same = seg[:, :, None] == seg[:, None, :]
    asking = (seg == QUERY_SEGMENT) | (seg < PAD_SEGMENT)
    query = asking[:, :, None] & (seg >= 0)[:, None, :]
    if full is not None:
        query = query | full[:, None, None]
    allowed = (same | query) & valid[:, None, :]
    # a padding query sees itself alone: its row is not empty, and FlexAttention (training.flex, the same rule)
    # computes one block for it, not the row's every block; what it reads is never scored
    allowed |= ~valid[:, :, None] & torch.eye(seg.shape[1], dtype=torch.bool, device=seg.device)
    return allowed[:, None]


def stage_lengths(rng: random.Random, stage: Stage, train_length: int, tokens: int) -> list[int]:
    """Context lengths of one batch: a longest length drawn in the stage's range, rows within 75% of it."""
    hi = stage.max_len or train_length
    top = rng.randint(stage.min_len, max(stage.min_len, hi))
    return [rng.randint(max(stage.min_len, int(0.75 * top)), top) for _ in range(max(1, tokens // top))]


def make_batch(rng: random.Random, stage: Stage, train_length: int, tokens: int, fracs: tuple[float, float]) -> Batch:
    """One batch of `stage`, in one layout: chunked with probability fracs[0], else dense (prefix or full);
    fracs[1] of the rows use whole-sequence masking."""
    layout = rng.random()
    chunked = layout < fracs[0]
    full = not chunked and rng.random() < 0.5
    examples = []
    for n in stage_lengths(rng, stage, train_length, tokens):
        e = build_example(
            rng,
            n,
            chunked,
            stage.tasks,
            stage.chunk_sizes,
            full,
            long_values=stage.long_values,
            keys=stage.keys,
            queries=stage.queries,
            asking=stage.asking,
            wording=stage.wording,
            text_chunks=stage.text_chunks,
            instruction_apart=stage.instruction_apart,
            notes=stage.notes,
        )
        e.pretrain = rng.random() < fracs[1]
        examples.append(e)
    return collate(examples)


class ExampleStream(torch.utils.data.IterableDataset):
    """Endless batches with a token budget, from the curriculum stage held in a shared integer (the training loop
    advances it; data-loader workers read it before each batch)."""

    def __init__(
        self,
        seed: int,
        tokens_per_batch: int,
        train_length: int,
        chunked_frac: float,
        start_step: int = 0,
        pretrain_frac: float = 0.0,
        stage: int = 0,
        mix: str = "official",
        stages: tuple[Stage, ...] | None = None,
    ) -> None:
        super().__init__()
        self.stages = stages or curriculum(mix)  # `stages`: the mix's as a run lays them out (train.run_stages)
        self.seed, self.tokens, self.train_length = seed, tokens_per_batch, train_length
        self.fracs = (chunked_frac, pretrain_frac)
        self.start_step = start_step
        self.stage = multiprocessing.Value("i", stage)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        step = self.start_step + wid
        while True:
            rng = random.Random(f"{self.seed}:{step}")
            stage = self.stages[min(self.stage.value, len(self.stages) - 1)]
            yield make_batch(rng, stage, self.train_length, self.tokens, self.fracs)
            step += nw
