"""benchmarks/eval_selection.py: the needle span it counts hits against is the queried needle, for every task."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark

from pdllm.assets import default_model_dir
from pdllm.errors import CheckpointError
from pdllm.models.loader import load_model
from pdllm.prompt import encode_request
from pdllm.tasks import score


@pytest.fixture(scope="module")
def selection():
    return load_benchmark("eval_selection")


@pytest.fixture(scope="module")
def bundled():
    return load_model(default_model_dir(), device="cpu")


@pytest.mark.parametrize("wording", ["trained", "other", "kv_retrieval", "heldout_wording", "niah_multikey", "facts"])
def test_the_needle_span_holds_the_queried_value_in_the_tokens_that_are_chunked(selection, bundled, wording):
    instruction, context, question, value, (lo, hi) = selection.sample_in(bundled, 3000, 11, wording)
    ids = encode_request(bundled.tokenizer, context, question, 1 << 20, instruction).context_ids
    needle = bundled.tokenizer.decode(ids[lo:hi])
    assert value in needle and value not in bundled.tokenizer.decode(ids[:lo])
    if wording in ("heldout_wording", "facts"):  # the whole queried sentence, not a distractor naming the value
        assert needle.endswith(".") and len(needle) > len(value) + 10


def test_a_task_row_is_scored_by_its_own_metric_and_counts_a_hit_only_on_the_needle_chunk(selection, bundled):
    rows = selection.run(bundled, [(1200, 1)], ["kv_retrieval"], chunk=256, top_k=2, seed=0)
    assert len(rows) == 4  # summary / draft scoring x reuse / joint KV
    assert len(selection.run(bundled, [(1200, 1)], ["facts"], 256, 2, 0, scorings=("summary",))) == 2
    for r in rows:
        assert r["hit"] == bool(set(r["picked"]) & set(r["needle_chunks"]))
        assert r["whole_hit"] == set(r["needle_chunks"]).issubset(r["picked"]) and r["hit"] >= r["whole_hit"]
        assert r["score"] == score("kv_retrieval", r["answer"], (r["gold"],))
    assert "kv_retrieval" in selection.table(rows)


def test_main_reads_the_model_it_is_given_and_names_it_in_its_table(selection, tmp_path, monkeypatch, capsys):
    model = str(default_model_dir())
    argv = ["eval_selection.py", "--model", model, "--cells", "1200:1", "--wordings", "kv_retrieval"]
    argv += "--scorings summary --chunk-size 256 --top-k 2 --device cpu".split() + ["--out", str(tmp_path / "s")]
    monkeypatch.setattr("sys.argv", argv)
    selection.main()
    header = (tmp_path / "s.txt").read_text().splitlines()[0]
    assert f"--model {model} " in header and "kv_retrieval" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", argv[:1] + ["--model", str(tmp_path / "none")] + argv[3:])
    with pytest.raises(CheckpointError, match="none does not exist"):  # named, not the bundle used instead
        selection.main()
