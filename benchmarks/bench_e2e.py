"""End-to-end speed of one denoising step and of a whole answer: vanilla vs prefix cache vs sparse (ours).

Random bf16 weights at LLaDA-8B and Dream-7B shapes (speed does not depend on values). For each context length and
batch size it times, in one run on one GPU:
  vanilla  one step = a forward over context + question (64) + block (32), logits for the block
  prefix   one step = question + block attending densely to the cached context KV (preallocated buffer, SDPA)
  sparse   one step = question + block attending to K*C selected chunk tokens through the Triton kernel
           (rows scattered over a chunk pool, per-head token lists: the kernel reads them where they lie)
and the floors: weights + KV bytes over a device copy bandwidth measured here, FLOPs over a measured bf16 matmul rate.
End to end (a 64-token answer, 64 steps): vanilla = 64 vanilla steps; prefix = one context forward + 64 prefix
steps; sparse = chunked prefill of every chunk ([BOS] + C tokens, batched) + 64 sparse steps.

    python benchmarks/bench_e2e.py --out results.json            # on the GPU
    python benchmarks/bench_e2e.py --smoke                      # tiny shapes on CPU, checks the script runs
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import replace
from functools import partial

import torch

from pdllm.models.attention import sdpa
from pdllm.models.spec import ModelSpec
from pdllm.models.transformer import DllmModel

LLADA_8B = ModelSpec(
    family="llada", vocab_size=126464, hidden_size=4096, intermediate_size=12288, num_layers=32, num_heads=32,
    num_kv_heads=32, rope_theta=500000.0, rms_norm_eps=1e-5, max_position=4096, mask_token_id=126336,
    bos_token_id=126080, eos_token_ids=(126081,),
)  # fmt: skip
DREAM_7B = ModelSpec(
    family="dream", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
    num_kv_heads=4, rope_theta=1e6, rms_norm_eps=1e-6, max_position=131072, mask_token_id=151666,
    bos_token_id=151643, eos_token_ids=(151643,), qkv_bias=True, shift_logits=True,
)  # fmt: skip
TINY = replace(
    LLADA_8B, vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2
)

QUESTION, BLOCK = 64, 32


def timed(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of fn() over reps (device-synchronized)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.randn(n // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), reps=10, warmup=3)
    return 2 * src.numel() * 2 / t


def matmul_rate(device: torch.device) -> float:
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = timed(lambda: a @ b, reps=10, warmup=3)
    return 2 * n**3 / t


def random_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> DllmModel:
    with torch.device(device):
        model = DllmModel(spec).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


class PrefixBuffer:
    """Prefix-cache baseline done well: context KV preallocated with room for the span, SDPA over the buffer.

    The context rows are filled with random values in place (no second copy of the context KV at any time)."""

    def __init__(self, spec: ModelSpec, batch: int, ctx: int, span: int, device, dtype) -> None:
        self.bufs = []
        shape = (batch, spec.num_kv_heads, ctx + span, spec.head_dim)
        for _ in range(spec.num_layers):
            kb = torch.empty(shape, device=device, dtype=dtype).normal_()
            self.bufs.append((kb, torch.empty_like(kb).normal_(), ctx))

    def attend(self, layer: int, q, k, v):
        kb, vb, s = self.bufs[layer]
        kb[:, :, s:] = k
        vb[:, :, s:] = v
        return sdpa(q, kb, vb)


class SparsePool:
    """Ours: a chunk pool per layer and per-request, per-KV-head lists of selected rows, read by the kernel."""

    def __init__(self, spec, batch, selected, chunk, device, dtype, attention, extra_rows: int = 0) -> None:
        """`extra_rows` (<= chunk + 1) more rows per request, from a slot of their own: the cached question's KV."""
        s_rows = chunk + 1  # [BOS] + chunk
        kept_chunks = max(1, selected // chunk)
        slots = 2 * kept_chunks * batch + (batch if extra_rows else 0)  # chunks scattered over twice their size
        h, d = spec.num_kv_heads, spec.head_dim
        self.pools = [
            (
                torch.randn(slots, h, s_rows, d, device=device, dtype=dtype),
                torch.randn(slots, h, s_rows, d, device=device, dtype=dtype),
            )
            for _ in range(spec.num_layers)
        ]
        n_sel = kept_chunks * s_rows + extra_rows
        idx = torch.empty(batch, h, n_sel, dtype=torch.int32)
        for b in range(batch):
            chosen = torch.randperm(2 * kept_chunks * batch)[:kept_chunks]
            rows = (chosen[:, None] * s_rows + torch.arange(s_rows)[None]).flatten()
            if extra_rows:
                question_slot = 2 * kept_chunks * batch + b
                rows = torch.cat([rows, question_slot * s_rows + torch.arange(extra_rows)])
            for hh in range(h):  # per-head order differs, as per-head token selection makes it
                idx[b, hh] = rows[torch.randperm(rows.numel())].sort().values.int()
        self.sel_idx = idx.to(device)
        self.sel_len = torch.full((batch,), n_sel, dtype=torch.int32, device=device)
        self.self_len = None
        self.attention = attention
        self.n_sel = n_sel

    def attend(self, layer: int, q, k, v):
        if self.self_len is None:
            self.self_len = torch.full((q.shape[0],), q.shape[2], dtype=torch.int32, device=q.device)
        kp, vp = self.pools[layer]
        return self.attention(q, k, v, self.self_len, kp, vp, self.sel_idx, self.sel_len)


def load_attention():
    from pdllm.kernels import attention  # the dispatcher: Triton on CUDA, PyTorch reference on CPU

    return attention


def step_runner(model, ids, context, logits_from):
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)

    @torch.no_grad()
    def run():
        return model(ids, position_ids=pos, context=context, logits_from=logits_from).logits

    return run


