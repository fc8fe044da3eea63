"""Run the tasks through `engine.generate` in each mode and score the answers with the official metrics.

Every sample is built from (task, length, seed, index), so modes and lengths see the same needles and values;
the accuracy difference between modes is then the method's, not the data's.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Iterable
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


def run_one(lm: LoadedModel, sample: Sample, mode: str, cfg: EvalConfig, method) -> dict:
    kwargs = {}
    if method is not None and "method" in inspect.signature(engine.generate).parameters:
        kwargs["method"] = method
    sampler = sampler_for(sample.task, cfg.threshold)
    out = engine.generate(lm, sample.context, sample.question, sampler, mode, max_context_tokens=1 << 20, **kwargs)
    prompt_tokens = 1 + out.stats["context_tokens"] + out.stats["question_tokens"]
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


def run_eval(lm: LoadedModel, cfg: EvalConfig, progress: Callable[[Iterable], Iterable] | None = None) -> list[dict]:
    """All records of cfg, one per (task, length, sample, mode)."""
    cfg.validate()
    method = method_config(cfg) if any(m != "vanilla" for m in cfg.modes) else None
    work = [(t, n, s) for t in cfg.tasks for n in cfg.lengths for s in samples_for(cfg, lm, t, n)]
    random.Random(cfg.seed).shuffle(work)  # a fair progress bar: long and short samples interleaved
    jobs = [(t, n, s, m) for t, n, s in work for m in cfg.modes]
    records = []
    for _task, _length, sample, mode in progress(jobs) if progress else jobs:
        records.append(run_one(lm, sample, mode, cfg, method))
    return records
