"""`pdllm generate` on each of its paths: the embedded cluster (the README's main job: real local Ray, real embedded
Valkey, a prefill and a decode actor), a running server over gRPC, and the in-process baselines' guard."""

from __future__ import annotations

import json

import pytest
from pdllm.cluster.api.in_process import InProcessBackend
from pdllm.cluster.api.server import ApiServer, ApiServerConfig

from pdllm.cli import main
from pdllm.method import MethodConfig, chunk_context
from pdllm.models.tokenizer import build_byte_tokenizer
from pdllm.prompt import encode_request
from pdllm.tasks import TASKS

SMALL = ["--gen-length", "8", "--block-length", "8", "--steps", "8"]
CONTEXT = "The pass key is 71432. Remember it. " * 6
TOKENIZER = build_byte_tokenizer()  # the tiny models' tokenizer


@pytest.mark.timeout(240)
def test_default_path_is_the_embedded_cluster(tiny_llada, capsys):
    argv = ["generate", "--model", str(tiny_llada), "--context", CONTEXT, "--question", "Key?", "--json", *SMALL]
    assert main([*argv, "--chunk-size", "32", "--top-k", "2"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "embedded: local Ray, embedded Valkey" in captured.err
    for stage in ("Redis ready (embedded Valkey)", "Ray ready", "actors ready 2/2"):  # cluster start progress
        assert stage in captured.err, captured.err
    assert "steps=" not in captured.err  # the statistics line only with --verbose
    stats = out["stats"]
    # the answer came from a decode actor, over chunks a prefill actor encoded for this request
    assert stats["decode_actor"].startswith("pdllm-decode-")
    chunks = chunk_context(TOKENIZER, encode_request(TOKENIZER, CONTEXT, "q").context_ids, MethodConfig(chunk_size=32))
    assert stats["chunks"] == len(chunks) == stats["prefill_chunks"] + stats["reused_chunks"]  # cut at text borders
    assert stats["prefill_chunks"] == len({tuple(c) for c in chunks}) >= 2  # a repeated chunk is encoded once
    assert stats["selected_chunks"] == 2 and stats["generated_tokens"] == 8
    assert isinstance(out["answer"], str)


@pytest.mark.timeout(240)
def test_store_bytes_sizes_the_embedded_clusters_chunk_store(tiny_llada, capsys):
    """--store-bytes reaches the prefill actor: a store smaller than the context's KV refuses it, naming the store
    and the flag, before the decode actor runs."""
    argv = ["generate", "--model", str(tiny_llada), "--context", CONTEXT, "--question", "Key?", *SMALL]
    assert main([*argv, "--chunk-size", "32", "--top-k", "2", "--store-bytes", "4096"]) == 2
    err = capsys.readouterr().err
    assert "do not fit prefill actor" in err and "(4096 bytes;" in err and "--store-bytes" in err, err


def test_server_path_prints_the_servers_answer(tiny_llada, capsys):
    backend = InProcessBackend.from_directory(str(tiny_llada), name="tiny")
    try:
        with ApiServer(backend, ApiServerConfig(port=0, auth_token="t0k")) as server:
            argv = ["generate", "--server", server.address, "--auth-token", "t0k", "--context", CONTEXT]
            assert main([*argv, "--question", "Key?", "--json", "--mode", "prefix", *SMALL]) == 0
            assert server.servicer.counters["completed"] == 1
            wrong = ["generate", "--server", server.address, "--auth-token", "nope", "--context", "x"]
            assert main([*wrong, "--question", "q", *SMALL]) != 0
    finally:
        backend.close()
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert out["stats"]["mode"] == "prefix" and out["stats"]["steps"] == 8
    assert set(out) == {"request_id", "answer", "stats"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "vanilla"], "--mode vanilla is a single-process baseline: add --in-process"),
        (["--server", "127.0.0.1:1", "--model", "x"], "--model does not apply with --server"),
        (["--server", "127.0.0.1:1", "--no-bos"], "--no-bos is not a request parameter of the server API"),
        (
            ["--server", "127.0.0.1:1", "--pool-bytes", "1", "--store-bytes", "1"],
            "--pool-bytes, --store-bytes: not a request parameter; the server sets its own",
        ),
    ],
)
def test_flag_combinations_that_cannot_work_exit_2(extra, message, capsys):
    assert main(["generate", "--context", "x", "--question", "q", *extra]) == 2
    assert message in capsys.readouterr().err


def test_example_input_reports_expected_answer_and_score(tiny_llada, capsys):
    argv = ["generate", "--in-process", "--model", str(tiny_llada), "--example", "passkey", "--example-length", "700"]
    assert main([*argv, "--json", *SMALL]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["expected"]) == 1 and out["expected"][0].isdigit()  # the sample's pass key
    from pdllm.tasks import score

    assert out["score"] == score("passkey", out["answer"], out["expected"])  # the task's metric of this answer
    assert out["stats"]["mode"] == "sparse"


