"""Run the tasks through `engine.generate` in each mode and score the answers with the official metrics.

Every sample is built from (task, length, seed, index), so modes and lengths see the same needles and values;
the accuracy difference between modes is then the method's, not the data's.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pdllm import engine
from pdllm.errors import InvalidRequest
from pdllm.models.loader import LoadedModel
from pdllm.sampler import SamplerConfig
from pdllm.tasks import Sample, make_sample, score, task_def, tokenizer_counter


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    modes: tuple[str, ...] = ("vanilla",)
    samples: int = 10
    seed: int = 0
    depths: tuple[float, ...] | None = None  # fixed depths (a sweep); None: each sample draws its own
    threshold: float | None = 0.9  # Fast-dLLM parallel decoding; None: one token per step
    bos_anchor: bool = True  # False: the --no-bos ablation (chunks encoded without their BOS anchor)
    method: dict = field(default_factory=dict)  # MethodConfig fields for prefix/sparse (chunk size, top-k, ...)
    cell_seconds: float | None = None  # time budget per (task, length): later samples are skipped, in every mode

    def validate(self) -> None:
        for t in self.tasks:
            task_def(t)
        if not self.lengths or any(n < 640 for n in self.lengths):
            raise InvalidRequest(f"lengths must be >= 640 tokens, got {list(self.lengths)}")
        unknown = [m for m in self.modes if m not in engine.MODES]
        if unknown:
            raise InvalidRequest(f"unknown mode(s) {', '.join(unknown)}; this engine has {', '.join(engine.MODES)}")
        if self.samples < 1:
            raise InvalidRequest(f"samples must be >= 1, got {self.samples}")
        if self.cell_seconds is not None and self.cell_seconds <= 0:
            raise InvalidRequest(f"cell time budget must be > 0 seconds, got {self.cell_seconds}")


def sampler_for(task: str, threshold: float | None) -> SamplerConfig:
    n = task_def(task).gen_length
    return SamplerConfig(gen_length=n, block_length=n, steps=n, threshold=threshold)


def method_config(cfg: EvalConfig):
    """The engine's MethodConfig for prefix/sparse, built from cfg.method and the BOS flag (None if absent)."""
    method_cls = getattr(engine, "MethodConfig", None)
    if method_cls is None:
        return None
    names = set(inspect.signature(method_cls).parameters)
    kw = {k: v for k, v in cfg.method.items() if k in names}
    unknown = sorted(set(cfg.method) - names)
    if unknown:
        raise InvalidRequest(f"MethodConfig has no field(s) {', '.join(unknown)}; fields: {', '.join(sorted(names))}")
    for flag in ("bos_anchor", "use_bos", "bos"):
        if flag in names:
            kw[flag] = cfg.bos_anchor
            break
    else:
        if not cfg.bos_anchor:
            raise InvalidRequest("this engine's MethodConfig has no BOS-anchor switch: --no-bos is unavailable")
    return method_cls(**kw)


DENSE_MODES = ("vanilla", "prefix")  # the question sits after the whole context: positions grow with it


def beyond_length(lm: LoadedModel, sample: Sample, mode: str) -> str | None:
    """Why `mode` cannot run `sample` on this model (its positions pass the model's maximum length), or None.
    Sparse mode places the question after the longest selected chunk, so only the dense baselines hit this."""
    limit = lm.spec.max_position
    if mode not in DENSE_MODES or not limit:
        return None
    count = tokenizer_counter(lm.tokenizer)
    needed = 1 + count(sample.prompt_text) + count(sample.question) + sampler_for(sample.task, None).gen_length + 16
    if needed <= limit:
        return None
    return f"positions beyond the model's maximum length {limit}"


def skipped_record(sample: Sample, mode: str, reason: str) -> dict:
    """A record for a generation that was not run (summaries count it apart and print n/a)."""
    return {"task": sample.task, "length": sample.length, "mode": mode, "depth": round(sample.depth, 4),
            "gold": sample.answers[0], "skipped": reason}  # fmt: skip


def run_one(lm: LoadedModel, sample: Sample, mode: str, cfg: EvalConfig, method) -> dict:
    if reason := beyond_length(lm, sample, mode):
        return skipped_record(sample, mode, reason)
    kwargs = {}
    if method is not None and "method" in inspect.signature(engine.generate).parameters:
        kwargs["method"] = method
    sampler = sampler_for(sample.task, cfg.threshold)
    if "instruction" in inspect.signature(engine.generate).parameters:
        kwargs["instruction"] = sample.instruction
        context = sample.context
    else:  # an engine without an instruction slot reads it as the context's start
        context = sample.prompt_text
    out = engine.generate(lm, context, sample.question, sampler, mode, max_context_tokens=1 << 20, **kwargs)
    prompt_tokens = 1 + out.stats.get("instruction_tokens", 0) + out.stats["context_tokens"]
    prompt_tokens += out.stats["question_tokens"]
    kv = out.stats.get("kv_tokens_per_step")
    if kv is None and mode == "vanilla":
        kv = prompt_tokens + sampler.gen_length  # vanilla re-encodes and attends over the whole sequence
    return {
        "task": sample.task,
        "length": sample.length,
        "prompt_tokens": prompt_tokens,
        "mode": mode,
        "depth": round(sample.depth, 4),
        "gold": sample.answers[0],
        "kind": sample.meta.get("kind", "digits" if sample.answers[0].isdigit() else "uuid"),
        "answer": out.answer,
        "score": score(sample.task, out.answer, sample.answers),
        "steps": out.stats["steps"],
        "mean_step_ms": out.stats["mean_step_ms"],
        "kv_tokens_per_step": kv,
    }


def samples_for(cfg: EvalConfig, lm: LoadedModel, task: str, length: int) -> list[Sample]:
    count = tokenizer_counter(lm.tokenizer)
    if cfg.depths is None:
        return [make_sample(task, length, cfg.seed * 1_000_003 + i, count) for i in range(cfg.samples)]
    out = []
    for d in cfg.depths:
        out += [make_sample(task, length, cfg.seed * 1_000_003 + i, count, depth=d) for i in range(cfg.samples)]
    return out


def run_eval(lm: LoadedModel, cfg: EvalConfig, progress: Callable[[int], object] | None = None) -> list[dict]:
    """All records of cfg, one per (task, length, sample, mode). Each sample runs in every mode before the next,
    so when a (task, length) cell spends its time budget (counted from its second sample), every mode has seen the
    same samples.
    `progress(n)` is told of each finished or skipped generation."""
    cfg.validate()
    method = method_config(cfg) if any(m != "vanilla" for m in cfg.modes) else None
    records = []
    for task in cfg.tasks:
        for length in cfg.lengths:
            samples = samples_for(cfg, lm, task, length)
            if cfg.depths is not None:  # a sweep: interleave depths so a cut budget leaves every depth sampled
                samples = [samples[d * cfg.samples + i] for i in range(cfg.samples) for d in range(len(cfg.depths))]
            t0 = time.perf_counter()
            for i, sample in enumerate(samples):
                if i and cfg.cell_seconds is not None and time.perf_counter() - t0 > cfg.cell_seconds:
                    if progress:
                        progress((len(samples) - i) * len(cfg.modes))
                    break
                for mode in cfg.modes:
                    records.append(run_one(lm, sample, mode, cfg, method))
                    if progress:
                        progress(1)
                if i == 0:  # the budget starts after the first sample, which carries one-time kernel compilation
                    t0 = time.perf_counter()
    return records
