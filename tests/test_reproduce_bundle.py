"""The bundle's reproduction script checks the official run before building the chain on it: tries in rounds of several
seeds at once, each stopped where it missed its copy stage or passed it, those that passed going on alone until one
ends over the probe floor (runlog); it stops with a named cause when no try learned. official_seeds.sh trains several
seeds at once. Smoke-shaped runs on the CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pdllm.training.runlog import main as runlog_main
from pdllm.training.runlog import read_log

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SCRIPT = ROOT / "benchmarks" / "reproduce_bundle.sh"


def test_runlog_reads_the_bundles_official_run_and_the_one_that_did_not_learn():
    bundle = read_log(RESULTS / "eval_2026-11-30_h200_training_log.txt")
    assert bundle.last_probe["em"] == pytest.approx(0.391) and bundle.last_probe["step"] == 3400
    assert [a["advance"] for a in bundle.advances] == ["tasks", "long"]
    failed = read_log(RESULTS / "train_2026-12-06_h100_short_chain_official_log.txt")
    assert failed.last_probe["em"] == 0.0 and "to tasks at step 1100" in failed.describe()
    assert runlog_main([str(RESULTS / "eval_2026-11-30_h200_training_log.txt"), "--min-em", "0.2"]) == 0
    assert runlog_main([str(RESULTS / "train_2026-12-06_h100_short_chain_official_log.txt"), "--min-em", "0.2"]) == 1


def test_runlog_passes_a_run_without_probes_and_names_a_missing_log(tmp_path, capsys):
    log = tmp_path / "log.txt"
    log.write_text('model smoke\n{"step": 1, "stage": 0, "loss": 5.0}\nsaved step 1\n')
    assert read_log(log).last_probe is None
    assert runlog_main([str(log), "--min-em", "0.5"]) == 0
    assert "no probe" in capsys.readouterr().out
    assert runlog_main([str(tmp_path / "missing.txt")]) == 2
    assert "no such log" in capsys.readouterr().err


def script_env(**env_vars: str) -> dict[str, str]:
    """The benchmark scripts' environment here: this interpreter first on PATH (they call python3), smoke-shaped
    runs of two planned steps, then `env_vars`."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "TRAIN_FLAGS": "--smoke", "OFFICIAL_STEPS": "2", **env_vars}