def try_graph(run):
    """Capture one step in a CUDA graph (removes launch gaps); None if capture fails."""
    if not torch.cuda.is_available():
        return None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        return g.replay
    except Exception as exc:  # report, never hide: the table says "eager only"
        print(f"  graph capture failed: {type(exc).__name__}: {str(exc)[:120]}")
        return None


def graphed_ms(fn, reps: int) -> float:
    """Milliseconds of fn, CUDA-graphed where possible so that a short kernel is not hidden by launch cost."""
    return 1e3 * timed(try_graph(fn) or fn, reps)


def bench_config(spec, model, ctx, batch, selected, chunk, device, dtype, attention, bw, rate, reps, vanilla_cap):
    row = {"model": spec.family, "context": ctx, "batch": batch, "selected": selected}
    span = QUESTION + BLOCK
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = params * torch.finfo(dtype).bits // 8
    kv_tok = spec.kv_bytes_per_token(torch.finfo(dtype).bits // 8)
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids_span = torch.randint(0, 256, (batch, span), generator=gen).to(device)
    head_flops = 2 * spec.vocab_size * spec.hidden_size * batch * BLOCK

    def floor(kv_tokens: int, rows: int = span) -> float:
        """Weights + KV bytes over copy bandwidth, or FLOPs over the matmul rate, for `rows` new tokens a step."""
        lin_flops = 2 * (params - spec.vocab_size * spec.hidden_size) * batch * rows
        attn_flops = 4 * batch * spec.num_heads * rows * (kv_tokens + rows) * spec.head_dim * spec.num_layers
        by = weight_bytes + batch * kv_tokens * kv_tok
        return max(by / bw, (lin_flops + head_flops + attn_flops) / rate)

    # one layer's attention alone (the paper's kernel-level comparison): span queries over the selected rows
    # through the kernel, against dense SDPA over the whole context + span
    qkv = [
        torch.randn(batch, heads, span, spec.head_dim, device=device, dtype=dtype)
        for heads in (spec.num_heads, spec.num_kv_heads, spec.num_kv_heads)
    ]
    # sparse
    pool = SparsePool(spec, batch, selected, chunk, device, dtype, attention)
    row["attn_sparse_ms"] = graphed_ms(partial(pool.attend, 0, *qkv), reps)
    run = step_runner(model, ids_span, pool, QUESTION)
    row["sparse_ms"] = 1e3 * timed(run, reps)
    g = try_graph(run)
    row["sparse_graph_ms"] = 1e3 * timed(g, reps) if g else None
    row["sparse_floor_ms"] = 1e3 * floor(pool.n_sel)
    # the same step with fused q/k/v and gate/up GEMMs (4 weight reads a layer instead of 7), then undone
    model.fuse_projections()
    g = try_graph(run)
    row["sparse_fused_ms"] = 1e3 * timed(g or run, reps)
    model.fuse_projections(False)
    del pool, run, g
    # sparse with the question's KV cached after step 1 (--keep-question-kv; what the paper's SGLang port does):
    # a step recomputes only the block, attending to the selected rows + the question's rows
    pool = SparsePool(spec, batch, selected, chunk, device, dtype, attention, extra_rows=QUESTION)
    run = step_runner(model, ids_span[:, :BLOCK], pool, 0)
    g = try_graph(run)
    row["sparse_qkv_ms"] = 1e3 * timed(g or run, reps)
    row["sparse_qkv_floor_ms"] = 1e3 * floor(pool.n_sel, BLOCK)
    del pool, run, g
    # prefix
    torch.cuda.empty_cache() if device.type == "cuda" else None
    kv_gib = batch * (ctx + span) * kv_tok / 2**30
    if device.type == "cuda" and kv_gib > 0.85 * torch.cuda.mem_get_info()[0] / 2**30:
        row["prefix_ms"] = row["prefix_graph_ms"] = None
        row["prefix_note"] = f"context KV {kv_gib:.0f} GiB does not fit"
    else:
        ctx_prefix = PrefixBuffer(spec, batch, ctx, span, device, dtype)
        row["attn_dense_ms"] = graphed_ms(partial(ctx_prefix.attend, 0, *qkv), reps)
        run = step_runner(model, ids_span, ctx_prefix, QUESTION)
        row["prefix_ms"] = 1e3 * timed(run, reps)
        g = try_graph(run)
        row["prefix_graph_ms"] = 1e3 * timed(g, reps) if g else None
        row["prefix_floor_ms"] = 1e3 * floor(ctx)
        del ctx_prefix, run, g
    torch.cuda.empty_cache() if device.type == "cuda" else None
    # vanilla
    if batch * (ctx + span) > vanilla_cap:
        row["vanilla_ms"] = None
        row["vanilla_note"] = f"skipped: {batch}x{ctx} tokens per step over the cap {vanilla_cap}"
    else:
        ids = torch.randint(0, 256, (batch, ctx + span), generator=gen).to(device)
        run = step_runner(model, ids, None, ctx + QUESTION)
        row["vanilla_ms"] = 1e3 * timed(run, 1 if ctx >= 32768 else 3)
        del ids, run
    torch.cuda.empty_cache() if device.type == "cuda" else None
    # chunked prefill throughput (sparse mode's one-time cost), a few batches of [BOS]+chunk
    pb = 16 if device.type == "cuda" else 2
    chunk_ids = torch.randint(0, 256, (pb, chunk + 1), generator=gen).to(device)

    @torch.no_grad()
    def prefill():
        return model(chunk_ids, return_kv=True, logits_from=None)

    t = timed(prefill, max(2, reps // 4))
    row["prefill_tok_s"] = pb * (chunk + 1) / t
    row["prefill_bound_tok_s"] = rate / (2 * (params - spec.vocab_size * spec.hidden_size))
    chunks_total = batch * math.ceil(ctx / chunk)
    row["sparse_prefill_s"] = chunks_total * (chunk + 1) / row["prefill_tok_s"]
    return row


def summarize(row: dict, steps: int) -> dict:
    best = lambda a, b: min(x for x in (a, b) if x is not None) if (a or b) else None  # noqa: E731
    sp = best(row["sparse_ms"], row.get("sparse_graph_ms"))
    pf = best(row.get("prefix_ms"), row.get("prefix_graph_ms"))
    va = row.get("vanilla_ms")
    row["sparse_best_ms"], row["prefix_best_ms"] = sp, pf
    row["x_vs_vanilla"] = va / sp if va else None
    row["x_vs_prefix"] = pf / sp if pf else None
    row["qkv_x_vs_prefix"] = pf / row["sparse_qkv_ms"] if pf and row.get("sparse_qkv_ms") else None
    dense_attn = row.get("attn_dense_ms")
    row["attn_x"] = dense_attn / row["attn_sparse_ms"] if dense_attn else None
    row["floor_gap"] = sp / row["sparse_floor_ms"]
    row["fused_floor_gap"] = row["sparse_fused_ms"] / row["sparse_floor_ms"] if row.get("sparse_fused_ms") else None
    row["e2e_vanilla_s"] = steps * va / 1e3 if va else None
    row["e2e_prefix_s"] = (steps * pf / 1e3 + (va or 0) / 1e3) if pf and va else None
    row["e2e_sparse_s"] = steps * sp / 1e3 + row["sparse_prefill_s"]
    row["e2e_x_vs_vanilla"] = row["e2e_vanilla_s"] / row["e2e_sparse_s"] if va else None
    return row


def fmt(x, spec="{:.1f}"):
    return "-" if x is None else spec.format(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llada,dream")
    ap.add_argument("--contexts", default="8192,16384,32768,65536,131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--selected", type=int, default=4096, help="K*C selected context tokens")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64, help="denoising steps of one 64-token answer")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--vanilla-cap", type=int, default=300_000, help="skip vanilla above this many tokens per step")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    specs = {"llada": LLADA_8B, "dream": DREAM_7B}
    if args.smoke:
        specs = {"llada": TINY, "dream": replace(TINY, family="dream", qkv_bias=True, shift_logits=True)}
        args.contexts, args.batches, args.selected, args.chunk, args.reps = "512,1024", "1,2", 128, 64, 2
    attention = load_attention()
    bw, rate = copy_bandwidth(device), matmul_rate(device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}: "
          f"copy {bw / 1e9:.0f} GB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")  # fmt: skip
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "copy_GBps": bw / 1e9,
        "matmul_TFLOPs": rate / 1e12,
        "date": time.strftime("%Y-%m-%d"),
        "args": vars(args),
    }
    rows = []
    for name in args.models.split(","):
        spec = specs[name]
        model = random_model(spec, device, dtype)
        for ctx in map(int, args.contexts.split(",")):
            for batch in map(int, args.batches.split(",")):
                t0 = time.time()
                try:
                    row = bench_config(
                        spec, model, ctx, batch, args.selected, args.chunk, device, dtype, attention, bw, rate,
                        args.reps, args.vanilla_cap,
                    )  # fmt: skip
                    rows.append(summarize(row, args.steps))
                except torch.OutOfMemoryError as exc:
                    rows.append({"model": name, "context": ctx, "batch": batch, "error": f"OOM: {str(exc)[:80]}"})
                    torch.cuda.empty_cache()
                print(f"  {name} ctx={ctx} b={batch} done in {time.time() - t0:.0f}s", flush=True)
                if args.out:  # after every row: a run cut short still leaves what it measured
                    with open(args.out, "w") as f:
                        json.dump({"meta": meta, "rows": rows}, f, indent=1)
        del model
        torch.cuda.empty_cache() if device.type == "cuda" else None

    print()
    hdr = "model  ctx     b  vanilla  prefix(best)  sparse(eager/graph)  floor  gap   xVan   xPre"
    hdr += "  e2e_van  e2e_sp  e2e_x  attnX  spQ(floor)  xPreQ  fused(gap)"
    print(hdr)
    for r in rows:
        if "error" in r:
            print(f"{r['model']:6} {r['context']:<7} {r['batch']:<2} {r['error']}")
            continue
        print(
            f"{r['model']:6} {r['context']:<7} {r['batch']:<2} {fmt(r.get('vanilla_ms')):>8} "
            f"{fmt(r['prefix_best_ms']):>12}  {fmt(r['sparse_ms']):>8}/{fmt(r.get('sparse_graph_ms')):<8}  "
            f"{fmt(r['sparse_floor_ms']):>6} {fmt(r['floor_gap'], '{:.2f}'):>5} {fmt(r['x_vs_vanilla']):>6} "
            f"{fmt(r['x_vs_prefix'], '{:.2f}'):>6} {fmt(r['e2e_vanilla_s'], '{:.2f}'):>8} "
            f"{fmt(r['e2e_sparse_s'], '{:.2f}'):>7} {fmt(r['e2e_x_vs_vanilla']):>6} {fmt(r.get('attn_x')):>6}"
            f" {fmt(r.get('sparse_qkv_ms')):>5}({fmt(r.get('sparse_qkv_floor_ms'))})"
            f" {fmt(r.get('qkv_x_vs_prefix'), '{:.2f}'):>5}"
            f"  {fmt(r.get('sparse_fused_ms'))}({fmt(r.get('fused_floor_gap'), '{:.2f}')})"
        )
    print("times in ms per denoising step; e2e in s for a 64-token answer (64 steps); gap = sparse / floor;")
    print("attnX = one layer's dense attention over the whole context / the kernel over the selected rows (graphed);")
    print("spQ = sparse step with the question's KV cached (block rows only), its floor, and prefix / spQ;")
    print("fused = the sparse step with fused q/k/v and gate/up projections (graphed where possible), its gap")


if __name__ == "__main__":
    main()