@pytest.mark.parametrize("task", list(TASKS))  # the five official families, facts, held-out wordings, value kinds
def test_examples_answer_right_with_the_bundled_model_by_default(task, capsys):
    assert main(["generate", "--in-process", "--example", task, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"].strip() == out["expected"][0] and out["score"] == 1.0
    assert out["stats"]["mode"] == "sparse"


@pytest.mark.parametrize(
    ("context", "question", "value"),
    [
        ("The vault code is 4471-KESTREL.", "What is the vault code?", "4471-KESTREL"),  # issue 22's user note
        (  # a held-out wording, with a distractor fact
            "My notebook lists QX-7741-B under the locker combination. The wifi password is walnut-42.",
            "What is the locker combination?",
            "QX-7741-B",
        ),
    ],
)
def test_the_bundled_model_reads_a_fact_from_a_users_own_note(context, question, value, capsys):
    assert main(["generate", "--in-process", "--context", context, "--question", question, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"].strip() == value


def test_unset_flags_take_the_tasks_settings_only_for_examples():
    import argparse

    from pdllm.commands.generate import PLAIN_DEFAULTS, fill_defaults

    names = dict.fromkeys(PLAIN_DEFAULTS)
    plain, example, chosen = (argparse.Namespace(**names) for _ in range(3))
    fill_defaults(plain, None)
    fill_defaults(example, "kv_retrieval")
    chosen.gen_length, chosen.threshold = 8, 0.0
    fill_defaults(chosen, "passkey")
    assert {k: getattr(plain, k) for k in PLAIN_DEFAULTS} == PLAIN_DEFAULTS
    assert (example.gen_length, example.block_length, example.threshold, example.top_k) == (48, 48, 0.9, 4)
    assert chosen.gen_length == 8 and chosen.threshold is None and chosen.steps == 16  # given flags win; 0 is off


def test_engine_flag_defaults_in_help_are_the_engines():
    from pdllm.decode_node.engine import EngineConfig

    from pdllm.commands import engine_args

    cfg = EngineConfig()
    assert engine_args.MAX_BATCH == cfg.max_batch
    assert engine_args.GRAPH_BUCKETS == ",".join(map(str, cfg.graph_buckets))


def test_engine_flags_reach_the_in_process_engine_and_bad_ones_are_named(tmp_path):
    import argparse

    from pdllm.commands.engine_args import add_engine_args, cluster_overrides, engine_config
    from pdllm.errors import InvalidRequest

    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = p.parse_args(["--max-batch", "4", "--pool-bytes", "65536", "--graph-buckets", "4,1,2"])
    cfg = engine_config(args)
    assert (cfg.max_batch, cfg.pool_bytes, cfg.graph_buckets) == (4, 65536, (1, 2, 4))
    args.store_bytes = 1 << 20  # --store-bytes: the cluster's prefill actors only
    assert cluster_overrides(args) == {
        "decode_max_batch": 4,
        "decode_pool_bytes": 65536,
        "decode_graph_buckets": "4,1,2",
        "store_capacity_bytes": 1 << 20,
    }
    with pytest.raises(InvalidRequest, match="--store-bytes sizes the cluster's prefill actors' chunk stores"):
        engine_config(args)
    for bad, flag in ((["--max-batch", "0"], "--max-batch"), (["--graph-buckets", "a,b"], "--graph-buckets")):
        with pytest.raises(InvalidRequest, match=flag):
            engine_config(p.parse_args(bad))


def test_presets_are_shown_in_help_and_explicit_flags_win(capsys):
    import argparse

    from pdllm.commands.generate import apply_preset, fill_defaults, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--preset {fast,paper}" in text and "scoring=draft" in text and "selected_kv=joint" in text
    args = parser.parse_args(["generate", "--preset", "paper", "--top-k", "2", "--question", "q"])
    apply_preset(args)
    fill_defaults(args, None)
    assert (args.chunk_size, args.top_k, args.scoring, args.selected_kv) == (1024, 2, "draft", "joint")
    assert args.chunking == "fixed"  # the paper cuts fixed chunks
    assert (args.gen_length, args.block_length, args.steps, args.threshold) == (32, 32, 32, 0.9)
    args = parser.parse_args(["generate", "--question", "q"])
    apply_preset(args)  # no preset: nothing set here; fill_defaults gives the built-in defaults, as before presets
    fill_defaults(args, None)
    assert (args.chunk_size, args.top_k, args.scoring, args.gen_length, args.threshold) == (512, 8, "summary", 64, None)
    assert args.chunking == "text"
    args = parser.parse_args(["generate", "--preset", "paper", "--chunking", "text", "--question", "q"])
    apply_preset(args)
    assert args.chunking == "text"  # the flag over the preset
