"""`pdllm generate`: answer a question about a context with a local model (in-process)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pdllm.errors import InvalidRequest


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    p.add_argument("--threshold", type=float, default=None, help="Fast-dLLM parallel decoding confidence threshold")


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
    p.add_argument("--model", required=True, help="local model directory (Hugging Face layout)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--context-file")
    src.add_argument("--context")
    p.add_argument("--question", required=True)
    p.add_argument("--mode", choices=["vanilla", "prefix", "sparse"], default="vanilla")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--max-context-tokens", type=int, default=131072)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print answer and stats as JSON")
    add_sampler_args(p)
    add_method_args(p)
    p.set_defaults(func=run)


def add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("predictive prefilling (--mode prefix/sparse)")
    g.add_argument("--chunk-size", type=int, default=512, help="context tokens per chunk (sparse)")
    g.add_argument("--top-k", type=int, default=8, help="chunks kept per question (sparse)")
    g.add_argument("--keep-ratio", type=float, default=1.0, help="fraction of a kept chunk's tokens kept (sparse)")
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
    )


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def run(args: argparse.Namespace) -> int:
    from pdllm.engine import generate
    from pdllm.models.loader import load_model

    context = read_context(args)
    sampler = sampler_from_args(args)
    sampler.validate()
    method = method_from_args(args)
    method.validate()
    if not args.question.strip():
        raise InvalidRequest("question is empty")
    lm = load_model(args.model, device=args.device)
    out = generate(lm, context, args.question, sampler, args.mode, args.max_context_tokens, args.seed, method=method)
    if args.json:
        json.dump({"answer": out.answer, "stats": out.stats}, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(out.answer)
        print(" ".join(f"{k}={v}" for k, v in out.stats.items()), file=sys.stderr)
    return 0
