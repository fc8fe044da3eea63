"""Train the small LLaDA-architecture dLLM on synthetic long-context retrieval, resumable within a time limit.

    python -m pdllm.training.train --out runs/tiny --minutes 5 --total-minutes 5 --seed 1234   # the official run
    python -m pdllm.training.train --out runs/r1 --init-from OFFICIAL --mix reading --stage 1 --lr 1e-3 ...  # then
    python -m pdllm.training.train --out runs/tiny --mix varied ...       # plus facts in many wordings and values
    python -m pdllm.training.train --out runs/tiny --resume runs/tiny --minutes 4
    python -m pdllm.training.train --out runs/more --init-from pdllm/assets/pdllm-tiny-llada --mix lookup --stage 1
    python -m pdllm.training.train --smoke --out /tmp/smoke               # a few CPU steps of a tiny config
    python -m pdllm.training.train ... --attention flex --compile         # the same step, 1.8x faster on a GPU
    python -m pdllm.training.train ... --steps 3000                       # planned by steps, not minutes
    python -m pdllm.training.train ... --require copy                     # stop (exit 3) if copy ends below target
    python -m pdllm.training.train ... --stop-after copy                  # save and stop once copy is left; --resume
    python -m pdllm.training.train ... --mark-after copy FILE             # write FILE once copy is left, go on
    python -m pdllm.training.train --export runs/tiny --bundle pdllm/assets/pdllm-tiny-llada

The model is `DllmModel` with a LLaDA spec over the byte tokenizer; `--export` writes it with save_checkpoint (the
real LLaDA layout) plus the tokenizer, so the ordinary loader and engine read it; `--init-from` starts a run from such
a checkpoint's weights (a fresh optimizer, step 0), so training can go on from the bundled model.

Attention runs on PyTorch's flash / memory-efficient / math kernels, never cuDNN's: on Hopper PyTorch puts cuDNN
first for masked bf16 attention, and cuDNN builds an execution plan for every new (batch, length) it sees, tens of ms
of host time each, while the curriculum's batches come in hundreds of shapes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pdllm.models.checkpoint import save_checkpoint
from pdllm.models.generation_defaults import write_generation_defaults
from pdllm.models.tiny import tiny_spec
from pdllm.models.tokenizer import save_byte_tokenizer
from pdllm.models.transformer import DllmModel
from pdllm.training.data import LONG_VALUE_SPAN, MIXES, Batch, ExampleStream, Stage, curriculum
from pdllm.training.flex import MASK_BLOCK, FlexMaskedAttention, FlexTuning, flex_tuning
from pdllm.training.objective import (
    BatchLayout,
    LossTerms,
    MaskedAttention,
    batch_layout,
    compile_losses,
    diffusion_loss,
    key_layer,
)
from pdllm.training.optim import make_optimizer, step_if_finite
from pdllm.training.packed import PackedStream, host_and_device
from pdllm.training.probe import probe_accuracy, probe_batches
from pdllm.training.stack import compile_stack
from pdllm.training.state import load_state, save_state

# train.py's exit status when a --require stage was left on its deadline below its target (the run stopped there;
# benchmarks/reproduce_bundle.sh counts the try as a miss and trains other seeds)
REQUIRED_STAGE_MISSED = 3
TRAIN_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # no cuDNN
SHAPES = {
    "bundle": dict(hidden=256, layers=8, heads=8, inner=704, max_position=4096),
    "wide": dict(hidden=384, layers=8, heads=12, inner=1056, max_position=4096),
    "small": dict(hidden=128, layers=4, heads=4, inner=352, max_position=4096),
    "smoke": dict(hidden=32, layers=2, heads=2, inner=64, max_position=4096),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resume", type=Path)
    p.add_argument("--init-from", type=Path, help="start from this checkpoint's weights (e.g. the bundled model)")
    p.add_argument("--export", type=Path, help="write the model of this training dir as a checkpoint and exit")
    p.add_argument("--bundle", type=Path, help="with --export: the checkpoint directory to write")
    p.add_argument("--export-dtype", choices=("float32", "bfloat16"), default="float32", help="weights as written")
    p.add_argument("--shape", choices=sorted(SHAPES), default="bundle")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--mix", choices=sorted(MIXES), help="training tasks (data.curriculum; default: official, or the "
                   "resumed run's)")  # fmt: skip
    p.add_argument("--minutes", type=float, default=9.0, help="stop and save after this much wall time")
    p.add_argument("--max-steps", type=int, default=None, help="stop at this global step (default: time limit only)")
    p.add_argument("--total-minutes", type=float, default=12.5, help="planned training time over all resumes (LR)")
    p.add_argument("--steps", type=int, help="plan the run by steps instead of minutes: the LR's cosine and the "
                   "stages' deadlines run over this many steps, and the run ends at it (--minutes still saves and "
                   "stops early; --resume goes on)")  # fmt: skip
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--tokens-per-batch", type=int, default=32768)
    p.add_argument("--max-len", type=int, default=2048, help="the training length (the last stage's longest context)")
    p.add_argument("--stage", type=int, default=None, help="curriculum stage to start in (default: 0, or resumed)")
    p.add_argument("--chunked-frac", type=float, default=0.5, help="share of batches in the chunked layout")
    p.add_argument("--text-chunks", type=float, default=None, help="share of chunked rows cut at text borders, as "
                   "`chunking: text` serves contexts (default: the mix's, or the resumed run's; chunks of equal "
                   "pairs then hold them at equal positions)")  # fmt: skip
    p.add_argument("--instruction-apart", action="store_true", default=None, help="chunked rows keep a task's "
                   "instruction as a chunk of its own, as the engine does, not at the head of the first chunk "
                   "(default: off, or the resumed run's)")  # fmt: skip
    p.add_argument("--pretrain-frac", type=float, default=0.0, help="share of rows with whole-sequence masking")
    p.add_argument("--eps", type=float, default=0.1, help="mask ratio t ~ U(eps, 1)")
    p.add_argument("--pad-weight", type=float, default=0.1, help="loss weight of the answer's end-token padding")
    p.add_argument("--rank-weight", type=float, default=0.2, help="weight of the chunk-ranking loss")
    p.add_argument("--pointer-weight", type=float, default=0.0, help="weight of the copy-pointer loss (objective)")
    p.add_argument("--key-weight", type=float, default=0.0, help="weight of the key-gathering loss (objective)")
    p.add_argument("--match-weight", type=float, default=0.0, help="weight of the key-match loss (objective)")
    p.add_argument("--pointer-layer", type=int, help="layer whose head 0 the pointer loss trains (default: 3/4 up)")
    p.add_argument("--attention", choices=("sdpa", "flex"), default="sdpa",
                   help="masked attention: SDPA, or FlexAttention skipping masked blocks (training.flex)")  # fmt: skip
    p.add_argument("--compile", nargs="?", const="stack", choices=("blocks", "stack", "stack+losses"),
                   help="torch.compile all layers with their attention as one region (stack, the default: "
                   "training.stack), or each layer's projections and MLP alone (blocks); stack+losses also the "
                   "loss's tensor-only parts (objective.compile_losses)")  # fmt: skip
    p.add_argument("--pack-tokens", action="store_true",
                   help="with --compile stack: the layers' norms, projections and MLP run on the batch's tokens alone, "
                   "not its padding (training.stack; the same loss and gradients)")  # fmt: skip
    p.add_argument("--packed-batches", action="store_true", help="batches leave the loader's workers as one buffer "
                   "each, pinned, one copy to the GPU (training.packed; one GPU run was slower, NOTES)")  # fmt: skip
    p.add_argument("--flex-options", metavar="JSON",
                   help="with --attention flex and --compile stack: FlexAttention's kernel options as a JSON object, "
                   "and MASK_BLOCK_SIZE, the block mask's tile in tokens (default 128), e.g. "
                   '\'{"MASK_BLOCK_SIZE": 64, "BLOCK_M": 64, "BLOCK_N": 64, "bwd_BLOCK_M1": 16}\' '
                   "(training.flex.flex_tuning; how a step runs, not what it computes)")  # fmt: skip
    p.add_argument("--require", action="append", default=[], metavar="STAGE",
                   help="stop the run (exit 3, state saved) when STAGE is left on its deadline with its probe below "
                   "target: the later stages do not learn what it did not (the official run's copy stage)")  # fmt: skip
    p.add_argument("--stop-after", metavar="STAGE",
                   help="save and stop (exit 0) once STAGE is left, for --resume to go on later (in another "
                   "process: it compiles again)")  # fmt: skip
    p.add_argument("--mark-after", nargs=2, metavar=("STAGE", "FILE"),
                   help="write FILE (the step) once STAGE is left and go on: a script training several seeds at "
                   "once up to a required stage stops the others when one passed it, and that one trains on "
                   "in place (no restart, no second compile)")  # fmt: skip
    p.add_argument("--probe-every", type=int, default=100, help="steps between held-out exact-match probes")
    p.add_argument("--probe-samples", type=int, default=64)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--smoke", action="store_true", help="tiny shape, short sequences, 6 steps on CPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.tokens_per_batch, args.max_len = "smoke", 4096, 1024
        args.max_steps = args.max_steps or args.steps or 6
        args.workers, args.save_every, args.warmup, args.probe_every, args.probe_samples = 1, 3, 2, 2, 4
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps {args.steps}: plan at least one step")
    args.max_steps = args.max_steps or args.steps or 10**9
    if args.attention == "flex" and not torch.cuda.is_available():
        p.error("--attention flex needs a GPU: PyTorch's FlexAttention has no backward on the CPU")
    if args.init_from and args.resume:
        p.error("--init-from and --resume exclude each other (a resumed run has its own weights)")
    if args.pack_tokens and args.compile not in ("stack", "stack+losses"):
        p.error("--pack-tokens packs the compiled stack's tokens: give it with --compile stack or stack+losses")
    if args.flex_options is not None:
        try:
            args.flex_options = flex_tuning(args.flex_options)
        except ValueError as exc:
            p.error(f"--flex-options: {exc}")
        if args.attention != "flex" or args.compile not in ("stack", "stack+losses"):
            p.error("--flex-options tunes the compiled stack's FlexAttention: give it with --attention flex and "
                    "--compile stack or stack+losses")  # fmt: skip
    stage_names = {s.name for mix in MIXES for s in curriculum(mix)}
    marked = args.mark_after[0] if args.mark_after else None
    for flag, name in [*(("--require", n) for n in args.require), ("--stop-after", args.stop_after),
                       ("--mark-after", marked)]:  # fmt: skip
        if name is not None and name not in stage_names:
            p.error(f"{flag} {name}: no such stage (stages: {', '.join(sorted(stage_names))})")
    layers = SHAPES[args.shape]["layers"]
    if args.pointer_layer is not None and not 0 <= args.pointer_layer < layers:
        p.error(f"--pointer-layer {args.pointer_layer}: the {args.shape} shape has layers 0-{layers - 1}")
    if args.pointer_layer == key_layer(layers) and args.pointer_weight > 0 and (args.key_weight or args.match_weight):
        p.error(f"--pointer-layer {args.pointer_layer} is the key layer: the pointer and key losses would train one "
                "head for two jobs")  # fmt: skip
    return args


def planned_frac(step: int, seconds: float, args: argparse.Namespace) -> float:
    """How much of the planned run is done: of its --steps when planned by steps (the same schedule on any GPU, so
    a chain of runs is reproduced step for step), else of its --total-minutes (the step rate is unknown)."""
    done = step / args.steps if args.steps else seconds / (60 * args.total_minutes)
    return min(1.0, done)


def lr_at(step: int, seconds: float, args: argparse.Namespace) -> float:
    """Linear warmup over steps, then cosine to 10% over the planned run (planned_frac)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = planned_frac(step, seconds, args)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def mark_left(path: Path, step: int) -> None:
    """Write `path` whole or not at all (a watcher polling for it never reads half a file)."""
    part = path.with_name(path.name + ".part")
    part.write_text(f"{step}\n")
    part.replace(path)


