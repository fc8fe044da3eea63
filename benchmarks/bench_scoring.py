"""Cost of chunk ranking per request, summary vs draft scoring, against one decode step (and joint mode's steps).

Random bf16 weights at LLaDA-8B and Dream-7B shapes (cost does not depend on values), random cached chunk KV.
Per model, context length and chunk size it times, in one run on one GPU, the library's own functions:
  summary  selection.rank_chunks: a question-alone forward, then q . mean-key over every chunk's summary
  draft    draft_scoring.rank_by_draft: 4 draft tokens (1 partial round) from [instruction, question], then every
           chunk scored over its cached KV (LLaDA: leave-one-out copies per scored token; Dream: one causal pass)
  step     one sparse decode step: question + 32-token block over top-K x chunk selected rows (the kernel)
  joint    selected_kv=joint: its first step (one forward over instruction + top-K chunks + question + block) and
           a later step (the block against the fixed prompt KV)
Each cost is also given as a multiple of the sparse step.

    python benchmarks/bench_scoring.py --out results.json      # on the GPU
    python benchmarks/bench_scoring.py --smoke                  # tiny shapes on CPU, checks the script runs
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from pdllm.decode_node.kv_pool import KVPool, page_bytes
from pdllm.kernels import attention

from benchmarks.bench_e2e import DREAM_7B, LLADA_8B, TINY, random_model, sync, timed
from pdllm.method.chunk_kv import ChunkKV
from pdllm.method.config import MethodConfig
from pdllm.method.draft_scoring import rank_by_draft
from pdllm.method.joint import JointDenoiser
from pdllm.method.selection import rank_chunks, summary_layers
from pdllm.models.loader import LoadedModel

QUESTION, INSTRUCTION, BLOCK = 32, 64, 32


class SelectedRows:
    """Every row of `chunks`, resident in a decode pool and read through the sparse kernel (one request)."""

    def __init__(self, spec, chunks, device, dtype) -> None:
        pages = sum(-(-c.length // 32) for c in chunks) + 2
        self.pool = KVPool(spec, device, dtype, pages * page_bytes(spec, dtype, 32), page_rows=32)
        self.pool.insert_pinned(chunks)
        rows = torch.cat([self.pool.entry(c.chunk_id).rows for c in chunks])
        self.sel_idx = rows[None, None].expand(1, spec.num_kv_heads, -1).contiguous()
        self.sel_len = torch.tensor([rows.numel()], dtype=torch.int32, device=rows.device)

    def attend(self, layer, q, k, v):
        self_len = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
        return attention(q, k, v, self_len, self.pool.k[layer], self.pool.v[layer], self.sel_idx, self.sel_len)


def random_chunks(spec, n: int, chunk: int, device, dtype) -> list[ChunkKV]:
    """`n` chunks of [BOS] + chunk rows; one K/V tensor shared by all (scoring reads each once anyway)."""
    shape = (spec.num_layers, spec.num_kv_heads, chunk + 1, spec.head_dim)
    k = torch.randn(shape, device=device, dtype=dtype)
    v = torch.randn(shape, device=device, dtype=dtype)
    summ = torch.randn(len(summary_layers(spec.num_layers)), spec.num_kv_heads, spec.head_dim, device=device)
    return [ChunkKV(f"c{i}", [0] * chunk, k, v, summ.half(), True) for i in range(n)]


def ids(n: int, vocab: int) -> list[int]:
    return torch.randint(0, min(vocab, 30000), (n,)).tolist()


def bench(spec, model, ctx, chunk, top_k, device, dtype, reps) -> dict:
    lm = LoadedModel(model, None, spec, Path("."), "bench")
    n = ctx // chunk
    chunks = random_chunks(spec, n, chunk, device, dtype)
    instr = random_chunks(spec, 1, INSTRUCTION - 1, device, dtype)[0]
    question = ids(QUESTION, spec.vocab_size)
    cfg = MethodConfig(chunk_size=chunk, top_k=top_k, scoring="draft")
    row = {"model": spec.family, "context": ctx, "chunk": chunk, "chunks": n, "top_k": top_k}
    with torch.no_grad():
        row["summary_ms"] = 1e3 * timed(lambda: rank_chunks(lm, question, [c.summary for c in chunks], top_k), reps)
        slow = reps if spec.shift_logits or n <= 16 else 1
        draft = lambda: rank_by_draft(lm, question, chunks, top_k, instr, cfg)
        row["draft_ms"] = 1e3 * timed(draft, slow, warmup=1 if slow > 1 else 0)  # kernels compiled at 8K already
        row["draft_reps"] = slow
        # one sparse decode step over the top-K chunks (question + block recomputed)
        sel = chunks[:top_k]
        context = SelectedRows(spec, [instr] + sel, device, dtype)
        span = torch.tensor([question + [spec.mask_token_id] * BLOCK], device=device)
        pos = torch.arange(chunk + 1, chunk + 1 + span.shape[1], device=device)[None]
        step = lambda: model(span, position_ids=pos, context=context, logits_from=QUESTION)
        row["step_ms"] = 1e3 * timed(step, reps)
        # joint: first step = one forward over the whole prompt + block, later steps = the block alone
        prompt = torch.tensor([ids(INSTRUCTION + top_k * (chunk + 1) + QUESTION, spec.vocab_size)], device=device)
        gen = torch.full((1, BLOCK), spec.mask_token_id, device=device)

        def joint_first():
            d = JointDenoiser(model, prompt)
            d.logits(gen)
            return d

        row["joint_first_ms"] = 1e3 * timed(joint_first, reps)
        d = joint_first()
        row["joint_step_ms"] = 1e3 * timed(lambda: d.logits(gen), reps)
    for key in ("summary_ms", "draft_ms", "joint_first_ms", "joint_step_ms"):
        row[key.replace("_ms", "_steps")] = row[key] / row["step_ms"]
    return row


def check_kernel_path(device) -> float:
    """Draft scores of a small float32 model on `device` (the Triton kernel on CUDA) against the CPU reference
    path; returns the largest absolute difference (printed first, so a wrong kernel path is seen)."""
    from pdllm.method import encode_chunks
    from pdllm.method.draft_scoring import draft_chunk_scores
    from pdllm.models.tiny import random_model as tiny_model
    from pdllm.models.tiny import tiny_spec

    worst = 0.0
    for family, kv in (("llada", None), ("dream", 2)):
        spec = tiny_spec(family, layers=2, kv_heads=kv)
        cpu = LoadedModel(tiny_model(spec, 0), None, spec, Path("."), "check")
        dev = LoadedModel(tiny_model(spec, 0).to(device), None, spec, Path("."), "check")
        g = torch.Generator().manual_seed(0)
        chunks = [torch.randint(0, 250, (64,), generator=g).tolist() for _ in range(6)]
        span = torch.randint(0, 250, (12,), generator=g).tolist()
        scored = [True] * 12
        cfg = MethodConfig(chunk_size=64)
        a = draft_chunk_scores(cpu, encode_chunks(cpu, chunks, cfg, "c"), span, scored)
        b = draft_chunk_scores(dev, encode_chunks(dev, chunks, cfg, "c"), span, scored)
        worst = max(worst, float((a - b).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llada,dream")
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--chunks", default="512,1024", help="chunk sizes (top-K = 8 at 512, 4 at 1024: 4K tokens)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    specs = {"llada": LLADA_8B, "dream": DREAM_7B}
    if args.smoke:
        tiny = replace(TINY, mask_token_id=511, bos_token_id=510, eos_token_ids=(509,))
        specs = {"llada": tiny, "dream": replace(tiny, family="dream", qkv_bias=True, shift_logits=True)}
        args.contexts, args.chunks, args.reps = "1024,2048", "128,256", 1
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "question_tokens": QUESTION,
        "instruction_tokens": INSTRUCTION,
        "block": BLOCK,
        "args": vars(args),
    }
    if device.type == "cuda":
        meta["kernel_path_max_abs_diff"] = check_kernel_path(device)
        diff = meta["kernel_path_max_abs_diff"]
        print(f"draft scores, CUDA (Triton kernel) vs CPU reference, float32: max |diff| {diff:.2e}")
    rows = []
    for name in args.models.split(","):
        spec = specs[name]
        model = random_model(spec, device, dtype)
        for ctx in map(int, args.contexts.split(",")):
            for chunk in map(int, args.chunks.split(",")):
                t0 = time.time()
                top_k = max(1, 4096 // chunk) if not args.smoke else 2
                try:
                    rows.append(bench(spec, model, ctx, chunk, top_k, device, dtype, args.reps))
                except torch.OutOfMemoryError as exc:
                    rows.append({"model": name, "context": ctx, "chunk": chunk, "error": f"OOM: {str(exc)[:80]}"})
                    torch.cuda.empty_cache()
                sync()
                print(f"  {name} ctx={ctx} chunk={chunk} done in {time.time() - t0:.1f}s", flush=True)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump({"meta": meta, "rows": rows}, f, indent=1)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print("model  ctx     chunk  n    step   summary(xstep)   draft(xstep)        joint first(xstep)  joint step")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:6} {r['context']:<7} {r['chunk']:<6} {r['error']}")
            continue
        print(
            f"{r['model']:6} {r['context']:<7} {r['chunk']:<6} {r['chunks']:<4} {r['step_ms']:6.1f} "
            f"{r['summary_ms']:7.1f}({r['summary_steps']:5.1f})  {r['draft_ms']:9.1f}({r['draft_steps']:7.1f})  "
            f"{r['joint_first_ms']:8.1f}({r['joint_first_steps']:5.1f})  {r['joint_step_ms']:7.1f}"
        )
    print(f"ms per request (ranking) or per step; question {QUESTION}, instruction {INSTRUCTION}, block {BLOCK};")
    print("step = one sparse decode step over top-K chunks (K*chunk = 4096 rows); xstep = cost / step")


if __name__ == "__main__":
    main()
