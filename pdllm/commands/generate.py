"""`pdllm generate`: answer a question about a context.

Where it runs, by flag: default, an embedded cluster (a private local Ray with one prefill and one decode actor, an
embedded Valkey for the chunk index; the same path `pdllm serve --config` takes); `--config FILE`, the cluster that
file describes; `--server HOST:PORT`, a running `pdllm serve`; `--in-process`, the engine in this process (the only
path that runs the `vanilla` and `prefix` baselines). `--model` defaults to the bundled model."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pdllm.errors import InvalidRequest

# flags a preset may set; their built-in values when neither the flag nor a preset gives one
PRESET_DEFAULTS = {
    "gen_length": 64,
    "block_length": 32,
    "steps": 64,
    "threshold": None,
    "chunk_size": 512,
    "top_k": 8,
    "keep_ratio": 1.0,
    "scoring": "summary",
    "selected_kv": "reuse",
    "mode": None,
}


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gen-length", type=int, default=None, help="default 64")
    p.add_argument("--block-length", type=int, default=None, help="default 32")
    p.add_argument("--steps", type=int, default=None, help="default 64")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    p.add_argument("--threshold", type=float, default=None, help="Fast-dLLM parallel decoding confidence threshold")


def apply_preset(args: argparse.Namespace) -> None:
    """Fill the flags left unset from --preset, then from the built-in defaults (an explicit flag always wins)."""
    from pdllm.method.presets import preset_params

    preset = preset_params(args.preset) if getattr(args, "preset", None) else {}
    for key, default in PRESET_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, preset.get(key, default))


def sampler_from_args(args: argparse.Namespace):
    from pdllm.sampler import SamplerConfig

    return SamplerConfig(
        gen_length=args.gen_length,
        block_length=args.block_length,
        steps=args.steps,
        temperature=args.temperature,
        remasking=args.remasking,
        threshold=args.threshold,
    )


def read_context(args: argparse.Namespace) -> str:
    if args.context_file is None:
        return args.context or ""
    path = Path(args.context_file)
    if not path.is_file():
        raise InvalidRequest(f"context file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"context file {path} is not valid UTF-8") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer a question about a context")
    p.add_argument("--model", help="local model directory (Hugging Face layout); default: the bundled model")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--in-process", action="store_true", help="run the engine here (no Ray, no Redis)")
    where.add_argument("--config", help="cluster config YAML (see deploy/config.example.yaml)")
    where.add_argument("--server", help="HOST:PORT of a running `pdllm serve`")
    p.add_argument("--auth-token", help="--server: bearer token (default $PDLLM_AUTH_TOKEN)")
    p.add_argument("--tls-ca", help="--server: CA certificate (PEM) to verify a TLS server")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--context-file")
    src.add_argument("--context")
    src.add_argument("--example", metavar="TASK", help="a generated task sample (passkey, niah_single, ...) as input")
    p.add_argument("--example-length", type=int, default=2048, help="--example: prompt length in tokens")
    p.add_argument("--question", help="required unless --example gives one")
    p.add_argument(
        "--instruction",
        default="",
        help="task instruction kept whole before the context (never chunked or dropped by selection)",
    )
    p.add_argument(
        "--mode",
        choices=["vanilla", "prefix", "sparse"],
        default=None,
        help="sparse (default) is predictive prefilling; vanilla and prefix are the baselines (--in-process only)",
    )
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--max-context-tokens", type=int, default=131072)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print answer and stats as JSON")
    add_sampler_args(p)
    add_method_args(p)
    p.set_defaults(func=run)


def add_method_args(p: argparse.ArgumentParser) -> None:
    from pdllm.method.presets import PRESETS, describe

    g = p.add_argument_group("predictive prefilling (--mode prefix/sparse)")
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="; ".join(f"{name}: {describe(name)}" for name in sorted(PRESETS)) + " (explicit flags override it)",
    )
    g.add_argument("--chunk-size", type=int, default=None, help="context tokens per chunk (sparse; default 512)")
    g.add_argument("--top-k", type=int, default=None, help="chunks kept per question (sparse; default 8)")
    g.add_argument("--keep-ratio", type=float, default=None, help="fraction of a kept chunk's tokens kept (sparse)")
    g.add_argument(
        "--scoring",
        choices=["summary", "draft"],
        default=None,
        help="chunk ranking: summary (default: question vs mean chunk keys) or draft (likelihood of question + "
        "drafted answer given each chunk)",
    )
    g.add_argument(
        "--selected-kv",
        choices=["reuse", "joint"],
        default=None,
        help="reuse (default: cached chunk KV) or joint (selected chunks re-encoded with instruction + question)",
    )
    g.add_argument("--no-bos", action="store_true", help="ablation: no BOS anchor in front of chunks / the prefix")
    g.add_argument("--keep-question-kv", action="store_true", help="sparse: reuse the question's KV after step 1")


def method_from_args(args: argparse.Namespace):
    from pdllm.method import MethodConfig

    return MethodConfig(
        chunk_size=args.chunk_size,
        top_k=args.top_k,
        keep_ratio=args.keep_ratio,
        use_bos=not args.no_bos,
        keep_question_kv=args.keep_question_kv,
        scoring=args.scoring,
        selected_kv=args.selected_kv,
    )


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def run(args: argparse.Namespace) -> int:
    apply_preset(args)
    example = _example(args)
    context = example.context if example else read_context(args)
    if example and not args.instruction:
        args.instruction = example.instruction
    if not (args.question or "").strip():
        raise InvalidRequest("question is empty" if args.question is not None else "--question is required")
    sampler = sampler_from_args(args)
    sampler.validate()
    method = method_from_args(args)
    method.validate()
    mode = args.mode or "sparse"
    if args.server:
        out = _via_server(args, context, sampler, method, mode)
    elif mode != "sparse" and not args.in_process:
        raise InvalidRequest(f"--mode {mode} is a single-process baseline: add --in-process")
    elif args.in_process:
        out = _in_process(args, context, sampler, method, mode)
    else:
        out = _on_cluster(args, context, sampler, method)
    if example:
        from pdllm.tasks import score

        out["expected"] = list(example.answers)
        out["score"] = score(example.task, out["answer"], example.answers)
    if args.json:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(out["answer"])
        if example:
            print(f"expected: {' | '.join(out['expected'])}  score: {out['score']:g}")
        print(" ".join(f"{k}={v}" for k, v in out["stats"].items()), file=sys.stderr)
    return 0


def _example(args: argparse.Namespace):
    """--example TASK: a sample of the task (seeded by --seed); its question is used unless --question is given."""
    if not args.example:
        return None
    from pdllm.tasks import make_sample

    sample = make_sample(args.example, args.example_length, args.seed)
    args.question = args.question or sample.question
    return sample


def model_dir(args: argparse.Namespace) -> str:
    """--model, or the bundled model shipped in the package."""
    if args.model:
        return args.model
    from pdllm.assets import default_model_dir

    return str(default_model_dir())


def _in_process(args, context: str, sampler, method, mode: str) -> dict:
    from pdllm.engine import generate
    from pdllm.models.loader import load_model

    lm = load_model(model_dir(args), device=args.device)
    out = generate(
        lm,
        context,
        args.question,
        sampler,
        mode,
        args.max_context_tokens,
        args.seed,
        method=method,
        instruction=args.instruction,
    )
    return {"answer": out.answer, "stats": out.stats}


def _on_cluster(args, context: str, sampler, method) -> dict:
    """Start the cluster (embedded by default), answer once through its router, stop what was started."""
    from pdllm.cluster.config import ClusterConfig
    from pdllm.cluster.limits import ClusterLimits
    from pdllm.cluster.runtime import start_cluster

    config = ClusterConfig.from_yaml(args.config) if args.config else ClusterConfig()
    if args.model or not config.model_dir:
        config = config.with_overrides(model_dir=model_dir(args))
    where = f"config {args.config}" if args.config else "embedded: local Ray, embedded Valkey"
    print(f"pdllm: starting the cluster ({where}; model {config.model_dir})", file=sys.stderr, flush=True)
    with start_cluster(config, ClusterLimits(log_level="WARNING")) as handle:  # the answer, not per-job lines
        out = handle.router.generate(
            context, args.question, method, sampler, seed=args.seed, instruction=args.instruction
        )
    return {"answer": out["answer"], "stats": out["stats"]}


def _via_server(args, context: str, sampler, method, mode: str) -> dict:
    """The request through the gRPC API; the method flags the API has no key for must be left at their defaults."""
    from dataclasses import asdict

    from pdllm.client import generate_via_server
    from pdllm.cluster.api_params import PARAM_KEYS

    if args.model:
        raise InvalidRequest("--model does not apply with --server: the server chose its model")
    if args.no_bos or args.keep_question_kv:
        raise InvalidRequest("--no-bos and --keep-question-kv are not request parameters of the server API")
    given = {**asdict(sampler), **asdict(method), "mode": mode, "seed": args.seed, "instruction": args.instruction}
    params = {k: v for k, v in given.items() if k in PARAM_KEYS}
    token = args.auth_token or os.environ.get("PDLLM_AUTH_TOKEN")
    return generate_via_server(args.server, context, args.question, params, auth_token=token, tls_ca=args.tls_ca)
