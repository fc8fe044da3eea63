"""LongBench (English) from a local directory of its JSONL files: prompts, generation and the official scores.

`{data_dir}/{task}.jsonl` holds one record per line with LongBench's fields (`input`, `context`, `answers`,
`length`, `all_classes`, `dataset`, `_id`). Each task's prompt template (LongBench's dataset2prompt) is split at
its {context} slot: the text before it is the instruction (kept whole, never chunked), the text after it the
question span; generation length is the task's dataset2maxlen. A task's score is 100 x the mean over records of
the best metric value against any reference, with LongBench's first-line rule for trec/triviaqa/samsum.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pdllm.errors import InvalidRequest
from pdllm.evaluation import longbench_metrics as m

QA_INSTRUCTION = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
)
NARRATIVE = (
    "Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation."
)
QASPER = (
    "Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question "
    'cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no '
    'question, answer "yes", "no", or "unanswerable". Do not provide any explanation.'
)


@dataclass(frozen=True)
class LongBenchTask:
    template: str  # LongBench's prompt with {context} and (mostly) {input}
    max_gen: int  # tokens generated
    metric: Callable[..., float]
    first_line: bool = False  # few-shot tasks: only the prediction's first line is scored


TASKS: dict[str, LongBenchTask] = {
    "narrativeqa": LongBenchTask(
        "You are given a story, which can be either a novel or a movie script, and a question. "
        + NARRATIVE
        + "\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a "
        "single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        128,
        m.qa_f1_score,
    ),  # fmt: skip
    "qasper": LongBenchTask(
        "You are given a scientific article and a question. "
        + QASPER
        + "\n\nArticle: {context}\n\n "
        + QASPER.replace("Answer the question as", "Answer the question based on the above article as")
        + "\n\nQuestion: {input}\n\nAnswer:",
        128,
        m.qa_f1_score,
    ),  # fmt: skip
    "multifieldqa_en": LongBenchTask(
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64,
        m.qa_f1_score,
    ),  # fmt: skip
    **{
        name: LongBenchTask(
            QA_INSTRUCTION
            + "\n\nThe following are given passages.\n{context}\n\n"
            + QA_INSTRUCTION
            + "\n\nQuestion: {input}\nAnswer:",
            32,
            m.qa_f1_score,
        )  # fmt: skip
        for name in ("hotpotqa", "2wikimqa", "musique")
    },
    "gov_report": LongBenchTask(
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512,
        m.rouge_score,
    ),  # fmt: skip
    "qmsum": LongBenchTask(
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
        512,
        m.rouge_score,
    ),  # fmt: skip
    "multi_news": LongBenchTask(
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, "
        "write a one-page summary of all the news.\n\nSummary:",
        512,
        m.rouge_score,
    ),  # fmt: skip
    "trec": LongBenchTask(
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
        64,
        m.classification_score,
        first_line=True,
    ),  # fmt: skip
    "triviaqa": LongBenchTask(
        "Answer the question based on the given passage. Only give me the answer and do not output any other "
        "words. The following are some examples.\n\n{context}\n\n{input}",
        32,
        m.qa_f1_score,
        first_line=True,
    ),  # fmt: skip
    "samsum": LongBenchTask(
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
        128,
        m.rouge_score,
        first_line=True,
    ),  # fmt: skip
    "passage_count": LongBenchTask(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: ",
        32,
        m.count_score,
    ),  # fmt: skip
    "passage_retrieval_en": LongBenchTask(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        'the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", '
        "etc.\n\nThe answer is: ",
        32,
        m.retrieval_score,
    ),  # fmt: skip
    "lcc": LongBenchTask("Please complete the code given below. \n{context}Next line of code:\n", 64, m.code_sim_score),
    "repobench-p": LongBenchTask(
        "Please complete the code given below. \n{context}{input}Next line of code:\n", 64, m.code_sim_score
    ),  # fmt: skip
}
REQUIRED_FIELDS = ("input", "context", "answers")


@dataclass(frozen=True)
class LongBenchPrompt:
    instruction: str  # before the context
    context: str
    question: str  # the query text after the context, surrounding whitespace moved into the template
    question_template: str  # "{question}" with that whitespace around it


def task(name: str) -> LongBenchTask:
    if name not in TASKS:
        raise InvalidRequest(f"unknown LongBench task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def load_records(data_dir: str | Path, name: str, limit: int | None = None) -> list[dict]:
    """The first `limit` records of `{data_dir}/{name}.jsonl`; InvalidRequest names the file and line of a bad one."""
    task(name)
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise InvalidRequest(f"LongBench file {path} does not exist")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidRequest(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            missing = [k for k in REQUIRED_FIELDS if k not in rec]
            if missing or not isinstance(rec.get("answers"), list) or not rec["answers"]:
                raise InvalidRequest(f"{path}:{lineno}: needs fields {', '.join(REQUIRED_FIELDS)} (answers a list)")
            out.append(rec)
            if limit is not None and len(out) >= limit:
                break
    return out


def build_prompt(name: str, record: dict) -> LongBenchPrompt:
    before, after = task(name).template.split("{context}")
    query = after.replace("{input}", str(record.get("input") or ""))
    stripped = query.strip()
    lead = query[: len(query) - len(query.lstrip())]
    trail = query[len(query.rstrip()) :]
    return LongBenchPrompt(before, str(record["context"]), stripped, lead + "{question}" + trail)


def score_prediction(name: str, prediction: str, answers: list[str], all_classes: list[str] | None = None) -> float:
    t = task(name)
    if t.first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max(t.metric(prediction, str(a), all_classes=all_classes) for a in answers)


def run_longbench(
    lm, data_dir: str | Path, tasks: list[str], mode: str, method, limit: int | None = None, threshold=None
) -> tuple[list[dict], dict[str, float]]:
    """Generate every record of `tasks` (one block of the task's max_gen tokens) and score it; returns the
    records and each task's score (0..100)."""
    from pdllm.engine import generate
    from pdllm.sampler import SamplerConfig

    records, scores = [], {}
    for name in tasks:
        gen = task(name).max_gen
        sampler = SamplerConfig(gen_length=gen, block_length=min(gen, 32), steps=gen, threshold=threshold)
        values = []
        for rec in load_records(data_dir, name, limit):
            prompt = build_prompt(name, rec)
            out = generate(lm, prompt.context, prompt.question, sampler, mode, max_context_tokens=1 << 22,
                           method=method, instruction=prompt.instruction,
                           question_template=prompt.question_template)  # fmt: skip
            value = score_prediction(name, out.answer, rec["answers"], rec.get("all_classes"))
            values.append(value)
            records.append({"task": name, "id": rec.get("_id", ""), "answer": out.answer, "score": value,
                            "answers": rec["answers"], "context_tokens": out.stats["context_tokens"]})  # fmt: skip
        scores[name] = 100 * sum(values) / len(values) if values else 0.0
    return records, scores
