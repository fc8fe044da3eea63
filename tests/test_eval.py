"""`pdllm eval`: records and summary come from real generations scored by the official metrics."""

from __future__ import annotations

import json

import pytest

from pdllm.assets import default_model_dir
from pdllm.cli import main
from pdllm.tasks import score


def run_eval_cli(tmp_path, model, *extra):
    out = tmp_path / "ev.json"
    rc = main(["eval", "--model", str(model), "--lengths", "700", "--samples", "2", "--device", "cpu",
               "--json", str(out), *extra])  # fmt: skip
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def test_eval_runs_and_saves_json(tmp_path, tiny_llada, capsys):
    rc, doc = run_eval_cli(tmp_path, tiny_llada, "--task", "passkey,kv_retrieval")
    assert rc == 0
    assert len(doc["records"]) == 2 * 2  # tasks x samples x lengths x modes
    row = doc["summary"][0]
    assert {"accuracy", "mean_step_ms", "kv_tokens_per_step"} <= set(row)
    assert all(r["kv_tokens_per_step"] >= r["prompt_tokens"] for r in doc["records"])
    assert "acc%" in capsys.readouterr().out


def test_the_bundled_model_retrieves_and_each_score_is_the_official_metric_of_its_answer(tmp_path):
    """Real generations of the bundled (trained) model in two modes, each scored by the task's metric."""
    rc, doc = run_eval_cli(tmp_path, default_model_dir(), "--task", "passkey", "--samples", "3",
                           "--modes", "vanilla,sparse", "--method", '{"chunk_size": 256, "top_k": 2}')  # fmt: skip
    assert rc == 0 and len(doc["records"]) == 3 * 2
    for r in doc["records"]:
        assert r["score"] == score("passkey", r["answer"], (r["gold"],))
    assert {row["mode"]: row["accuracy"] > 0 for row in doc["summary"]} == {"vanilla": True, "sparse": True}
    assert score("passkey", " 00000", (doc["records"][0]["gold"],)) == 0.0  # a wrong answer would score 0


def test_depth_sweep_plot(tmp_path, tiny_llada):
    png = tmp_path / "depth.png"
    rc, doc = run_eval_cli(tmp_path, tiny_llada, "--task", "niah_single", "--samples", "1", "--depths", "3",
                           "--depth-sweep", str(png))  # fmt: skip
    assert rc == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert sorted({r["depth"] for r in doc["records"]}) == [0.0, 0.5, 1.0]


@pytest.mark.parametrize(
    "args, message",
    [(["--modes", "bogus"], "unknown mode"), (["--lengths", "4k,x"], "--lengths"), (["--task", "nope"], "unknown task"),
     (["--lengths", "100"], "lengths must be"), (["--method", "[1]"], "JSON object"),
     (["--cell-seconds", "0"], "budget")],
)  # fmt: skip
def test_bad_flags_are_one_line_errors(tmp_path, tiny_llada, capsys, args, message):
    rc, _ = run_eval_cli(tmp_path, tiny_llada, *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("pdllm: error:") and message in err[-1]


def test_cell_budget_cuts_samples_equally_in_every_mode(tmp_path, tiny_llada):
    rc, doc = run_eval_cli(tmp_path, tiny_llada, "--task", "passkey", "--samples", "3", "--modes", "vanilla,sparse",
                           "--method", '{"chunk_size": 256, "top_k": 1}', "--cell-seconds", "1e-6")  # fmt: skip
    assert rc == 0
    assert [(r["mode"], r["gold"]) for r in doc["records"]] == [("vanilla", doc["records"][0]["gold"]),
                                                                 ("sparse", doc["records"][0]["gold"])]  # fmt: skip
    assert doc["records"][1]["kv_tokens_per_step"] < doc["records"][0]["kv_tokens_per_step"]  # 1 of 2 chunks read


def test_dense_baselines_past_the_models_length_are_reported_not_run(tmp_path, capsys):
    """The bundled model has 4096 positions: at 4500 tokens vanilla and prefix cannot place the question, sparse
    can (it sits after the longest chunk), and the eval goes on with the dense cells marked n/a."""
    out = tmp_path / "ev.json"
    rc = main(["eval", "--model", str(default_model_dir()), "--lengths", "4500", "--samples", "1", "--device", "cpu",
               "--task", "passkey", "--modes", "vanilla,prefix,sparse", "--json", str(out),
               "--method", '{"chunk_size": 256, "top_k": 2}'])  # fmt: skip
    doc = json.loads(out.read_text())
    assert rc == 0
    rows = {row["mode"]: row for row in doc["summary"]}
    assert rows["vanilla"]["accuracy"] is None and rows["prefix"]["accuracy"] is None
    assert "maximum length 4096" in rows["prefix"]["skipped"]
    assert rows["sparse"]["n"] == 1 and rows["sparse"]["accuracy"] is not None
    assert "n/a" in capsys.readouterr().out
    assert doc["method"]["chunk_size"] == 256 and doc["method"]["chunking"] == "text"  # what ran, defaults included
