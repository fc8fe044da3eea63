"""Where a training step's time goes: data generation per batch (as one loader worker makes it), the loader's
batches per second with its workers, and the model step at the real shape: the step as it was (unfused AdamW behind
a host read of the gradient norm, so host and device time add up) against the step as train.py runs it now (fused
AdamW that skips a non-finite update on the device), and on a GPU the device's busy time per step. Batches come in
fresh shapes, as the curriculum makes them, then the same shapes again (warm), so a per-shape host cost shows as
the difference. A mix other than official steps with the chain's losses (pointer, key, match and ranking, across
rows where the mix ranks so). `--variants` adds ways to run the same step (FlexAttention over the segments; compiled
blocks, +compile; all layers as one compiled region, +stack; and the loss's parts, +stack+losses; +packed: the
stack's per-token parts on the batch's tokens alone, not its padding, train.py --pack-tokens), each checked
against the eager SDPA step (loss, gradients) and then timed on the batches it ran; `--flex-options` runs each
+stack flex variant once per set of FlexAttention kernel options (train.py --flex-options), so block sizes, warps,
stages and the block mask's tile (MASK_BLOCK_SIZE) for the bundle's 32-wide heads compare on the same batches; a
set the kernel cannot take is reported as failed and the run goes on.

    python benchmarks/bench_training_step.py --device cuda --json out.json      # one GPU
    python benchmarks/bench_training_step.py --mix recall --variants sdpa,flex,sdpa+compile,flex+compile,flex+stack
    python benchmarks/bench_training_step.py --device cpu --tokens 4096 --steps 4 --shape small
    python benchmarks/bench_training_step.py --mix recall_facts --tokens 65536 --stages recall \
        --variants flex+stack+losses --flex-options '{};{"MASK_BLOCK_SIZE": 64, "BLOCK_M": 64, "BLOCK_N": 64}'

Prints a table of ms per batch (or step) and the ratio old / new measured in the same run; each row goes to stderr as
it is measured, so a run cut short still shows what it measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time

import torch
from torch.nn.attention import sdpa_kernel

from pdllm.training.data import (
    MIXES,
    PAD_ID,
    ROW_FLAGS,
    Batch,
    Example,
    ExampleStream,
    curriculum,
    key_tensors,
    make_batch,
)
from pdllm.training.flex import FlexTuning, flex_tuning
from pdllm.training.objective import MaskedAttention, batch_layout, compile_losses, diffusion_loss
from pdllm.training.optim import make_optimizer, step_if_finite
from pdllm.training.stack import compile_stack
from pdllm.training.train import TRAIN_ATTENTION, build_model, compile_blocks

# the losses of every run of the bundle's chain after the official run (benchmarks/reproduce_bundle.sh)
CHAIN_LOSSES = {"rank_weight": 0.2, "pointer_weight": 0.5, "key_weight": 0.5, "match_weight": 0.5}


def tensor_collate(examples: list[Example]) -> Batch:
    """The collate the official run (the bundle's first) was trained with, a torch.tensor per row and field."""
    t = -(-max(len(e.ids) for e in examples) // 8) * 8
    tq = max(len(e.question) for e in examples)
    b = len(examples)
    ids = torch.full((b, t), PAD_ID, dtype=torch.long)
    pos = torch.zeros((b, t), dtype=torch.long)
    seg = torch.full((b, t), -2, dtype=torch.long)
    answer = torch.zeros((b, t), dtype=torch.bool)
    core = torch.zeros((b, t), dtype=torch.bool)
    question = torch.full((b, tq), PAD_ID, dtype=torch.long)
    question_valid = torch.zeros((b, tq), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n], pos[i, :n], seg[i, :n] = torch.tensor(e.ids), torch.tensor(e.pos), torch.tensor(e.seg)
        answer[i, e.answer_start : n] = True
        core[i, e.answer_start : e.answer_start + e.core_len] = True
        question[i, : len(e.question)] = torch.tensor(e.question)
        question_valid[i, : len(e.question)] = True
    flags = [torch.tensor([getattr(e, f) for e in examples]) for f in ROW_FLAGS]
    width = max(1, *(len(e.pointer) for e in examples))
    pointer_at = torch.zeros((b, width), dtype=torch.long)
    pointer = torch.full((b, width), -1, dtype=torch.long)
    for i, e in enumerate(examples):
        pointer_at[i, : len(e.pointer)] = torch.tensor(e.pointer_at, dtype=torch.long)
        pointer[i, : len(e.pointer)] = torch.tensor(e.pointer, dtype=torch.long)
    keys = key_tensors(examples)
    return Batch(ids, pos, seg, answer, core, *flags, question, question_valid, pointer_at, pointer, *keys)


def data_ms(mix: str, tokens: int, length: int, n: int) -> list[dict]:
    """ms per batch of each stage, one thread (a loader worker's setting), old collate vs new."""
    import pdllm.training.data as data

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for stage in curriculum(mix):
            times = {}
            for name, fn in (("old", tensor_collate), ("new", data.collate)):
                data_collate, data.collate = data.collate, fn
                try:
                    rng = random.Random(0)
                    make_batch(rng, stage, length, tokens, (0.5, 0.0))  # prose loaded, caches warm
                    t0 = time.perf_counter()
                    for _ in range(n):
                        make_batch(rng, stage, length, tokens, (0.5, 0.0))
                    times[name] = 1000 * (time.perf_counter() - t0) / n
                finally:
                    data.collate = data_collate
            rows.append({"what": f"data {mix}/{stage.name}", "old_ms": times["old"], "new_ms": times["new"]})
    finally:
        torch.set_num_threads(threads)
    return rows


def loader_rate(mix: str, tokens: int, length: int, workers: int, seconds: float, stage: int) -> float:
    """Batches per second the DataLoader delivers with `workers` processes (nothing consumes them)."""
    stream = ExampleStream(1234, tokens, length, 0.5, 0, 0.0, stage, mix)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None
    )
    it = iter(loader)
    for _ in range(workers):  # every worker started and warm
        next(it)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    del it
    return n / (time.perf_counter() - t0)


def step_ms(
    model, batches: list[Batch], device: torch.device, new: bool, losses: dict, attention_class=MaskedAttention
) -> float:
    """Mean ms of forward + backward + AdamW over `batches`: the step as it was (unfused AdamW behind a host read of
    the gradient norm) or as train.py runs it now (fused AdamW that skips a non-finite update on the device)."""
    opt = make_optimizer(model, 1e-4) if new else torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    pack = getattr(model.run_layers, "pack", False)  # a +packed variant's stack (training.stack.CompiledStack)
    t0 = time.perf_counter()
    for cpu_batch in batches:
        layout = batch_layout(cpu_batch, pack)
        batch = cpu_batch.to(device)
        with amp, sdpa_kernel(TRAIN_ATTENTION):
            loss, _ = diffusion_loss(model, batch, 0.1, gen, layout=layout, attention_class=attention_class, **losses)
        opt.zero_grad(set_to_none=True)
        with sdpa_kernel(TRAIN_ATTENTION):
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if new:
            step_if_finite(opt, norm)
        elif torch.isfinite(norm):
            opt.step()
    sync()
    return 1000 * (time.perf_counter() - t0) / len(batches)


VARIANTS = (
    "sdpa",
    "flex",
    "sdpa+compile",
    "flex+compile",
    "sdpa+stack",
    "flex+stack",
    "sdpa+stack+losses",
    "flex+stack+losses",
    "flex+stack+losses+packed",
)


def attention_of(variant: str, options: FlexTuning | None = None):
    """The attention class a variant's step runs (training.flex for flex, its block mask in `options`' tiles)."""
    if variant.startswith("flex"):
        from pdllm.training.flex import FlexMaskedAttention

        return FlexMaskedAttention.with_mask_block((options or FlexTuning()).mask_block)
    return MaskedAttention


def set_compiled(model, variant: str, options: FlexTuning | None = None) -> None:
    """Compile the model as the variant's train.py does (+compile: --compile blocks, +stack and +stack+losses:
    --compile stack; `options`: --flex-options), or put the eager methods back."""
    for block in model.layers:
        block.__dict__.pop("project", None)
        block.__dict__.pop("finish", None)
    model.__dict__.pop("run_layers", None)
    if variant.endswith("+compile"):
        compile_blocks(model)
    elif "+stack" in variant:
        compile_stack(model, pack=variant.endswith("+packed"), flex_options=options.kernel if options else None)


def losses_of(variant: str, losses: dict) -> dict:
    """The loss weights, plus the compiled loss parts for a +losses variant (train.py --compile stack+losses)."""
    return losses | {"terms": compiled_terms()} if "+losses" in variant else losses


@functools.cache
def compiled_terms():
    return compile_losses()


def variant_check(
    model, batch: Batch, device: torch.device, losses: dict, variant: str, options: FlexTuning | None = None
) -> dict:
    """The loss and gradients of one step of `variant` against the eager SDPA step (bf16 autocast on the GPU, the
    same masking draw): the largest gradient difference relative to that tensor's largest SDPA gradient."""
    runs = []
    for name in ("sdpa", variant):
        set_compiled(model, name, options)
        model.zero_grad(set_to_none=True)
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with sdpa_kernel(TRAIN_ATTENTION):
                attention = attention_of(name, options)
                kwargs = losses_of(name, losses)
                loss, _ = diffusion_loss(model, batch.to(device), 0.1, gen, attention_class=attention, **kwargs)
                loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((float(loss.detach()), grads))
    set_compiled(model, "sdpa")
    (loss, grads), (v_loss, v_grads) = runs
    worst = max(float((v_grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in grads.items())
    return {"sdpa_loss": loss, "variant_loss": v_loss, "max_rel_grad_diff": worst}


def device_ms(
    model, batches: list[Batch], device: torch.device, losses: dict, kernels: int = 0, attention_class=MaskedAttention
) -> float:
    """GPU busy time per step (the sum of its kernels' times, from the profiler) of the step as train.py runs it:
    against the step's wall time it says whether the host or the device sets the pace. `kernels` > 0 prints that
    many of the kernels with the most device time, with their share of it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step_ms(model, batches, device, True, losses, attention_class)
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:kernels]:
        share = e.self_device_time_total / total
        ms = e.self_device_time_total / 1000 / len(batches)
        print(f"  {share:6.1%} {ms:7.2f} ms/step {e.count // len(batches):5d}x  {e.key[:90]}")
    return total / 1000 / len(batches)


def host_ops(model, batches: list[Batch], device: torch.device, losses: dict, top: int, attention_class) -> None:
    """Print the `top` host-side operations by their own CPU time per step, and the waits on the device (a step
    whose host waits on the GPU cannot run ahead of it: then host and device time add up)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_ms(model, batches, device, True, losses, attention_class)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"host time per step {total / 1000 / len(batches):.1f} ms; by operation (own time, calls per step):")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        ms = e.self_cpu_time_total / 1000 / len(batches)
        print(f"  {e.self_cpu_time_total / total:6.1%} {ms:7.2f} ms/step {e.count / len(batches):7.1f}x  {e.key[:80]}")
    waits = [e for e in events if any(w in e.key for w in ("Synchronize", "_local_scalar_dense", "cudaMemcpy"))]
    for e in waits:
        ms = e.cpu_time_total / 1000 / len(batches)
        print(f"  wait: {e.key[:60]} {e.count / len(batches):.1f}x per step, {ms:.2f} ms")


def row_line(r: dict) -> str:
    """One row of the table."""
    if "batches_per_s" in r:
        return f"{r['what']:<48} {r['batches_per_s']:>9.1f} batches/s"
    if "max_rel_grad_diff" in r:
        return (f"{r['what']:<48} loss {r['sdpa_loss']:.4f} / {r['variant_loss']:.4f}, "
                f"max gradient difference {r['max_rel_grad_diff']:.2e} of the largest")  # fmt: skip
    if "seconds" in r:
        return f"{r['what']:<48} {r['seconds']:>9.1f} s"
    if "error" in r:
        return f"{r['what']:<48} {r['error']}"
    if "device_ms" in r:
        return f"{r['what']:<48} {r['device_ms']:>9.1f} of {r['wall_ms']:.1f} ms wall"
    return f"{r['what']:<48} {r['old_ms']:>9.1f} {r['new_ms']:>9.1f} {r['old_ms'] / r['new_ms']:>8.2f}"


# dynamo's cap on the graphs one code object compiles (renamed in newer PyTorch)
RECOMPILE_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def plan(variants: list[str], flex_options: str | None, mix: str, stage_names: str | None):
    """What a run times: (variant, kernel options) pairs (each +stack flex variant once per option set of
    --flex-options, 'A;B'), the mix's stages, and the indices of those picked (--stages; default its second and last).
    Raises ValueError naming a bad option set or stage."""
    try:
        option_sets = [flex_tuning(t) for t in flex_options.split(";")] if flex_options else [FlexTuning()]
    except ValueError as exc:
        raise ValueError(f"--flex-options: {exc}") from None
    runs = [(v, o) for v in variants if v != "sdpa" for o in (option_sets if "flex+stack" in v else [FlexTuning()])]
    stages = curriculum(mix)
    names = [s.name for s in stages]
    wanted = stage_names.split(",") if stage_names else [names[1], names[-1]]
    if unknown := [n for n in wanted if n not in names]:
        raise ValueError(f"--stages: {', '.join(unknown)} not in the {mix} mix's stages ({', '.join(names)})")
    picked = [names.index(n) for n in wanted]
    # each option set and stage compiles the stack anew (one code object): room for them all before dynamo gives up
    room = max(getattr(torch._dynamo.config, RECOMPILE_LIMIT), 8 * len(runs) * len(picked))
    setattr(torch._dynamo.config, RECOMPILE_LIMIT, room)
    return runs, stages, picked


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="bundle")
    p.add_argument("--mix", default="lookup")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=24, help="batches of fresh shapes per variant")
    p.add_argument("--data-batches", type=int, default=10)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--loader-seconds", type=float, default=4.0)
    p.add_argument("--variants", default="sdpa",
                   help=f"comma list of {', '.join(VARIANTS)}: each checked against SDPA and timed on the same batches "
                   "(flex: training.flex; +compile: train.py --compile blocks; +stack: --compile stack)")  # fmt: skip
    p.add_argument(
        "--kernels", type=int, default=0, help="print the N kernels with the most GPU time, per stage and variant"
    )
    p.add_argument("--host-ops", type=int, default=0, help="print the N host operations with the most CPU time, per "
                   "variant (what a step that the host paces spends its time on)")  # fmt: skip
    p.add_argument("--flex-options", metavar="JSON;JSON...", help="FlexAttention kernel options (train.py "
                   "--flex-options), several sets separated by ';' ('{}': the defaults): each +stack flex variant runs "
                   "once per set")  # fmt: skip
    p.add_argument("--stages", help="comma list of the mix's stage names to time (default: its second and last)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        p.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    if any(v.startswith("flex") for v in variants) and device.type != "cuda":
        p.error("--variants flex needs a GPU: PyTorch's FlexAttention has no backward on the CPU")
    try:
        runs, stages, picked = plan(args.variants.split(","), args.flex_options, args.mix, args.stages)
    except ValueError as exc:
        p.error(str(exc))
    rows: list[dict] = []

    def add(row: dict) -> None:  # progress on stderr as each row is measured; the table on stdout at the end
        rows.append(row)
        print(row_line(row), file=sys.stderr, flush=True)

    for row in data_ms(args.mix, args.tokens, args.length, args.data_batches):
        add(row)
    for stage in picked:
        rate = loader_rate(args.mix, args.tokens, args.length, args.workers, args.loader_seconds, stage)
        add({"what": f"loader {args.workers} workers, {stages[stage].name}", "batches_per_s": rate})
    model = build_model(args.shape, device)
    losses = {"rank_weight": 0.2} if args.mix == "official" else CHAIN_LOSSES
    losses = losses | {"rank_across_rows": MIXES[args.mix].rank_across_rows}
    for stage in picked:
        # two disjoint sets of fresh shapes (one per variant, so neither sees the other's shapes first), each run
        # cold and then again warm
        sets = []
        for seed in (11, 12):
            rng = random.Random(seed)
            sets.append(
                [make_batch(rng, stages[stage], args.length, args.tokens, (0.5, 0.0)) for _ in range(args.steps)]
            )
        step_ms(model, sets[0][:2], device, True, losses)  # kernels loaded, allocator warm
        old_cold, new_cold = (
            step_ms(model, sets[0], device, False, losses),
            step_ms(model, sets[1], device, True, losses),
        )
        old_warm, new_warm = (
            step_ms(model, sets[0], device, False, losses),
            step_ms(model, sets[1], device, True, losses),
        )
        name = stages[stage].name
        add({"what": f"step {name}, fresh shapes", "old_ms": old_cold, "new_ms": new_cold})
        add({"what": f"step {name}, shapes seen", "old_ms": old_warm, "new_ms": new_warm})
        for run, options in runs:
            variant = run + (f" {options.as_json()}" if options != FlexTuning() else "")  # its rows' label
            try:
                check = variant_check(model, sets[1][0], device, losses, run, options)
                vlosses = losses_of(run, losses)
                add({"what": f"{variant} check {name}", **check})
                set_compiled(model, run, options)
                t0 = time.perf_counter()
                attention = attention_of(run, options)
                step_ms(model, sets[0][:4], device, True, vlosses, attention)  # compiles, then dynamic shapes
                add({"what": f"{variant} first 4 steps {name}", "seconds": time.perf_counter() - t0})
                # the batches the SDPA step ran, new to this variant, then again
                cold = step_ms(model, sets[1], device, True, vlosses, attention)
                warm = step_ms(model, sets[1], device, True, vlosses, attention)
                add({"what": f"step {name}, fresh shapes, sdpa/{variant}", "old_ms": new_cold, "new_ms": cold})
                add({"what": f"step {name}, shapes seen, sdpa/{variant}", "old_ms": new_warm, "new_ms": warm})
                if device.type == "cuda":
                    if args.kernels:
                        print(f"kernels of the {name} step, {variant} (share of GPU time, ms a step, launches a step):")
                    busy = device_ms(model, sets[1], device, vlosses, args.kernels, attention)
                    add({"what": f"step {name}, GPU busy, {variant}", "device_ms": busy, "wall_ms": warm})
                if args.host_ops:
                    print(f"host side of the {name} step, {variant}:")
                    host_ops(model, sets[1], device, vlosses, args.host_ops, attention)
            except Exception as exc:
                # an option set the kernel cannot take (no configuration, shared memory): say so and go on
                add({"what": f"{variant} failed {name}", "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            set_compiled(model, "sdpa")
        if device.type == "cuda":
            if args.kernels:
                print(f"kernels of the {name} step (share of GPU time, ms per step, launches per step):")
            busy = device_ms(model, sets[1], device, losses, args.kernels)
            add({"what": f"step {name}, GPU busy", "device_ms": busy, "wall_ms": new_warm})
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), torch "
        f"{torch.__version__}, shape {args.shape}, {args.tokens} tokens per batch, mix {args.mix}"
    )
    print(f"{'what':<48} {'old ms':>9} {'new ms':>9} {'old/new':>8}")
    for r in rows:
        print(row_line(r))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"device": str(device), "torch": torch.__version__, "args": vars(args), "rows": rows}, fh, indent=1
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
