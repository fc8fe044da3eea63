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
import time
from dataclasses import replace
from pathlib import Path

from pdllm.commands.engine_args import add_engine_args, cluster_overrides, engine_config, given_flags
from pdllm.errors import InvalidRequest
from pdllm.tasks import TASKS

# Flags left unset take these values; with --example, the task's own (example_defaults).
PLAIN_DEFAULTS = {"gen_length": 64, "block_length": 32, "steps": 64, "threshold": None, "chunk_size": 512, "top_k": 8}
EVAL_METHOD = {"chunk_size": 256, "top_k": 4}  # what benchmarks/train_and_eval.sh evaluates the bundled model with

# flags a preset may set; their built-in values when neither the flag nor a preset gives one
PRESET_DEFAULTS = {
    "gen_length": 64,
    "block_length": 32,
    "steps": 64,
    "threshold": None,
    "chunk_size": 512,
    "chunking": "text",
    "top_k": 8,
    "keep_ratio": 1.0,
    "scoring": "summary",
    "selected_kv": "reuse",
    "mode": None,
}


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gen-length",
        type=int,
        default=None,
        help="answer tokens (default: the model's generation_defaults.json, else 64; --example: the task's)",
    )
    p.add_argument(
        "--block-length", type=int, default=None, help="default: the model's, else 32; --example: the whole answer"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="default: the model's, else 64; --example: one per answer token"
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="Fast-dLLM parallel decoding threshold (default: the model's, else off; --example: 0.9; 0: off)",
    )


def example_defaults(task: str | None, model_defaults: dict | None = None) -> dict:
    """Values for unset flags. A task example decodes and selects as `pdllm eval` scores that task: the task's
    answer span in one block, threshold-0.9 parallel decoding, chunks of 256 and the top 4. Plain input takes the
    plain defaults under the model's own (`model_defaults`, its generation_defaults.json)."""
    if task is None:
        return PLAIN_DEFAULTS | (model_defaults or {})
    from pdllm.tasks import task_def

    n = task_def(task).gen_length
    return {"gen_length": n, "block_length": n, "steps": n, "threshold": 0.9} | EVAL_METHOD


def fill_defaults(args: argparse.Namespace, task: str | None, model_defaults: dict | None = None) -> None:
    """Flags still unset (after --preset): the example's settings or the plain defaults (under the model's own),
    then the built-in ones."""
    from pdllm.models.generation_defaults import request_defaults

    given = {k: getattr(args, k, None) for k in PLAIN_DEFAULTS}
    model_defaults = request_defaults(given, model_defaults or {})  # a decoding flag given: the built-in ones
    for name, value in {**PRESET_DEFAULTS, **example_defaults(task, model_defaults)}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.threshold = args.threshold or None


