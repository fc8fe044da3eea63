"""Chunk selection on a model (default: the bundled one): top-K hit rate of the needle's chunk and answer accuracy.
Summary vs draft scoring, reuse vs joint selected KV, with the needle in the trained passkey wording, in other words,
or of any task.

"trained" and "other" samples are InfiniteBench passkey prompts over held-out prose (the task's instruction kept
apart); "other" replaces the needle sentence and the question by a paraphrase the model never saw in training. Any
task name (kv_retrieval, heldout_wording, ...) takes that task's own sample; its needle is the queried fact's
sentence (facts tasks) or the answer's first place in the context (the rest: for kv_retrieval, the queried pair's
value). A hit means a chunk holding part of the needle is among the top-K, a whole hit that every chunk holding part
of it is (a value cut by a chunk border needs both chunks). Every sample runs in every cell, chunk KV shared.

    python benchmarks/eval_selection.py --cells 8192:4,32768:2 --out benchmarks/results/selection
    python benchmarks/eval_selection.py --wordings kv_retrieval,heldout_wording --chunk-size 256 --cells 16384:8
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace

import torch
from pdllm.decode_node.engine import instruction_first

from pdllm.assets import default_model_dir
from pdllm.engine import engine_for
from pdllm.evaluation.runner import sampler_for
from pdllm.method import ChunkCache, MethodConfig, chunk_context
from pdllm.method.config import CHUNKINGS
from pdllm.method.instruction import instruction_kv
from pdllm.method.joint import decode_joint
from pdllm.method.ranking import rank
from pdllm.models.loader import load_model
from pdllm.prompt import encode_request
from pdllm.sampler import strip_after_eos
from pdllm.tasks import make_sample, score, tokenizer_counter

TRAINED = ("The pass key is {v}. Remember it. {v} is the pass key.", "What is the pass key?")
OTHER = ("Keep this in mind: the secret code for the vault is {v}.", "What is the secret code for the vault?")
PASSKEY_WORDINGS = ("trained", "other")


def byte_span(context: str, text: str) -> tuple[int, int]:
    """Byte offsets of the first `text` in `context` (chunks are cut in tokens, bytes for the bundled tokenizer)."""
    start = len(context[: context.index(text)].encode())
    return start, start + len(text.encode())


def task_of(wording: str) -> str:
    """The task whose metric scores a `wording` row."""
    return "passkey" if wording in PASSKEY_WORDINGS else wording


def sample_in(lm, length: int, seed: int, wording: str):
    """(instruction, context, question, value, needle byte span) of one sample in `wording`."""
    count = tokenizer_counter(lm.tokenizer)
    if wording not in PASSKEY_WORDINGS:
        s = make_sample(wording, length, seed, count)
        needle = s.meta["needles"][0] if "needles" in s.meta else s.answers[0]  # facts: the queried fact's sentence
        return s.instruction, s.context, s.question, s.answers[0], byte_span(s.context, needle)
    s = make_sample("passkey", length, seed, count, haystack="prose", split="heldout")
    value = s.answers[0]
    needle, question = TRAINED if wording == "trained" else OTHER
    trained_needle = TRAINED[0].format(v=value)
    context = s.context.replace(trained_needle, needle.format(v=value))
    return s.instruction, context, question, value, byte_span(context, needle.format(v=value))


def answer(lm, req, chunks, picked, method, sampler, instruction) -> str:
    """The engine's sparse path after ranking (engine.sparse_tokens), so one ranking serves reuse and joint."""
    if method.selected_kv == "joint":
        tokens = [c.tokens for c in (chunks[i] for i in picked)]
        out = decode_joint(lm, req.question_ids, tokens, method, sampler, req.instruction_ids)
    else:
        selected = {c.chunk_id: c for c in (chunks[i] for i in picked)}
        if instruction is not None:
            selected[instruction.chunk_id] = instruction
        cids, whole = instruction_first([chunks[i].chunk_id for i in picked], instruction)
        fetch = lambda need: {c: selected[c] for c in need}  # noqa: E731
        out, _ = engine_for(lm).run(req.question_ids, cids, fetch, method, sampler, whole=whole)
    spec = lm.spec
    return lm.tokenizer.decode(strip_after_eos(out.tokens, spec.eos_token_ids, spec.mask_token_id))


def chunks_holding(pieces: list[list[int]], lo: int, hi: int) -> set[int]:
    """Indices of the chunks that hold any of tokens [lo, hi) of the context the chunks were cut from."""
    out, start = set(), 0
    for i, piece in enumerate(pieces):
        if start < hi and lo < start + len(piece):
            out.add(i)
        start += len(piece)
    return out


