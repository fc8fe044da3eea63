"""Decode-step attention kernel vs SDPA, and the chunk-scoring kernel, at LLaDA-8B and Dream-7B head shapes.

For each model, batch, context and selection size (K*C tokens) it times, in one run on one GPU:
  kernel    pdllm.kernels.attention: span (64 question + 32 block queries) over the selected rows, read in place
            from a chunk pool holding the whole context ([BOS] + C tokens a slot), per-head token lists
  gathered  torch SDPA over the same rows gathered contiguously beforehand (gather time excluded): best backend
  dense     torch SDPA over the whole context + span (the prefix-cache baseline): best backend
Achieved bandwidth = bytes the kernel must move (selected K/V rows, own K/V, indices, q, out) / time, against a
device copy bandwidth (a large tensor copy, bytes read + written) measured in the same run. Every timing is the
median of CUDA-graph replays through triton.testing.do_bench, which flushes L2 between replays (cold KV, as in a
real step where the weights pass through L2 between layers). Correctness is checked against a float64 reference
(ragged lengths, NaN-poisoned outputs) before timing; a sweep of launch parameters shows what the heuristic leaves.

    python benchmarks/bench_kernels.py --out $OUT                 # GPU: full run
    python benchmarks/bench_kernels.py --smoke                    # CPU: tiny shapes through Triton's interpreter
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class Shape:
    name: str
    hq: int
    hkv: int
    d: int


LLADA = Shape("LLaDA-8B", 32, 32, 128)
DREAM = Shape("Dream-7B", 28, 4, 128)
QUESTION, BLOCK = 64, 32


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter): checks the script")
    p.add_argument("--out", default=None, help="folder for kernels.json")
    p.add_argument("--contexts", default="8192,16384,32768,65536")
    p.add_argument("--selected", default="2048,4096,8192")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--chunk", type=int, default=512, help="C: chunk tokens (a slot holds [BOS] + C rows)")
    p.add_argument("--no-sweep", action="store_true", help="skip the launch-parameter sweep")
    return p.parse_args()


ARGS = parse()
if ARGS.smoke and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first used (they jit lazily)

from pdllm.kernels import attention, chunk_token_scores_ref, gather_selected, token_scores  # noqa: E402
from pdllm.kernels import sparse_attention as sa  # noqa: E402
from pdllm.kernels.reference import sparse_chunk_attention_ref  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def graphed(fn):
    """Capture fn (already warmed up) in a CUDA graph; replay removes launch gaps. On CPU, fn itself."""
    if DEV.type != "cuda":
        return fn
    fn()
    sync()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    sync()
    return g.replay


def bench_us(fn, graph: bool = True) -> float:
    """Median microseconds: do_bench over graph replays on the GPU (L2 flushed between them); a host clock on CPU."""
    if DEV.type == "cuda":
        import triton.testing

        run = graphed(fn) if graph else fn
        return 1e3 * triton.testing.do_bench(run, warmup=5, rep=40, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def copy_bandwidth() -> float:
    """Device copy bandwidth (bytes read + written per second) of a large tensor copy."""
    n = (1 << 30) if DEV.type == "cuda" else (1 << 24)
    src = torch.randn(n // 2, device=DEV, dtype=DTYPE)
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src), graph=False)
    return 2 * n / (us * 1e-6)


def sdpa_variants(q, k, v):
    """SDPA callables to try (default dispatch with GQA, K/V expanded per query head, cuDNN): the best is the
    baseline. Variants that fail on this build are left out."""
    group = q.shape[1] // k.shape[1]
    out = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=group > 1)}
    if group > 1:
        ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        out["sdpa-expanded"] = lambda: F.scaled_dot_product_attention(q, ke, ve)
    if DEV.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kk, vv = (ke, ve) if group > 1 else (k, v)

        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, kk, vv)

        out["cudnn"] = cudnn
    ok = {}
    for name, fn in out.items():
        try:
            fn()
            ok[name] = fn
        except Exception as exc:  # a backend this build/shape lacks: say so, never hide it
            print(f"    ({name} unavailable: {type(exc).__name__}: {str(exc)[:80]})")
    return ok


def best_sdpa(q, k, v) -> tuple[float, str]:
    times = {name: bench_us(fn) for name, fn in sdpa_variants(q, k, v).items()}
    name = min(times, key=times.get)
    return times[name], name


class Problem:
    """One model shape at one batch and context: a chunk pool holding every request's context, span tensors."""

    def __init__(self, shape: Shape, batch: int, context: int, chunk: int) -> None:
        self.shape, self.batch, self.context, self.chunk = shape, batch, context, chunk
        self.rows = chunk + 1  # [BOS] + chunk
        self.per_req = max(1, context // chunk)
        self.slots = batch * self.per_req
        tq, h, d = QUESTION + BLOCK, shape.hkv, shape.d
        self.k_pool = torch.randn(self.slots, h, self.rows, d, device=DEV, dtype=DTYPE)
        self.v_pool = torch.randn(self.slots, h, self.rows, d, device=DEV, dtype=DTYPE)
        self.q = torch.randn(batch, shape.hq, tq, d, device=DEV, dtype=DTYPE)
        self.k_self = torch.randn(batch, h, tq, d, device=DEV, dtype=DTYPE)
        self.v_self = torch.randn(batch, h, tq, d, device=DEV, dtype=DTYPE)
        self.self_len = torch.full((batch,), tq, dtype=torch.int32, device=DEV)

    def select(self, n_sel: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per request: twice the needed chunks (or all), then per KV head its own n_sel rows among them, sorted:
        top-K chunks with intra-chunk token sparsity, each head keeping about half of the kept chunks' tokens."""
        kept = min(self.per_req, max(1, math.ceil(2 * n_sel / self.chunk)))
        n_sel = min(n_sel, kept * self.rows)
        idx = torch.empty(self.batch, self.shape.hkv, n_sel, dtype=torch.int32)
        for b in range(self.batch):
            chunks = b * self.per_req + torch.randperm(self.per_req, generator=gen)[:kept]
            rows = (chunks[:, None] * self.rows + torch.arange(self.rows)[None]).flatten()
            keep = torch.rand(self.shape.hkv, rows.numel(), generator=gen).argsort(dim=1)[:, :n_sel]
            idx[b] = rows[keep].sort(dim=1).values.int()
        return idx.to(DEV), torch.full((self.batch,), n_sel, dtype=torch.int32, device=DEV)

    def args(self, sel_idx, sel_len):
        return self.q, self.k_self, self.v_self, self.self_len, self.k_pool, self.v_pool, sel_idx, sel_len

    def kernel_bytes(self, n_sel: int) -> int:
        """Bytes the step must move: selected + own K/V rows, indices, q read, out written."""
        b, s, e = self.batch, self.shape, DTYPE.itemsize
        tq = QUESTION + BLOCK
        return b * s.hkv * ((n_sel + tq) * 2 * s.d * e + n_sel * 4) + 2 * b * s.hq * tq * s.d * e


def rel_err(out, ref, self_len) -> float:
    num = den = 0.0
    for i, n in enumerate(self_len.tolist()):
        num += (out[i, :, :n].double() - ref[i, :, :n]).pow(2).sum().item()
        den += ref[i, :, :n].pow(2).sum().item()
    return math.sqrt(num / max(den, 1e-300))


@contextlib.contextmanager
def poisoned_outputs():
    """torch.empty inside the kernel launchers returns NaN-filled floats, so an unwritten output shows."""
    real = torch.empty

    def empty(*a, **kw):
        t = real(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def check_problem(p: Problem, n_sel: int, gen: torch.Generator) -> dict:
    """Ragged lengths (one request with an empty selection when batch > 1), float64 reference, poisoned output."""
    sel_idx, _ = p.select(n_sel, gen)
    b, tq = p.batch, QUESTION + BLOCK
    sel_len = torch.randint(1, sel_idx.shape[-1] + 1, (b,), generator=gen, dtype=torch.int32)
    if b > 1:
        sel_len[1] = 0
    self_len = torch.randint(1, tq + 1, (b,), generator=gen, dtype=torch.int32)
    sel_len, self_len = sel_len.to(DEV), self_len.to(DEV)
    args = (p.q, p.k_self, p.v_self, self_len, p.k_pool, p.v_pool, sel_idx, sel_len)
    with poisoned_outputs():
        out = attention(*args, backend="triton")
    ref = sparse_chunk_attention_ref(*(x.double() if x.is_floating_point() else x for x in args))
    finite = bool(torch.isfinite(out).all())
    err = rel_err(out, ref, self_len)
    return {"rel_err": err, "finite": finite, "ok": finite and err < 1e-2}


def randn(gen: torch.Generator, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(DEV, dtype)


def check_dtypes(gen: torch.Generator) -> list[dict]:
    """float32 / float16 / bfloat16 at small GQA-7 and MHA shapes (tolerances 1e-4 / 1e-2 / 1e-2)."""
    res = []
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)):
        for hq, hkv, d in ((7, 1, 128), (4, 4, 64)):
            b, tq, slots, rows, n = 3, 24, 6, 65, 200
            q, ks, vs = (randn(gen, dtype, *s) for s in ((b, hq, tq, d), (b, hkv, tq, d), (b, hkv, tq, d)))
            kp, vp = (randn(gen, dtype, slots, hkv, rows, d) for _ in range(2))
            idx = torch.stack([torch.randperm(slots * rows, generator=gen)[:n] for _ in range(b * hkv)])
            idx = idx.view(b, hkv, n).int().to(DEV)
            sel_len = torch.tensor([n, 0, 77], dtype=torch.int32, device=DEV)
            self_len = torch.tensor([tq, 5, 17], dtype=torch.int32, device=DEV)
            args = (q, ks, vs, self_len, kp, vp, idx, sel_len)
            with poisoned_outputs():
                out = attention(*args, backend="triton")
            ref = sparse_chunk_attention_ref(*(x.double() if x.is_floating_point() else x for x in args))
            err = rel_err(out, ref, self_len)
            ok = bool(torch.isfinite(out).all()) and err < tol
            res.append({"dtype": str(dtype), "hq": hq, "hkv": hkv, "d": d, "rel_err": err, "ok": ok})
    return res


def sweep_configs() -> list[sa.AttnConfig]:
    if DEV.type != "cuda":
        return [sa.AttnConfig(block_m=16, block_n=16, num_warps=4, num_splits=s) for s in (1, 2)]
    base = [(128, 64, 8, 5), (128, 64, 8, 7), (128, 64, 8, 9), (128, 32, 8, 7), (128, 32, 8, 11), (64, 64, 8, 7),
            (128, 128, 8, 5)]  # fmt: skip
    return [sa.AttnConfig(block_m=m, block_n=n, num_warps=w, num_stages=st) for m, n, w, st in base]


def programs_per_sm(cfg: sa.AttnConfig) -> int:
    """Programs an SM holds, from ptxas's register counts for these configs (Triton 3.6, sm_90, D 128)."""
    return 2 if (cfg.block_n == 32 and cfg.num_stages <= 7) or cfg.num_warps == 4 else 1


def sweep(p: Problem, sel_idx: torch.Tensor, sel_len: torch.Tensor, default_out: torch.Tensor) -> list[dict]:
    """Each block shape at the heuristic's split count, half it, and with bfloat16 partials; checked vs default."""
    rows = []
    for cfg in sweep_configs():
        per_sm = programs_per_sm(cfg)
        tiles = math.ceil(p.shape.hq // p.shape.hkv * (QUESTION + BLOCK) / cfg.block_m) * p.batch * p.shape.hkv
        heur = sa.num_splits(tiles, sa._sm_count(DEV) * per_sm, sel_idx.shape[-1] + QUESTION + BLOCK, cfg.block_n)
        variants = {(max(1, heur // 2), torch.float32), (heur, torch.float32)}
        variants.add((heur, torch.bfloat16 if heur > 1 else torch.float32))
        if cfg.num_splits:
            variants = {(cfg.num_splits, torch.float32)}
        for splits, pdt in sorted(variants, key=lambda v: (v[0], str(v[1]))):
            c = sa.AttnConfig(**{**cfg.__dict__, "num_splits": splits, "partial_dtype": pdt})
            fn = lambda c=c: sa.sparse_chunk_attention(*p.args(sel_idx, sel_len), config=c)  # noqa: E731
            try:
                out = fn()
                err = rel_err(out, default_out.double(), p.self_len)
                us = bench_us(fn)
            except Exception as exc:  # a config that fails to compile or launch is reported, not fatal
                print(f"    sweep {c}: {type(exc).__name__}: {str(exc)[:100]}")
                continue
            rows.append(
                {"block_m": c.block_m, "block_n": c.block_n, "warps": c.num_warps, "stages": c.num_stages,
                 "splits": splits, "partial": str(pdt).replace("torch.", ""), "us": us, "rel_err_vs_default": err}
            )  # fmt: skip
    return rows


def bench_scoring(shape: Shape, n_chunks: int, chunk: int, gen: torch.Generator) -> dict:
    """Score n_chunks slots of a pool for 64 question tokens: kernel vs the PyTorch reference (einsum + amax)."""
    rows = chunk + 1
    k_pool = torch.randn(n_chunks * 2, shape.hkv, rows, shape.d, device=DEV, dtype=DTYPE)
    q = torch.randn(shape.hq, QUESTION, shape.d, device=DEV, dtype=DTYPE)
    slots = torch.randperm(n_chunks * 2, generator=gen)[:n_chunks].to(DEV)
    with poisoned_outputs():
        out = token_scores(q, k_pool, slots, backend="triton")
    ref = chunk_token_scores_ref(q.double(), k_pool.double(), slots)
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    ok = bool(torch.isfinite(out).all()) and err < 1e-3
    k_us = bench_us(lambda: token_scores(q, k_pool, slots, backend="triton"))
    r_us = bench_us(lambda: chunk_token_scores_ref(q, k_pool, slots))
    by = n_chunks * shape.hkv * rows * (shape.d * DTYPE.itemsize + 4) + q.numel() * DTYPE.itemsize
    return {"model": shape.name, "chunks": n_chunks, "kernel_us": k_us, "torch_us": r_us, "bytes": by,
            "rel_err": err, "ok": ok}  # fmt: skip


def main() -> int:
    smoke = ARGS.smoke
    if smoke:
        shapes = [Shape("tiny-gqa", 4, 2, 64), Shape("tiny-mha", 2, 2, 64)]
        contexts, selected, batches, chunk = [256, 512], [64, 128], [1, 2], 32
    else:
        shapes = [LLADA, DREAM]
        contexts = [int(x) for x in ARGS.contexts.split(",")]
        selected = [int(x) for x in ARGS.selected.split(",")]
        batches = [int(x) for x in ARGS.batches.split(",")]
        chunk = ARGS.chunk
    global QUESTION, BLOCK
    if smoke:
        QUESTION, BLOCK = 8, 4
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    meta = {
        "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if DEV.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "seed": seed,
        "chunk": chunk,
        "span": QUESTION + BLOCK,
        "dtype": str(DTYPE),
    }
    print(f"# {meta}")
    t_start = time.time()
    bw = copy_bandwidth()
    meta["copy_bw_GBps"] = bw / 1e9
    print(f"copy bandwidth (read + write): {bw / 1e9:.0f} GB/s")

    checks = {"dtypes": check_dtypes(gen), "problems": [], "scoring": []}
    for c in checks["dtypes"]:
        print(f"check {c}")
    rows, sweeps = [], []
    check_ctx = contexts[min(1, len(contexts) - 1)]
    sweep_ctx = contexts[min(2, len(contexts) - 1)]
    for shape in shapes:
        for batch in batches:
            for ctx in contexts:
                p = Problem(shape, batch, ctx, chunk)
                dense_k = torch.randn(batch, shape.hkv, ctx + QUESTION + BLOCK, shape.d, device=DEV, dtype=DTYPE)
                dense_v = torch.randn_like(dense_k)
                dense_us, dense_be = best_sdpa(p.q, dense_k, dense_v)
                del dense_k, dense_v
                for n_sel in selected:
                    if n_sel > ctx:
                        continue
                    if ctx == check_ctx:
                        c = {"model": shape.name, "batch": batch, "selected": n_sel, **check_problem(p, n_sel, gen)}
                        checks["problems"].append(c)
                        print(f"check {c}")
                    sel_idx, sel_len = p.select(n_sel, gen)
                    n_real = sel_idx.shape[-1]
                    args = p.args(sel_idx, sel_len)
                    cfg = sa.default_config(p.q, shape.hkv, n_real)
                    k_us = bench_us(lambda args=args: attention(*args))
                    k_eager = bench_us(lambda args=args: attention(*args), graph=False)
                    gk = torch.cat([gather_selected(p.k_pool, sel_idx, sel_len), p.k_self], dim=2)
                    gv = torch.cat([gather_selected(p.v_pool, sel_idx, sel_len), p.v_self], dim=2)
                    g_us, g_be = best_sdpa(p.q, gk, gv)
                    by = p.kernel_bytes(n_real)
                    row = {
                        "model": shape.name, "batch": batch, "context": ctx, "selected": n_real,
                        "kernel_us": k_us, "kernel_eager_us": k_eager, "splits": cfg.num_splits,
                        "config": f"m{cfg.block_m} n{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}",
                        "bytes": by, "GBps": by / (k_us * 1e-6) / 1e9, "frac_copy_bw": by / (k_us * 1e-6) / bw,
                        "gathered_sdpa_us": g_us, "gathered_backend": g_be, "dense_sdpa_us": dense_us,
                        "dense_backend": dense_be, "vs_gathered": g_us / k_us, "vs_dense": dense_us / k_us,
                    }  # fmt: skip
                    rows.append(row)
                    print(
                        f"{shape.name:9s} B{batch} ctx{ctx:6d} sel{n_real:5d}: kernel {k_us:8.1f} us "
                        f"(eager {k_eager:7.1f}) {row['GBps']:6.0f} GB/s {100 * row['frac_copy_bw']:4.0f}% | "
                        f"gathered {g_us:8.1f} ({g_be}) x{row['vs_gathered']:.2f} | dense {dense_us:8.1f} "
                        f"({dense_be}) x{row['vs_dense']:.1f}"
                    )
                    if ctx == sweep_ctx and not ARGS.no_sweep:
                        sw = sweep(p, sel_idx, sel_len, attention(*args))
                        best = min(sw, key=lambda r: r["us"]) if sw else None
                        sweeps.append({"model": shape.name, "batch": batch, "selected": n_real,
                                       "default_us": k_us, "rows": sw, "best": best})  # fmt: skip
                        for r in sw:
                            print(f"    sweep {r}")
                    del gk, gv
                del p
                if DEV.type == "cuda":
                    torch.cuda.empty_cache()
    for shape in shapes:
        n_chunks = (max(contexts) // chunk) if not smoke else 4
        s = bench_scoring(shape, n_chunks, chunk, gen)
        checks["scoring"].append(s)
        print(f"scoring {s}")

    all_ok = all(c["ok"] for c in checks["dtypes"] + checks["problems"] + checks["scoring"])
    meta["seconds"] = time.time() - t_start
    result = {"meta": meta, "checks": checks, "all_checks_ok": all_ok, "rows": rows, "sweeps": sweeps}
    if ARGS.out:
        os.makedirs(ARGS.out, exist_ok=True)
        with open(os.path.join(ARGS.out, "kernels.json"), "w") as f:
            json.dump(result, f, indent=1)
    print_tables(result)
    return 0 if all_ok else 1


def print_tables(res: dict) -> None:
    meta = res["meta"]
    print(f"\n## Kernels on {meta['device']} ({meta['date']}), torch {meta['torch']}, triton {meta['triton']}")
    print(f"copy bandwidth {meta['copy_bw_GBps']:.0f} GB/s; bf16; span {meta['span']}; chunk {meta['chunk']}")
    worst = max(c["rel_err"] for c in res["checks"]["problems"] + res["checks"]["dtypes"])
    print(f"checks: {'all passed' if res['all_checks_ok'] else 'FAILED'}; max rel err {worst:.2e}")
    if res["sweeps"]:
        print("\nsweep (ctx fixed): default vs best launch parameters")
        for s in res["sweeps"]:
            b = s["best"]
            if b:
                print(f"  {s['model']:9s} B{s['batch']} sel{s['selected']:5d}: default {s['default_us']:7.1f} us, "
                      f"best {b['us']:7.1f} us (m{b['block_m']} n{b['block_n']} w{b['warps']} s{b['stages']} "
                      f"splits {b['splits']} {b['partial']})")  # fmt: skip
    print(
        "\n| model | B | ctx | sel | kernel us | GB/s | % copy | gathered us | x vs gathered | dense us | x vs dense |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in res["rows"]:
        print(f"| {r['model']} | {r['batch']} | {r['context']} | {r['selected']} | {r['kernel_us']:.1f} | "
              f"{r['GBps']:.0f} | {100 * r['frac_copy_bw']:.0f} | {r['gathered_sdpa_us']:.1f} | "
              f"{r['vs_gathered']:.2f} | {r['dense_sdpa_us']:.1f} | {r['vs_dense']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
