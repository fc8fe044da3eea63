"""No input makes `pdllm` print a traceback: the CLI applies the server's limits (bounded by the model's maximum
length) and names the flag; a directory or empty file as context, a missing CUDA, an allocation the machine refuses
each give one line `pdllm: error: ...` and exit 2. Progress goes to stderr (silenced by --quiet), the statistics
line only with --verbose, --help shows every default and every example task, the score names its metric."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from pdllm.cli import main, out_of_memory
from pdllm.progress import Bar, RequestProgress
from pdllm.tasks import TASKS

SMALL = ["--gen-length", "8", "--block-length", "8", "--steps", "8"]
CONTEXT = "The pass key is 71432. Remember it. " * 6


def one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("pdllm: error: ") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--gen-length", "1000000", "--block-length", "1000000", "--steps", "1"],
            "--gen-length must be an integer in",
        ),
        (["--gen-length", "1000000"], "--gen-length must be an integer in [1, 1024], got 1000000"),
        (["--gen-length", "16", "--block-length", "32"], "--gen-length 16 is not a multiple of block_length 32"),
        (["--steps", "0"], "--steps must be an integer in [1, 4096], got 0"),
        (["--temperature", "-1"], "--temperature must be in [0.0, 2.0]"),
        (["--top-k", "0"], "--top-k must be an integer"),
        (["--keep-ratio", "1.5"], "--keep-ratio must be in (0.0, 1.0]"),
        (["--threshold", "1.5"], "--threshold must be in (0.0, 1.0]"),  # 0 means off
        (["--gen-length", "512", "--block-length", "32", "--steps", "512"], "the model's maximum length of 256"),
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    ],
)
def test_bad_parameters_are_one_line_in_process_and_embedded(short_llada, capsys, flags, message):
    for where in (["--in-process"], []):  # the embedded path checks before starting anything
        if "--device" in flags and not where:
            continue
        argv = ["generate", *where, "--model", str(short_llada), "--context", CONTEXT, "--question", "Key?", *flags]
        assert message in one_line_error(capsys, argv)


def test_bad_context_inputs_are_one_line(tiny_llada, tmp_path, capsys):
    base = ["generate", "--in-process", "--model", str(tiny_llada), "--question", "Key?", *SMALL]
    assert "is a directory" in one_line_error(capsys, [*base, "--context-file", str(tmp_path)])
    assert "does not exist" in one_line_error(capsys, [*base, "--context-file", str(tmp_path / "nope.txt")])
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert f"--context-file {empty} is empty" in one_line_error(capsys, [*base, "--context-file", str(empty)])
    assert "--context is empty" in one_line_error(capsys, [*base, "--context", ""])
    assert "give the context" in one_line_error(capsys, base)
    assert "--question is empty" in one_line_error(capsys, [*base[:-8], "--context", "x", "--question", " ", *SMALL])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA: --device cuda is valid here")
def test_device_cuda_without_cuda_is_one_line(tiny_llada, capsys):
    argv = ["generate", "--in-process", "--model", str(tiny_llada), "--context", CONTEXT, "--question", "Key?"]
    assert "sees no CUDA GPU" in one_line_error(capsys, [*argv, "--device", "cuda"])


def test_a_refused_allocation_is_recognised_as_out_of_memory():
    with pytest.raises(RuntimeError) as err:
        torch.empty(2**50)  # 4 PiB: the allocator refuses it
    assert out_of_memory(err.value) and out_of_memory(MemoryError())
    assert not out_of_memory(RuntimeError("a bug"))


def test_the_real_command_prints_no_traceback(tmp_path):
    """The issue's own reproducer, through the installed entry point."""
    cmd = [sys.executable, "-m", "pdllm.cli", "generate", "--in-process", "--context-file", str(tmp_path)]
    out = subprocess.run([*cmd, "--question", "q"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    cmd = [sys.executable, "-m", "pdllm.cli", "generate", "--in-process", "--context", "x", "--question", "q"]
    out = subprocess.run([*cmd, "--gen-length", "1000000", "--block-length", "1000000", "--steps", "1"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr and "--gen-length" in out.stderr, out.stderr


def test_quiet_verbose_and_the_metric_of_the_score(tiny_llada, capsys):
    argv = ["generate", "--in-process", "--model", str(tiny_llada), "--example", "passkey", "--example-length", "700"]
    assert main([*argv, *SMALL]) == 0
    captured = capsys.readouterr()
    assert "passkey_score:" in captured.out.splitlines()[-1]  # "expected: 12345  passkey_score: 0"
    assert "loading the model" in captured.err and "steps=" not in captured.err  # no stats line by default
    assert main([*argv, *SMALL, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main([*argv, *SMALL, "--verbose"]) == 0
    assert "steps=8" in capsys.readouterr().err
    assert main([*argv, *SMALL, "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["metric"] == "passkey_score"


def test_help_shows_defaults_and_every_example_task(capsys, monkeypatch):
    monkeypatch.setenv("PDLLM_AUTH_TOKEN", "secret-token-from-the-environment")
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(task in text for task in TASKS)
    defaults = ("--gen-length GEN_LENGTH answer tokens (default: the model's generation_defaults.json, else 64",
                "--steps STEPS default: the model's, else 64", "(default 512")  # fmt: skip
    for default in defaults:
        assert default in text, default
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 50051)" in text and "--http-port" in text
    with pytest.raises(SystemExit):
        main(["batch", "submit", "--help"])
    text = capsys.readouterr().out
    assert "--id-only" in text and "secret-token" not in text  # a default from the environment is not shown


@pytest.mark.parametrize("value", ["-1", "lots", "1.5"])
def test_serve_refuses_a_bad_actor_memory_budget_in_one_line_naming_the_flag(value, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--actor-memory-budget-mib", value])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pdllm serve: error: argument --actor-memory-budget-mib: must be")


@pytest.mark.parametrize(
    "flag,value", [("--actor-memory-limit-mib", "-5"), ("--actor-memory-limit-mib", "2.5"),
                   ("--node-memory-refuse-fraction", "1.5"), ("--node-memory-refuse-fraction", "-0.1"),
                   ("--node-memory-refuse-fraction", "most")],
)  # fmt: skip
def test_serve_refuses_a_bad_memory_limit_or_refuse_line_in_one_line_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", flag, value])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"pdllm serve: error: argument {flag}: must be")


def test_serve_refuses_a_budget_at_or_over_the_limit_before_starting_anything(capsys):
    assert main(["serve", "--no-auth", "--actor-memory-budget-mib", "4096", "--actor-memory-limit-mib", "4096"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "pdllm: error: --actor-memory-budget-mib must be below --actor-memory-limit-mib (refuse work before ending)"
    ]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_lines_start_after_a_second_then_come_periodically():
    clock, out = FakeClock(), io.StringIO()
    with Bar("denoise", 10, "steps", out, period_s=2.0, clock=clock, tty=False, quiet=False) as bar:
        bar.update_to(1)
        clock.now = 0.5
        bar.update_to(2)  # a short wait prints nothing
        clock.now = 1.2
        bar.update_to(3)  # past a second: the first line
        clock.now = 2.0
        bar.update_to(4)  # within the period: nothing
        clock.now = 3.3
        bar.update_to(6)
        bar.update_to(10)
    assert out.getvalue().splitlines() == [
        "pdllm: denoise: 3/10 steps",
        "pdllm: denoise: 6/10 steps",
        "pdllm: denoise: 10/10 steps",
    ]


def test_request_progress_shows_prefill_chunks_then_steps():
    clock, out = FakeClock(), io.StringIO()
    shown = RequestProgress(out, clock=clock, tty=False, first_after_s=0.0, period_s=0.0, quiet=False)
    shown({"type": "prefill", "done_chunks": 2, "total_chunks": 4, "reused_chunks": 1})
    shown({"type": "prefill", "done_chunks": 4, "total_chunks": 4, "reused_chunks": 1})
    shown({"type": "step", "step": 1, "total_steps": 2})
    shown({"type": "step", "step": 2, "total_steps": 2})
    shown.close()
    assert out.getvalue().splitlines() == [
        "pdllm: prefill: 2/4 chunks (1 reused)",
        "pdllm: prefill: 4/4 chunks (1 reused)",
        "pdllm: denoise: 1/2 steps",
        "pdllm: denoise: 2/2 steps",
    ]
