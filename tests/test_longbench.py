"""The LongBench harness on small files in LongBench's JSONL format written here: prompts split at the context
slot (instruction kept apart), official metric values, per-task scores, and the `pdllm longbench` command."""

from __future__ import annotations

import json

import pytest

from pdllm.cli import main
from pdllm.errors import InvalidRequest
from pdllm.evaluation import longbench_metrics as m
from pdllm.evaluation.longbench import TASKS, build_prompt, load_records, run_longbench, score_prediction
from pdllm.method import MethodConfig
from pdllm.prompt import encode_request

ENGLISH = {
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
    "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
}  # fmt: skip


def write_task(tmp_path, name: str, records: list[dict]) -> None:
    with open(tmp_path / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def record(i: int, context: str = "Paragraph 1: the sky is blue. " * 8, answers=("blue",), **kw) -> dict:
    return {"input": "What colour is the sky?", "context": context, "answers": list(answers), "length": 60,
            "dataset": "x", "language": "en", "all_classes": None, "_id": f"id{i}", **kw}  # fmt: skip


def test_the_sixteen_english_tasks_and_their_prompts():
    assert set(TASKS) == ENGLISH
    for name, t in TASKS.items():
        assert t.template.count("{context}") == 1, name
        p = build_prompt(name, record(0))
        full = t.template.replace("{context}", p.context).replace("{input}", "What colour is the sky?")
        query = p.question_template.replace("{question}", p.question)
        assert p.instruction + p.context + query == full  # the split loses nothing
        assert "{context}" not in p.instruction and p.question == p.question.strip() and p.question


def test_official_metric_values():
    assert m.qa_f1_score("The Cat sat.", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    assert m.qa_f1_score("nothing", "blue") == 0.0
    assert m.rouge_score("the cat sat on the mat", "the cat on the mat") == pytest.approx(2 * (5 / 6) * 1 / (5 / 6 + 1))
    classes = ["Description", "Entity", "Human being", "Human"]
    assert m.classification_score("Human being", "Human being", all_classes=classes) == 1.0  # "Human" is part of it
    assert m.classification_score("Entity or Description", "Entity", all_classes=classes) == 0.5
    assert m.count_score("There are 7 unique, not 8", "7") == 0.5
    assert m.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0 and m.retrieval_score("3", "Paragraph 12") == 0
    assert m.code_sim_score("```\n# comment\nreturn x + 1", "return x + 1") == 1.0
    assert 0 < m.code_sim_score("return y", "return x + 1") < 1
    assert score_prediction("trec", "Entity\nDescription", ["Entity"], classes) == 1.0  # first line only
    assert score_prediction("hotpotqa", "blue", ["red", "Blue"]) == 1.0  # best reference


def test_bad_files_are_named(tmp_path):
    with pytest.raises(InvalidRequest, match="does not exist"):
        load_records(tmp_path, "hotpotqa")
    (tmp_path / "hotpotqa.jsonl").write_text('{"input": "q"}\n')
    with pytest.raises(InvalidRequest, match=r"hotpotqa.jsonl:1: needs fields"):
        load_records(tmp_path, "hotpotqa")
    with pytest.raises(InvalidRequest, match="unknown LongBench task"):
        load_records(tmp_path, "nosuchtask")


def test_run_scores_every_record_with_its_task_metric(tmp_path, lm):
    write_task(tmp_path, "hotpotqa", [record(0), record(1, answers=("blue", "azure"))])
    write_task(tmp_path, "lcc", [record(2, context="def f(x):\n    y = x\n", answers=("    return y",))])
    write_task(tmp_path, "trec", [record(3, answers=("Entity",), all_classes=["Entity", "Description"])])
    method = MethodConfig(chunk_size=32, top_k=2, scoring="draft", selected_kv="joint")
    records, scores = run_longbench(lm, tmp_path, ["hotpotqa", "lcc", "trec"], "sparse", method, threshold=0.9)
    assert [r["id"] for r in records] == ["id0", "id1", "id2", "id3"]
    for r in records:
        rec = next(x for x in load_records(tmp_path, r["task"]) if x["_id"] == r["id"])
        assert r["score"] == score_prediction(r["task"], r["answer"], rec["answers"], rec.get("all_classes"))
        prompt = build_prompt(r["task"], rec)
        assert r["context_tokens"] == len(encode_request(lm.tokenizer, prompt.context, "q").context_ids)
    assert scores["hotpotqa"] == pytest.approx(50 * sum(r["score"] for r in records[:2]))


def test_command_runs_a_preset_and_writes_scores(tmp_path, tiny_llada, capsys):
    write_task(tmp_path, "multifieldqa_en", [record(0), record(1)])
    out = tmp_path / "scores.json"
    flags = ["--preset", "paper", "--chunk-size", "32", "--limit", "1", "--device", "cpu", "--out", str(out)]
    rc = main(
        ["longbench", "--data-dir", str(tmp_path), "--tasks", "multifieldqa_en", "--model", str(tiny_llada)] + flags
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert list(doc["scores"]) == ["multifieldqa_en"] and len(doc["records"]) == 1
    assert doc["method"]["scoring"] == "draft" and doc["method"]["selected_kv"] == "joint"
    assert doc["method"]["chunk_size"] == 32 and doc["method"]["top_k"] == 4  # explicit flag over the preset
    assert "multifieldqa_en" in capsys.readouterr().out
    assert main(["longbench", "--data-dir", str(tmp_path), "--tasks", "bogus"]) == 2