def apply_preset(args: argparse.Namespace) -> None:
    """Fill the flags left unset from --preset (an explicit flag always wins); fill_defaults does the rest."""
    from pdllm.method.presets import preset_params

    preset = preset_params(args.preset) if getattr(args, "preset", None) else {}
    for key in PRESET_DEFAULTS:
        if getattr(args, key, None) is None and key in preset:
            setattr(args, key, preset[key])


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
    """The context text of --context or --context-file; a missing, unreadable or empty one is a one-line error."""
    if args.context_file is None:
        if args.context is None:
            raise InvalidRequest("give the context: --context TEXT, --context-file FILE or --example TASK")
        if not args.context.strip():
            raise InvalidRequest("--context is empty")
        return args.context
    path = Path(args.context_file)
    if path.is_dir():
        raise InvalidRequest(f"--context-file {path} is a directory, not a file")
    if not path.is_file():
        raise InvalidRequest(f"--context-file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"--context-file {path} is not valid UTF-8") from None
    except OSError as exc:
        raise InvalidRequest(f"--context-file {path} cannot be read: {exc.strerror}") from None
    if not text.strip():
        raise InvalidRequest(f"--context-file {path} is empty")
    return text


def flag_message(message: str) -> str:
    """An API parameter named at the start of `message` written as its command-line flag (gen_length: --gen-length)."""
    from pdllm.cluster.api.params import PARAM_KEYS

    for key in sorted(PARAM_KEYS, key=len, reverse=True):
        if message.startswith(key) and message[len(key) : len(key) + 1] in (" ", ""):
            return "--" + key.replace("_", "-") + message[len(key) :]
    return message


def check_request(args: argparse.Namespace, context: str, mode: str, max_length: int | None) -> dict:
    """The request checked with the server's own limits (cluster/api/params.py), answers bounded by the model's
    maximum length: the same rules for the CLI, the gRPC and HTTP APIs and batch jobs. Returns the params."""
    from pdllm.cluster.api.params import ApiLimits, complete_params, decode_text
    from pdllm.engine import MODES

    limits = ApiLimits().for_model(max_length)
    given = {
        "gen_length": args.gen_length,
        "block_length": args.block_length,
        "steps": args.steps,
        "temperature": args.temperature,
        "remasking": args.remasking,
        "threshold": args.threshold,
        "mode": mode,
        "chunk_size": args.chunk_size,
        "chunking": args.chunking,
        "top_k": args.top_k,
        "keep_ratio": args.keep_ratio,
        "seed": args.seed,
    }
    try:
        decode_text("context", context, limits.max_context_bytes)
        decode_text("question", args.question, limits.max_question_bytes)
        return complete_params(given, MODES, limits)
    except InvalidRequest as exc:
        raise InvalidRequest(flag_message(str(exc))) from None


def check_device(device: str) -> str:
    """cpu, or cuda[:N] where this torch has CUDA (else a one-line error instead of torch's traceback)."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise InvalidRequest(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InvalidRequest(f"--device {device}: this torch build sees no CUDA GPU (use --device cpu)")
        if index and int(index) >= torch.cuda.device_count():
            raise InvalidRequest(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def model_max_length(path: str) -> int:
    """The model's maximum sequence length, from its config.json (no weights loaded)."""
    from pdllm.models.loader import read_config, spec_from_dir_config

    return spec_from_dir_config(read_config(Path(path).expanduser()), Path(path)).max_position


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
    src.add_argument("--example", choices=list(TASKS), help="a generated sample of this task as input")
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
        default="sparse",
        help="sparse is predictive prefilling; vanilla and prefix are the baselines (--in-process only)",
    )
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--max-context-tokens", type=int, default=131072)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print answer and stats as JSON")
    add_output_args(p)
    add_sampler_args(p)
    add_engine_args(p)
    add_method_args(p)
    p.set_defaults(func=run)


def add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    g.add_argument("-v", "--verbose", action="store_true", help="also print the statistics line on stderr")


def add_method_args(p: argparse.ArgumentParser) -> None:
    from pdllm.method.presets import PRESETS, describe

    g = p.add_argument_group("predictive prefilling (--mode prefix/sparse)")
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="; ".join(f"{name}: {describe(name)}" for name in sorted(PRESETS)) + " (explicit flags override it)",
    )
    g.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default 512; --example: 256)")
    g.add_argument(
        "--chunking",
        choices=["text", "fixed"],
        default=None,
        help="where chunks end: text (default: at a sentence, clause or word border in each chunk's last half, so "
        "a sentence or a JSON pair is not cut) or fixed (every --chunk-size tokens)",
    )
    g.add_argument("--top-k", type=int, default=None, help="chunks kept per question (default 8; --example: 4)")
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
        chunking=args.chunking,
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
    from pdllm import progress

    progress.configure(quiet=args.quiet)
    apply_preset(args)
    example = _example(args)
    fill_defaults(args, example.task if example else None, local_model_defaults(args))
    context = example.context if example else read_context(args)
    if example and not args.instruction:
        args.instruction = example.instruction
    if not (args.question or "").strip():
        raise InvalidRequest("--question is empty" if args.question is not None else "--question is required")
    mode = args.mode
    check_request(args, context, mode, None)  # the API's limits; the paths below also bound by the model's length
    method = method_from_args(args)
    try:
        method.validate()
    except InvalidRequest as exc:
        raise InvalidRequest(flag_message(str(exc))) from None
    if args.server:
        out = _via_server(args, context, mode)
    elif mode != "sparse" and not args.in_process:
        raise InvalidRequest(f"--mode {mode} is a single-process baseline: add --in-process")
    elif args.in_process:
        check_device(args.device)
        params = check_request(args, context, mode, model_max_length(model_dir(args)))
        out = _in_process(args, context, params, method, mode)
    else:
        out = _on_cluster(args, context, method)
    if example:
        from pdllm.tasks import metric_name, score

        out["expected"] = list(example.answers)
        out["score"] = score(example.task, out["answer"], example.answers)
        out["metric"] = metric_name(example.task)
    if args.json:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(out["answer"])
        if example:
            print(f"expected: {' | '.join(out['expected'])}  {out['metric']}: {out['score']:g}")
        if args.verbose:
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