def advance_reason(stage: Stage, exact_match: float, done_frac: float) -> str | None:
    """Why `stage` is left now: "probe" once the probe reaches its target, else "deadline" once its share of the
    planned run is done; None to stay. A stage left on its deadline hands on a skill its probe did not see learned
    (the copy stage's phase change came just before its deadline in one official run and not by it in another:
    benchmarks/NOTES.md, "The reproduction script end to end")."""
    if stage.advance_at is None:
        return None
    if exact_match >= stage.advance_at:
        return "probe"
    return "deadline" if stage.until is not None and done_frac >= stage.until else None


def resumed_mix(asked: str | None, meta: dict) -> str:
    """The mix a resumed run trains on: its own unless another is asked for. Its stage number indexes that mix's
    curriculum, so resuming into a different mix by omission would train other tasks under the same stage number."""
    saved = meta.get("args", {}).get("mix") or "official"  # runs saved before the mix was recorded: official
    if asked and asked != saved:
        print(f"resuming a run trained on mix {saved!r} with mix {asked!r}: stage {meta.get('stage', 0)} of its "
              "curriculum", file=sys.stderr, flush=True)  # fmt: skip
    return asked or saved


def resume_plan(args: argparse.Namespace, meta: dict) -> None:
    """A resumed run planned by steps goes on to its planned step on the same schedule unless --steps says
    otherwise (a run planned in minutes keeps its --total-minutes, as before)."""
    planned = meta.get("args", {}).get("steps")
    if args.steps is None and planned:
        args.steps = planned
        args.max_steps = min(args.max_steps, planned)  # where the plan ends, or an earlier --max-steps