def run_script(out: Path, min_probe: str, *runs: str, **env_vars: str) -> subprocess.CompletedProcess:
    """The script on smoke-shaped runs, two tries at most; its copy stage is not required unless asked
    (OFFICIAL_REQUIRE), since a smoke run never reaches the copy target."""
    defaults = {
        "OFFICIAL_MIN_PROBE": min_probe,
        "OFFICIAL_TRIES": "2",
        "OFFICIAL_REQUIRE": "",
        "QUICK_EVAL_SECONDS": "0",
    }
    env = script_env(**(defaults | env_vars))
    return subprocess.run(
        ["bash", str(SCRIPT), str(out), *runs], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_an_official_run_under_the_floor_is_tried_again_with_the_next_seed_then_the_script_stops(tmp_path):
    done = run_script(tmp_path, "1.1", "reading:2", OFFICIAL_AT_ONCE="1")  # no run reaches exact match 1.1
    assert done.returncode == 2, done.stderr[-2000:]
    assert "missed its copy phase change or ended under probe 1.1 in 2 tries" in done.stderr
    logs = sorted(p.name for p in tmp_path.glob("train_*_log.txt"))
    assert logs == ["train_official_try1_log.txt", "train_official_try2_log.txt"]  # the chain did not start
    assert "seed 1235" in (tmp_path / "train_official_try2_log.txt").read_text().splitlines()[0]
    assert "left on its deadline" in (tmp_path / "train_official_try1_log.txt").read_text()
    assert not (tmp_path / "model").exists()


def test_a_try_that_leaves_the_copy_stage_below_target_stops_there_and_the_next_seed_trains(tmp_path):
    # 10 planned steps: the copy stage's deadline (0.3 of the plan) is met at the probe of step 4
    done = run_script(tmp_path, "0", "reading:2", OFFICIAL_REQUIRE="copy", OFFICIAL_STEPS="10")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "missed its copy phase change or ended under probe 0 in 2 tries" in done.stderr
    for try_log in ("train_official_try1_log.txt", "train_official_try2_log.txt"):
        text = (tmp_path / try_log).read_text()
        assert "saved step 4 (stage 0)" in text and "stopped: --require copy" in text
    assert not (tmp_path / "train_run1_log.txt").exists()


def test_an_official_run_that_fails_stops_the_script_without_another_try(tmp_path):
    done = run_script(tmp_path, "0", "reading:2", OFFICIAL_AT_ONCE="1", TRAIN_FLAGS="--smoke --shape no-such-shape")
    assert done.returncode == 1 and "the official run failed (exit 2" in done.stderr
    assert f"its log: {tmp_path}/train_official_try1_log.txt" in done.stderr
    assert "try 1 of 2" in (tmp_path / "train_official_try1_log.txt").read_text()
    assert not (tmp_path / "train_official_try2_log.txt").exists()
    assert not (tmp_path / "train_official_log.txt").exists() and not (tmp_path / "train_run1_log.txt").exists()


def test_an_official_run_over_the_floor_goes_on_to_the_chain(tmp_path):
    done = run_script(tmp_path, "0", "reading:2", CHAIN_FLAGS="--max-steps 1")  # the chain's runs only
    assert done.returncode == 0, done.stderr[-2000:]
    assert "try 1 of 2, seed 1234" in (tmp_path / "train_official_log.txt").read_text()
    # both tries trained at once, each to its end (no stage required); the first over the floor is the official run
    assert [p.name for p in tmp_path.glob("train_official_try*")] == ["train_official_try2_log.txt"]
    assert not list(tmp_path.glob("ckpt*"))
    assert (tmp_path / "train_run1_log.txt").is_file() and (tmp_path / "model" / "config.json").is_file()
    assert "saved step 2 " in (tmp_path / "train_official_log.txt").read_text()
    assert "saved step 1 " in (tmp_path / "train_run1_log.txt").read_text()


def test_the_first_try_of_a_round_to_leave_its_round_stage_trains_on_in_place_and_the_others_stop(tmp_path):
    # 10 planned steps: each try leaves its copy stage (on its deadline: not required here) at step 4's probe
    done = run_script(
        tmp_path, "0", "reading:2", OFFICIAL_STEPS="10", OFFICIAL_ROUND_STAGE="copy", CHAIN_FLAGS="--max-steps 1"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tries 1-2 of 2 at once (seeds 1234-1235), the first to leave its copy stage going on alone" in done.stdout
    assert "try 1 compiled alone and logged its first steps; the round's others start" in done.stdout
    ahead = re.search(r"try (\d) left its copy stage at step 4 and trains on", done.stdout)
    assert ahead, done.stdout[-2000:]
    official = (tmp_path / "train_official_log.txt").read_text()
    assert f"try {ahead[1]} of 2" in official.splitlines()[0]
    # one process from step 0 to the plan's end: no stop, no resume
    assert "saved step 10 (stage" in official and "exported" in official and "stopped" not in official
    assert official.count("model smoke") == 1
    other = 3 - int(ahead[1])
    assert f"seed {1233 + other}" in (tmp_path / f"train_official_try{other}_log.txt").read_text()  # its log kept
    assert not list(tmp_path.glob("ckpt*")) and not list(tmp_path.glob("left*"))
    assert (tmp_path / "model" / "config.json").is_file()
    # the chain's process started with the script, compiled its steps, and ran once the official run was exported
    assert done.stdout.splitlines()[0] == (
        "official run: the chain's process starts compiling while the official run's tries train"
    )
    chain_out = (tmp_path / "chain_stdout.txt").read_text()
    assert "chain: warmed up the steps on 12 batches" in chain_out  # 3 stages of reading x 2 layouts x 2
    assert f"run 1: mix reading, 2 steps, from {tmp_path}/official" in chain_out
    assert not (tmp_path / "chain_start").exists()


def test_the_chains_process_compiles_across_the_rounds_and_stops_when_no_try_is_kept(tmp_path):
    done = run_script(
        tmp_path, "1.1", "reading:2", OFFICIAL_STEPS="10", OFFICIAL_ROUND_STAGE="copy", OFFICIAL_AT_ONCE="1"
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout.count("tries 2-2 of 2 at once") == 1  # a second round, the chain's process still up
    assert done.stdout.count("the chain's process starts compiling") == 1
    assert done.stdout.count("the chain's process is stopped before its first run") == 1
    assert not list(tmp_path.glob("train_run*")) and not (tmp_path / "model").exists()


def test_a_chain_that_fails_while_the_official_run_trains_stops_the_script_there(tmp_path):
    # the chain's flags are refused before its warm-up; the official run would train 400 steps
    done = run_script(tmp_path, "0", "reading:2", OFFICIAL_STEPS="400", CHAIN_FLAGS="--no-such-flag")
    assert done.returncode == 1
    assert f"the chain failed (exit 2; its output: {tmp_path}/chain_stdout.txt)" in done.stderr
    assert "--no-such-flag" in (tmp_path / "chain_stdout.txt").read_text()
    for try_log in tmp_path.glob("train_official_try*_log.txt"):
        assert "saved step 400 " not in try_log.read_text()  # stopped before its end
    assert not (tmp_path / "model").exists()


def test_a_chain_that_fails_stops_the_script_naming_its_output(tmp_path):
    missing = tmp_path / "no-such-model"
    done = run_script(tmp_path, "0", "reading:2", FROM=str(missing))  # no official run: the chain starts at once
    assert done.returncode == 1
    assert f"the chain failed (exit 1; its output: {tmp_path}/chain_stdout.txt)" in done.stderr
    assert f"--init-from {missing}: cannot load a checkpoint" in (tmp_path / "chain_stdout.txt").read_text()
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("at_once", ["0", "four"])
def test_a_round_size_that_is_not_a_positive_count_is_refused_before_any_training(tmp_path, at_once):
    done = run_script(tmp_path, "0", "reading:2", OFFICIAL_AT_ONCE=at_once)
    assert done.returncode == 1 and f"OFFICIAL_AT_ONCE={at_once}: the tries a round trains at once" in done.stderr
    assert not list(tmp_path.glob("train_*_log.txt"))


def test_official_seeds_trains_one_run_per_seed_at_once_and_reports_each(tmp_path):
    env = script_env(WORKERS="0")
    script = ROOT / "benchmarks" / "official_seeds.sh"
    done = subprocess.run(
        ["bash", str(script), str(tmp_path), "7", "8"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reports = done.stdout.splitlines()
    assert [r.split(":")[0] for r in reports] == ["train_official_seed7_log.txt", "train_official_seed8_log.txt"]
    assert all("to tasks at step 2 (deadline" in r for r in reports)
    assert (tmp_path / "ckpt7" / "state.json").is_file() and (tmp_path / "ckpt8" / "state.json").is_file()


def default_train_flags() -> list[str]:
    """benchmarks/train_defaults.sh's DEFAULT_TRAIN_FLAGS, as bash reads them (through the loop bench's reader)."""
    from benchmark_scripts import load_benchmark

    return load_benchmark("bench_training_loop").default_train_flags()


def test_the_scripts_default_train_flags_are_flags_train_py_takes(monkeypatch):
    """The flags the training scripts run with when TRAIN_FLAGS is unset (benchmarks/train_defaults.sh) parse as
    train.py's, so a typo there fails here and not on a GPU after a machine start (parsed as on a GPU: train.py
    refuses FlexAttention where there is none)."""
    import torch

    from pdllm.training.train import parse_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = parse_args(["--out", "unused", *default_train_flags()])
    assert (args.attention, args.compile) == ("flex", "stack+losses")
    assert args.flex_options.mask_block == 64 and args.flex_options.kernel["bwd_BLOCK_M1"] == 16


def test_a_run_with_the_default_flags_records_them_in_state_json(monkeypatch, tmp_path):
    """state.json records a run's parsed flags: --flex-options (a FlexTuning once parsed) goes in as the JSON that
    gives it, so the save at every --save-every step does not fail on the GPU, and reads back as the same tuning."""
    import json

    import torch

    from pdllm.training.flex import flex_tuning
    from pdllm.training.optim import make_optimizer
    from pdllm.training.state import save_state
    from pdllm.training.train import build_model, parse_args, run_meta

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = parse_args(["--out", str(tmp_path / "run"), "--shape", "smoke", *default_train_flags()])
    model = build_model("smoke", torch.device("cpu"))
    save_state(tmp_path / "run", model, make_optimizer(model, 1e-3), run_meta(0, args, [], 0.0, 0))
    recorded = json.loads((tmp_path / "run" / "state.json").read_text())["args"]
    assert flex_tuning(recorded["flex_options"]) == args.flex_options
    assert recorded["out"] == str(tmp_path / "run")