def local_model_defaults(args: argparse.Namespace) -> dict:
    """The decoding defaults of the model this run loads (its generation_defaults.json); {} with --server, where
    the flags left at the plain defaults are sent as they are."""
    from pdllm.models.generation_defaults import generation_defaults

    if args.server:
        return {}
    if args.config and not args.model:
        from pdllm.cluster.config import ClusterConfig

        return generation_defaults(ClusterConfig.from_yaml(args.config).model_dir or model_dir(args))
    return generation_defaults(model_dir(args))


def model_dir(args: argparse.Namespace) -> str:
    """--model, or the bundled model shipped in the package."""
    if args.model:
        return args.model
    from pdllm.assets import default_model_dir

    return str(default_model_dir())


def _in_process(args, context: str, params: dict, method, mode: str) -> dict:
    from pdllm import progress
    from pdllm.cluster.api.params import sampler_from_params
    from pdllm.engine import engine_for, generate, release_engine
    from pdllm.models.loader import load_model

    engine = engine_config(args)
    progress.note(f"loading the model ({model_dir(args)}) on {args.device}")
    lm = load_model(model_dir(args), device=args.device)
    sampler = sampler_from_params(params)
    shown = progress.RequestProgress()
    total = sampler.steps if sampler.threshold is None else sampler.gen_length
    try:
        out = generate(
            lm, context, args.question, sampler, mode, args.max_context_tokens, args.seed, shown.on_step(total),
            method=method, engine=engine_for(lm, engine), instruction=args.instruction,
        )  # fmt: skip
    finally:
        shown.close()
        release_engine(lm)  # the model was loaded for this answer: its pool is freed now, not at exit
    return {"answer": out.answer, "stats": out.stats}


def _on_cluster(args, context: str, method) -> dict:
    """Start the cluster (embedded by default), answer once through its router, stop what was started."""
    from pdllm import progress
    from pdllm.cluster.api.params import sampler_from_params
    from pdllm.cluster.config import ClusterConfig
    from pdllm.cluster.runtime import start_cluster

    config = ClusterConfig.from_yaml(args.config) if args.config else ClusterConfig()
    if args.model or not config.model_dir:
        config = config.with_overrides(model_dir=model_dir(args))
    config = config.with_overrides(**cluster_overrides(args))
    config.validate()
    params = check_request(args, context, "sparse", model_max_length(config.model_dir))  # before anything starts
    where = f"config {args.config}" if args.config else "embedded: local Ray, embedded Valkey"
    progress.note(f"starting the cluster ({where}; model {config.model_dir})")
    started = time.monotonic()
    stage = lambda text: progress.note(f"  {text} ({time.monotonic() - started:.1f} s)")  # noqa: E731
    with start_cluster(config, replace(config.limits, log_level="WARNING"), on_stage=stage) as handle:
        shown = progress.RequestProgress()
        try:
            out = handle.router.generate(
                context, args.question, method, sampler_from_params(params), seed=args.seed, on_event=shown,
                instruction=args.instruction,
            )  # fmt: skip
        finally:
            shown.close()
    return {"answer": out["answer"], "stats": out["stats"]}


def _via_server(args, context: str, mode: str) -> dict:
    """The request through the gRPC API (streamed, for progress); the method flags the API has no key for must be
    left at their defaults."""
    from dataclasses import asdict

    from pdllm import progress
    from pdllm.client import Client
    from pdllm.cluster.api.params import PARAM_KEYS

    if args.model:
        raise InvalidRequest("--model does not apply with --server: the server chose its model")
    if flags := given_flags(args):
        raise InvalidRequest(f"{', '.join(flags)}: not a request parameter; the server sets its own engine and stores")
    if args.no_bos:
        raise InvalidRequest("--no-bos is not a request parameter of the server API")
    given = {
        **asdict(sampler_from_args(args)),
        **asdict(method_from_args(args)),
        "mode": mode,
        "seed": args.seed,
        "instruction": args.instruction,
    }
    params = {k: v for k, v in given.items() if k in PARAM_KEYS}
    token = args.auth_token or os.environ.get("PDLLM_AUTH_TOKEN")
    shown, final = progress.RequestProgress(), None
    try:
        with Client(args.server, auth_token=token, tls_ca=args.tls_ca, timeout_s=600.0) as client:
            for event in client.generate_stream(context, args.question, params):  # read to its end: completed
                if event["type"] == "final":
                    final = {k: event[k] for k in ("answer", "stats", "request_id")}
                else:
                    shown(event)
    finally:
        shown.close()
    if final is None:
        raise InvalidRequest("the server ended the stream without an answer")
    return final
