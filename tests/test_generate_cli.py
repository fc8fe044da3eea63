"""`pdllm generate` on each of its paths: the embedded cluster (the README's main job: real local Ray, real embedded
Valkey, a prefill and a decode actor), a running server over gRPC, and the in-process baselines' guard."""

from __future__ import annotations

import json

import pytest
from pdllm.cluster.api_backend import InProcessBackend
from pdllm.cluster.api_server import ApiServer, ApiServerConfig

from pdllm.cli import main

SMALL = ["--gen-length", "8", "--block-length", "8", "--steps", "8"]
CONTEXT = "The pass key is 71432. Remember it. " * 6


@pytest.mark.timeout(240)
def test_default_path_is_the_embedded_cluster(tiny_llada, capsys):
    argv = ["generate", "--model", str(tiny_llada), "--context", CONTEXT, "--question", "Key?", "--json", *SMALL]
    assert main([*argv, "--chunk-size", "32", "--top-k", "2"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "embedded: local Ray, embedded Valkey" in captured.err
    stats = out["stats"]
    # the answer came from a decode actor, over chunks a prefill actor encoded for this request
    assert stats["decode_actor"].startswith("pdllm-decode-")
    assert stats["chunks"] == stats["prefill_chunks"] >= 2 and stats["reused_chunks"] == 0
    assert stats["selected_chunks"] == 2 and stats["generated_tokens"] == 8
    assert isinstance(out["answer"], str)


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
        (["--server", "127.0.0.1:1", "--no-bos"], "not request parameters of the server API"),
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
    assert out["score"] in (0.0, 1.0) and out["stats"]["mode"] == "sparse"


def test_presets_are_shown_in_help_and_explicit_flags_win(capsys):
    import argparse

    from pdllm.commands.generate import apply_preset, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--preset {fast,paper}" in text and "scoring=draft" in text and "selected_kv=joint" in text
    args = parser.parse_args(["generate", "--preset", "paper", "--top-k", "2", "--question", "q"])
    apply_preset(args)
    assert (args.chunk_size, args.top_k, args.scoring, args.selected_kv) == (1024, 2, "draft", "joint")
    assert (args.gen_length, args.block_length, args.steps, args.threshold) == (32, 32, 32, 0.9)
    args = parser.parse_args(["generate", "--question", "q"])
    apply_preset(args)  # no preset: the built-in defaults, as before presets existed
    assert (args.chunk_size, args.top_k, args.scoring, args.gen_length, args.threshold) == (512, 8, "summary", 64, None)