def resume_layout(args: argparse.Namespace, meta: dict) -> None:
    """A resumed run keeps its rows' layout (--text-chunks, --instruction-apart) unless the flags say otherwise:
    resumed without them, it would go on training another layout than it started on."""
    saved = meta.get("args", {})
    if args.text_chunks is None:
        args.text_chunks = saved.get("text_chunks")
    if args.instruction_apart is None:
        args.instruction_apart = saved.get("instruction_apart")


def run_meta(step: int, args: argparse.Namespace, log: list, seconds: float, stage: int) -> dict:
    plain = {k: _plain(v) for k, v in vars(args).items()}
    return {
        "step": step,
        "stage": stage,
        "seconds": round(seconds, 1),
        "args": plain,
        "log": log,
        "command": " ".join(sys.argv),
    }


def _plain(value):
    """A parsed flag as state.json records it: paths as text, --flex-options as the JSON that gives it."""
    if isinstance(value, Path):
        return str(value)
    return value.as_json() if isinstance(value, FlexTuning) else value


def build_model(shape: str, device: torch.device) -> DllmModel:
    spec = tiny_spec("llada", **SHAPES[shape])
    torch.manual_seed(0)
    model = DllmModel(spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, 0.0, 0.02)
            if name.endswith(("o_proj.weight", "down.weight")):
                p.mul_(1 / math.sqrt(2 * spec.num_layers))
    return model.to(device)