def run(
    lm,
    cells,
    wordings,
    chunk,
    top_k,
    seed,
    partial: str | None = None,
    scorings=("summary", "draft"),
    chunking: str = "text",
) -> list[dict]:
    """Every row; after each sample the rows so far go to `partial` (a run cut short keeps what it measured)."""
    rows = []
    for length, samples in cells:
        for wording in wordings:
            for i in range(samples):
                instruction, context, question, value, (lo, hi) = sample_in(lm, length, seed * 1000 + i, wording)
                sampler = sampler_for(task_of(wording), 0.9)  # pdllm eval's: the task's answer span, threshold 0.9
                req = encode_request(lm.tokenizer, context, question, 1 << 20, instruction)
                base = MethodConfig(chunk_size=chunk, top_k=top_k, chunking=chunking)
                pieces = chunk_context(lm.tokenizer, req.context_ids, base)
                needle_chunks = chunks_holding(pieces, lo, hi)
                cache = ChunkCache()
                chunks = cache.get_or_encode(lm, pieces, base, lm.model_id).chunks
                instr = instruction_kv(lm, req.instruction_ids, cache, lm.model_id)
                for scoring in scorings:
                    t0 = time.perf_counter()
                    picked, _ = rank(lm, req.question_ids, chunks, replace(base, scoring=scoring), instr)
                    rank_ms = 1000 * (time.perf_counter() - t0)
                    for selected_kv in ("reuse", "joint"):
                        method = replace(base, scoring=scoring, selected_kv=selected_kv)
                        text = answer(lm, req, chunks, picked, method, sampler, instr)
                        rows.append({
                            "length": length, "wording": wording, "sample": i, "scoring": scoring,
                            "selected_kv": selected_kv, "hit": bool(set(picked) & needle_chunks),
                            "whole_hit": needle_chunks <= set(picked),
                            "score": score(task_of(wording), text, (value,)), "answer": text, "gold": value,
                            "picked": picked, "needle_chunks": sorted(needle_chunks), "rank_ms": round(rank_ms, 1),
                        })  # fmt: skip
                latest = rows[-2 * len(scorings) :]
                print(f"  {length} {wording} sample {i}: " + " ".join(
                    f"{r['scoring'][0]}{r['selected_kv'][0]}={int(r['hit'])}/{r['score']:g}" for r in latest
                ), flush=True)  # fmt: skip
                if partial:
                    with open(partial, "w") as f:
                        json.dump(rows, f)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["length  wording         scoring  n   hit%  whole%  acc% reuse  acc% joint  rank ms"]
    keys = sorted(
        {(r["length"], r["wording"], r["scoring"]) for r in rows},
        key=lambda k: (k[0], k[1] != "trained", k[2] != "summary"),
    )
    for length, wording, scoring in keys:
        cell = [r for r in rows if (r["length"], r["wording"], r["scoring"]) == (length, wording, scoring)]
        reuse = [r for r in cell if r["selected_kv"] == "reuse"]
        joint = [r for r in cell if r["selected_kv"] == "joint"]
        hit = 100 * sum(r["hit"] for r in reuse) / len(reuse)
        whole = 100 * sum(r["whole_hit"] for r in reuse) / len(reuse)
        acc_r = 100 * sum(r["score"] for r in reuse) / len(reuse)
        acc_j = 100 * sum(r["score"] for r in joint) / max(len(joint), 1)
        ms = sum(r["rank_ms"] for r in reuse) / len(reuse)
        lines.append(
            f"{length:<7} {wording:<15} {scoring:<8} {len(reuse):<3} {hit:5.0f} {whole:7.0f}"
            f" {acc_r:10.0f} {acc_j:11.0f} {ms:8.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--cells", default="8192:4,32768:2", help="length:samples per wording, comma separated")
    ap.add_argument("--wordings", default="trained,other", help="trained, other (passkey) or task names")
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--chunking", choices=CHUNKINGS, default="text", help="where chunks end (MethodConfig)")
    ap.add_argument("--scorings", default="summary,draft", help="draft costs minutes a sample on a CPU at 8K")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.txt")
    args = ap.parse_args()
    lm = load_model(args.model or default_model_dir(), device=args.device)
    cells = [tuple(int(x) for x in c.split(":")) for c in args.cells.split(",")]
    partial = args.out + ".partial.json" if args.out else None
    wordings, scorings = args.wordings.split(","), args.scorings.split(",")
    rows = run(lm, cells, wordings, args.chunk_size, args.top_k, args.seed, partial, scorings, args.chunking)
    text = table(rows)
    print(text)
    if args.out:
        meta = {"args": vars(args), "device": args.device, "cpu": platform.processor(), "model_id": lm.model_id,
                "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
        with open(args.out + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None)
        with open(args.out + ".txt", "w") as f:
            f.write(f"# python benchmarks/eval_selection.py {flags}  (model {lm.model_id[:12]}, {args.device})\n")
            f.write(text + "\n")


if __name__ == "__main__":
    main()
