"""A chain of training runs in one process (training.chain) equals the same runs as separate train.py processes
joined by exports, weight for weight, with or without compiling its steps first (--warm-up) and waiting for its
start (--await-start); smoke-shaped runs on the CPU."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from pdllm.training import chain, train
from pdllm.training.data import make_batch
from pdllm.training.objective import batch_layout
from pdllm.training.probe import probe_batches

# the flags reproduce_bundle.sh gives every run after the official one, on the smoke shape
FLAGS = ["--smoke", "--seed", "1234", "--stage", "1", "--lr", "1e-3"]
FLAGS += ["--pointer-weight", "0.5", "--key-weight", "0.5", "--match-weight", "0.5"]
# the last run with flags of its own: the served layout (the chain's runs before it train the joined one)
RUNS = [chain.Run("reading", 2), chain.Run("recall_notes", 2, ("--instruction-apart", "--text-chunks=0.8"))]


def weights(model_dir):
    out = {}
    for f in sorted(model_dir.glob("model*.safetensors")):
        out |= load_file(str(f))
    return out


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    d = tmp_path_factory.mktemp("official")
    assert train.main(["--smoke", "--out", str(d / "ckpt"), "--steps", "1"]) == 0
    assert train.main(["--export", str(d / "ckpt"), "--out", str(d / "model")]) == 0
    return d / "model"


def test_the_chain_in_one_process_equals_separate_runs_joined_by_exports(start, tmp_path, capsys):
    begin = start
    for i, (mix, steps, own) in enumerate(RUNS, 1):
        ckpt = tmp_path / "separate" / f"ckpt{i}"
        run = [*own, "--out", str(ckpt), "--init-from", str(begin), "--mix", mix, "--steps", str(steps)]
        assert train.main([*FLAGS, *run]) == 0
        begin = tmp_path / "separate" / f"run{i}"
        assert train.main(["--export", str(ckpt), "--out", str(begin)]) == 0
    out = tmp_path / "chain"
    out.mkdir()
    marker = tmp_path / "after_runs.txt"
    last = chain.run_chain(out, start, RUNS, FLAGS, after_run=f'echo "$RUN_DIR" >> {marker}; exit 3')
    assert last == out / "run2" and marker.read_text().split() == [str(out / "run1"), str(out / "run2")]
    separate, chained = weights(begin), weights(last)
    assert separate.keys() == chained.keys()
    assert all((separate[k] == chained[k]).all() for k in separate), "the chain's weights differ from separate runs"
    assert weights(out / "run1") != {} and not (out / "ckpt").exists()
    assert "--after-run exited 3 after run1; going on" in capsys.readouterr().err  # a failed pack stops no run
    log = (out / "train_run2_log.txt").read_text()
    assert log.startswith("run 2: mix recall_notes, 2 steps (--instruction-apart --text-chunks=0.8)")
    assert "exported step 2" in log
    # compiling first and waiting for the start changes nothing the runs compute
    warmed = tmp_path / "warmed"
    warmed.mkdir()
    asked = []
    last = chain.run_chain(warmed, start, RUNS, FLAGS, None, warm=True, await_start=lambda: not asked.append(1))
    assert asked == [1] and last == warmed / "run2"
    assert all((separate[k] == v).all() for k, v in weights(last).items()), "a warm-up changed the runs"
    assert "chain: warmed up the steps on 24 batches" in capsys.readouterr().out  # 2 mixes x 3 stages x 2 x 2


def test_bad_runs_and_flags_the_chain_sets_are_refused_by_name(start, tmp_path, capsys):
    assert chain.parse_run("recall_open:5500") == ("recall_open", 5500, ()) and chain.parse_run("7").mix == "reading"
    apart = chain.parse_run("recall_notes:1000:--instruction-apart,--text-chunks=0.8")
    assert apart == ("recall_notes", 1000, ("--instruction-apart", "--text-chunks=0.8"))
    for bad, why in [
        ("reading:x", "positive number"),
        ("recall_notes:10:instruction-apart", "each starting with --"),
        ("recall_notes:10:--steps=5", "--steps: the chain sets these"),
        ("recall_notes:10:--x:--y", "MIX:STEPS:FLAGS"),
    ]:
        with pytest.raises(ValueError, match=why):
            chain.parse_run(bad)
    with pytest.raises(SystemExit):
        chain.main(["--out", str(tmp_path), "--from", str(start), "reading:0"])
    assert "positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        chain.main(["--out", str(tmp_path), "--from", str(start), "reading:2", "--", "--smoke", "--mix", "lookup"])
    assert "--mix after --" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a later run's bad flag fails before the first run trains
        chain.main(["--out", str(tmp_path), "--from", str(start), "reading:2", "recall_notes:2:--no-such-flag", "--",
                    *FLAGS])  # fmt: skip
    assert "--no-such-flag" in capsys.readouterr().err and not list(tmp_path.glob("train_run*"))


def test_a_chain_told_no_start_stops_before_its_first_run(start, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # the script closed its end: its official run was not kept
    assert chain.main(["--out", str(tmp_path), "--from", str(tmp_path / "never"), "--await-start", "reading:2", "--",
                       *FLAGS]) == 0  # fmt: skip
    assert f"no start given for {tmp_path / 'never'}; stopping before the first run" in capsys.readouterr().out
    assert not list(tmp_path.glob("train_run*")) and not list(tmp_path.glob("run*"))


def test_the_warm_up_builds_the_graphs_the_runs_steps_take():
    """After the warm-up, steps and probes on new batches of every stage the runs train compile nothing more (the
    layer stack and the loss parts, dynamic shapes; aot_eager on the CPU: dynamo's graphs are the same as on a GPU)."""
    model = train.build_model("smoke", torch.device("cpu"))
    terms = train.compile_model(model, "stack+losses", backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    assert chain.warm_up(model, terms, RUNS, FLAGS) == 24
    warmed = counters["stats"]["unique_graphs"]
    assert warmed >= 6 and all(p.grad is None for p in model.parameters())
    rng = random.Random(7)
    for run in RUNS:  # each run's own flags: the last one's stages in the served layout
        args = chain.run_args(FLAGS, Path("unused"), run)
        for stage in train.run_stages(args)[1:]:
            for _ in range(3):
                batch = make_batch(rng, stage, args.max_len, args.tokens_per_batch, (0.5, 0.0))
                gen = torch.Generator().manual_seed(0)
                loss, _ = train.step_loss(model, batch, batch_layout(batch), args, gen, train.MaskedAttention, terms)
                loss.backward()
    assert counters["stats"]["unique_graphs"] == warmed, "a step after the warm-up compiled a new graph"
    for run in RUNS:  # the runs' probes, on other held-out draws (four batches of 16 rows, as a run probes)
        args = chain.run_args(FLAGS, Path("unused"), run)
        for stage in train.run_stages(args)[1:]:
            assert "em" in train.run_probe(model, probe_batches(stage, args.max_len, 64, seed=8), torch.device("cpu"))
    assert counters["stats"]["unique_graphs"] == warmed, "a probe after the warm-up compiled a new graph"


def test_nothing_a_run_makes_before_its_first_step_changes_the_graphs_guards_after_the_warm_up():
    """Dynamo guards FlexAttention's graphs on the count of pytree node types; the fused AdamW each run makes
    registers one (torch.distributed.tensor) on first use, so made after the warm-up it recompiled them all. Checked
    in a fresh process (this one has made optimizers already), the steps eager: the count is what matters."""
    code = f"""
import torch, torch.utils._pytree as pytree
from pdllm.training import chain, train
from pdllm.training.objective import LossTerms
from pdllm.training.optim import make_optimizer
model = train.build_model("smoke", torch.device("cpu"))
chain.warm_up(model, LossTerms(), [chain.Run(*run) for run in {[tuple(run) for run in RUNS]!r}], {FLAGS!r})
warmed = len(pytree.SUPPORTED_NODES)
make_optimizer(model, 1e-3)
print(warmed, len(pytree.SUPPORTED_NODES))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    warmed, after_optimizer = done.stdout.split()
    assert warmed == after_optimizer, "a run's optimizer registered a pytree node after the warm-up"