def compile_blocks(model: DllmModel, backend: str = "inductor") -> None:
    """Compile every layer's tensor-only parts (Block.project and Block.finish: norms, projections, RoPE, MLP), where
    an eager step launches hundreds of small elementwise kernels; one compiled graph serves all layers, and new batch
    shapes reuse it once it has seen two (dynamic shapes). The attention context stays eager: it keeps the auxiliary
    losses' captures, and whole-model compilation with dynamic shapes drops them silently (seen on torch 2.13)."""
    for block in model.layers:
        block.project = torch.compile(block.project, backend=backend)
        block.finish = torch.compile(block.finish, backend=backend)


def init_from(model: DllmModel, checkpoint: Path) -> None:
    """Copy the weights of a checkpoint directory (save_checkpoint's layout) into `model`, which must have its
    shape. Bad input: one line naming --init-from."""
    from pdllm.models.loader import load_model

    try:
        source = load_model(checkpoint, device="cpu", dtype=torch.float32).model.state_dict()
    except Exception as e:  # missing, corrupt or foreign checkpoint
        raise SystemExit(f"--init-from {checkpoint}: cannot load a checkpoint ({e})") from None
    own = model.state_dict()
    wrong = [k for k in own if k not in source or source[k].shape != own[k].shape]
    if wrong:
        raise SystemExit(f"--init-from {checkpoint}: not this --shape ({len(wrong)} tensors differ, first {wrong[0]})")
    model.load_state_dict({k: source[k] for k in own})


def export(train_dir: Path, bundle: Path, dtype: str = "float32") -> None:
    meta = json.loads((train_dir / "state.json").read_text())
    model = build_model(meta["args"]["shape"], torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters())
    load_state(train_dir, model, opt)
    model.to(getattr(torch, dtype))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    save_checkpoint(model, bundle, shards=max(1, math.ceil(size / (15 * 2**20))))
    save_byte_tokenizer(bundle)
    write_generation_defaults(bundle, trained_generation())
    print(f"exported step {meta['step']} ({size / 2**20:.1f} MiB {dtype}) to {bundle}")


def trained_generation() -> dict:
    """How the exported model decodes a request that does not say: the longest answer span training denoises, in
    one block, with the evaluation's threshold (a longer span than it saw turns the tiny model's answers to noise)."""
    from pdllm.tasks import TASKS, task_def

    span = max(LONG_VALUE_SPAN, *(task_def(t).gen_length for t in TASKS))
    return {"gen_length": span, "block_length": span, "steps": span, "threshold": 0.9}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export:
        export(args.export, args.bundle or args.out, args.export_dtype)
        return 0
    device = train_device()
    torch.manual_seed(args.seed)
    model = build_model(args.shape, device)
    opt = make_optimizer(model, args.lr)
    step, log, before, stage = 0, [], 0.0, 0
    if args.init_from:
        init_from(model, args.init_from)
    if args.resume:
        meta = load_state(args.resume, model, opt)
        step, log, before, stage = meta["step"], meta.get("log", []), meta.get("seconds", 0.0), meta.get("stage", 0)
        args.mix = resumed_mix(args.mix, meta)
        resume_plan(args, meta)
        resume_layout(args, meta)
    terms = compile_model(model, args.compile, pack=args.pack_tokens, flex_options=args.flex_options)
    train_run(model, opt, args, device, terms, step, log, before, stage)
    return 0


def train_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compile_model(
    model: DllmModel,
    how: str | None,
    backend: str = "inductor",
    pack: bool = False,
    flex_options: FlexTuning | None = None,
) -> LossTerms:
    """train.py --compile: each layer's projections and MLP (blocks) or all layers as one region (stack; `pack`:
    its per-token parts on the batch's tokens alone, --pack-tokens; `flex_options`: --flex-options, whose kernel
    options the stack's FlexAttention takes); returns the loss parts the step runs, compiled for stack+losses
    (compile_losses), else eager."""
    if how == "blocks":
        compile_blocks(model, backend)
    elif how in ("stack", "stack+losses"):
        compile_stack(model, backend, pack, flex_options.kernel if flex_options else None)
    return compile_losses(backend) if how == "stack+losses" else LossTerms()


def attention_class_of(args: argparse.Namespace) -> type[MaskedAttention]:
    """The masked attention a run's training forwards use: FlexAttention under the run's block-mask tile
    (--flex-options' MASK_BLOCK_SIZE), else SDPA's."""
    if args.attention != "flex":
        return MaskedAttention
    return FlexMaskedAttention.with_mask_block(args.flex_options.mask_block if args.flex_options else MASK_BLOCK)


def step_loss(
    model: DllmModel,
    batch: Batch,
    layout: BatchLayout,
    args: argparse.Namespace,
    gen: torch.Generator,
    attention_class: type[MaskedAttention],
    terms: LossTerms,
) -> tuple[torch.Tensor, dict]:
    """A training step's loss and metrics on `batch` (on the device; `layout` from its CPU copy) under the run's
    flags: bf16 autocast on a GPU, no cuDNN attention. The loop and the chain's warm-up (training.chain) both take
    their forwards from here, so the warm-up compiles the graphs the steps run."""
    device_type = batch.ids.device.type
    amp = torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda")
    with amp, sdpa_kernel(TRAIN_ATTENTION):
        return diffusion_loss(
            model, batch, args.eps, gen, layout=layout, attention_class=attention_class, **loss_options(args, terms)
        )


def loss_options(args: argparse.Namespace, terms: LossTerms) -> dict:
    """diffusion_loss's weights and parts under the run's flags (the step benches take the loop's loss from here)."""
    return {
        "pad_weight": args.pad_weight,
        "rank_weight": args.rank_weight,
        "pointer_weight": args.pointer_weight,
        "key_weight": args.key_weight,
        "match_weight": args.match_weight,
        "pointer_at_layer": args.pointer_layer,
        "rank_across_rows": MIXES[args.mix].rank_across_rows,
        "terms": terms,
    }


def step_backward(loss: torch.Tensor) -> None:
    """The backward of step_loss's loss, under the same attention kernels as its forward (no cuDNN)."""
    with sdpa_kernel(TRAIN_ATTENTION):
        loss.backward()


def run_probe(model: DllmModel, batches: list, device: torch.device) -> dict[str, float]:
    """The held-out probe under the step's attention kernels (no cuDNN). The loop and the chain's warm-up both probe
    through here, so the warm-up compiles the probe's forward (no gradients: graphs of its own) before a run."""
    with sdpa_kernel(TRAIN_ATTENTION):
        return probe_accuracy(model, batches, device)


def run_stages(args: argparse.Namespace) -> tuple[Stage, ...]:
    """The run's curriculum: its mix's stages with the run's chunk layout (--text-chunks, --instruction-apart)."""
    return curriculum(args.mix or "official", args.text_chunks, bool(args.instruction_apart))


def train_run(
    model: DllmModel,
    opt: torch.optim.Optimizer,
    args: argparse.Namespace,
    device: torch.device,
    terms: LossTerms,
    step: int = 0,
    log: list | None = None,
    before: float = 0.0,
    stage: int = 0,
    batches: Iterable | None = None,
) -> None:
    """One run's training loop, from `step` (a resumed run's) to its planned end or time limit, saved to
    args.out; the model comes prepared (weights, compilation) with its loss parts (compile_model), so a chain of
    runs can share one (training.chain). `batches`: train over these instead of the run's DataLoader (the loop
    bench's pre-made batches)."""
    log = [] if log is None else log
    args.mix = args.mix or "official"
    stage = stage if args.stage is None else args.stage
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.shape}: {n_params / 1e6:.2f}M params on {device}; step {step}, stage {stage}", flush=True)
    stages = run_stages(args)
    stream = ExampleStream(
        args.seed,
        args.tokens_per_batch,
        args.max_len,
        args.chunked_frac,
        step,
        args.pretrain_frac,
        stage,
        args.mix,
        stages,
    )
    loader = (
        batches
        if batches is not None
        else torch.utils.data.DataLoader(
            PackedStream(stream) if args.packed_batches else stream,
            batch_size=None,
            num_workers=args.workers,
            # a plain Batch crosses the pin thread unpinned (a dataclass it does not look into); the thread alone cost
            # 3 ms a step (benchmarks/NOTES.md, "The loop against the bench"), so only packed batches are pinned
            pin_memory=args.packed_batches and device.type == "cuda",
            prefetch_factor=2 if args.workers else None,
        )
    )
    probes = {i: probe_batches(s, args.max_len, args.probe_samples) for i, s in enumerate(stages)}
    gen = torch.Generator(device=device).manual_seed(args.seed + step)
    attention_class = attention_class_of(args)
    t_start, t_log = time.time(), time.time()
    missed = None  # a --require stage left below its target: the run stops there
    stopped = False  # the --stop-after stage was left: the run stops there, to be resumed
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for item in loader:
        if step >= args.max_steps or time.time() - t_start > 60 * args.minutes:
            break
        host, batch = host_and_device(item, device)
        layout = batch_layout(host, args.pack_tokens)  # on the CPU copy: the step then never waits on the GPU
        for g in opt.param_groups:
            g["lr"] = lr_at(step, before + time.time() - t_start, args)
        loss, metrics = step_loss(model, batch, layout, args, gen, attention_class, terms)
        opt.zero_grad(set_to_none=True)
        step_backward(loss)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        # a non-finite gradient skips the update instead of poisoning the weights, decided on the device
        metrics["skipped"] = step_if_finite(opt, norm)
        step += 1
        for k, v in (metrics | {"loss": loss.detach()}).items():
            sums[k] = sums.get(k, 0) + v
            counts[k] = counts.get(k, 0) + 1
        if step % 50 == 0 or args.smoke:
            n = max(counts.values())
            entry = {"step": step, "stage": stage} | {k: round(float(v) / counts[k], 4) for k, v in sums.items()}
            entry |= {
                "lr": round(opt.param_groups[0]["lr"], 6),
                "T": batch.ids.shape[1],
                "B": batch.ids.shape[0],
                "s": round(before + time.time() - t_start, 1),
                "step_s": round((time.time() - t_log) / n, 3),
            }
            if step % args.probe_every == 0:
                t_probe = time.time()
                entry |= run_probe(model, probes[stage], device)
                entry["probe_s"] = round(time.time() - t_probe, 2)
                reason = advance_reason(stages[stage], entry["em"], planned_frac(step, entry["s"], args))
                if reason == "deadline":
                    left = stages[stage]
                    print(f"stage {left.name} left on its deadline at step {step} with probe {entry['em']:.3f}, "
                          f"below its target {left.advance_at}", file=sys.stderr, flush=True)  # fmt: skip
                    missed = left.name if left.name in args.require else None
                if reason and not missed:
                    stopped = stages[stage].name == args.stop_after
                    if args.mark_after and stages[stage].name == args.mark_after[0]:
                        mark_left(Path(args.mark_after[1]), step)
                    stage += 1
                    stream.stage.value = stage
                    entry["advance"] = stages[stage].name
                    entry["advance_on"] = reason
            log.append(entry)
            print(json.dumps(entry), flush=True)
            sums, counts, t_log = {}, {}, time.time()
            if missed or stopped:
                break
        if step % args.save_every == 0:
            save_state(args.out, model, opt, run_meta(step, args, log, before + time.time() - t_start, stage))
    save_state(args.out, model, opt, run_meta(step, args, log, before + time.time() - t_start, stage))
    print(f"saved step {step} (stage {stage}) to {args.out} after {time.time() - t_start:.0f}s", flush=True)
    if stopped:
        print(f"stopped after stage {args.stop_after} (--stop-after); --resume {args.out} goes on", flush=True)
    if missed:
        print(f"stopped: --require {missed}, and the stage was left below its target (exit {REQUIRED_STAGE_MISSED})",
              file=sys.stderr, flush=True)  # fmt: skip
        raise SystemExit(REQUIRED_STAGE_MISSED)


if __name__ == "__main__":
    sys.exit(main())
