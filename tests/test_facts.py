"""Facts in free wording: value kinds, distractors, and the held-out paraphrase families kept out of training."""

from __future__ import annotations

import random
import re

import pytest

from pdllm.tasks import TASKS, make_sample, score
from pdllm.tasks.facts import (
    BROAD_AGENTS,
    BROAD_ASIDES,
    BROAD_LINKS,
    BROAD_REQUEST_ENDS,
    BROAD_REQUESTS,
    BROAD_VERBS,
    HELDOUT_CORES,
    HELDOUT_QUESTIONS,
    OPEN_AGENTS,
    OPEN_LINKS,
    OPEN_STATES,
    OPEN_VERBS,
    TRAIN_COLON,
    TRAIN_CORES,
    TRAIN_QUESTIONS,
    VALUE_KINDS,
    VARIED_CLOSERS,
    VARIED_LEADS,
    VARIED_MODIFIERS,
    VARIED_QUESTIONS,
    VARIED_RELATIONS,
    VARIED_SOURCES,
    VARIED_VALUE_FIRST,
    facts_key_spans,
    make_value,
    template_pattern,
)
from pdllm.training.data import MIXES, build_example, curriculum, make_batch

HELDOUT = [template_pattern(t) for t in HELDOUT_CORES + HELDOUT_QUESTIONS]
TRAINED = [template_pattern(t) for t in TRAIN_CORES + TRAIN_COLON]


def literal_fragments(template: str) -> list[str]:
    return [f.strip(" .,?:") for f in re.split(r"\{[sSv]\}", template) if len(f.strip(" .,?:")) >= 8]


VARIED_PARTS = (
    VARIED_RELATIONS + VARIED_MODIFIERS + VARIED_SOURCES + VARIED_VALUE_FIRST + VARIED_CLOSERS + VARIED_QUESTIONS
) + VARIED_LEADS
BROAD_PARTS = BROAD_AGENTS + BROAD_VERBS + BROAD_LINKS + BROAD_ASIDES + BROAD_REQUESTS + BROAD_REQUEST_ENDS
OPEN_PARTS = OPEN_AGENTS + OPEN_VERBS + OPEN_STATES + OPEN_LINKS


def words(texts) -> set[str]:
    return {w for t in texts for w in re.findall(r"[a-z]+", t.lower().replace("{s}", " ").replace("{v}", " "))}


def test_heldout_families_share_no_phrase_with_the_trained_templates():
    trained = " | ".join(TRAIN_CORES + TRAIN_COLON + TRAIN_QUESTIONS + VARIED_PARTS + BROAD_PARTS).lower()
    fragments = [f for t in HELDOUT_CORES + HELDOUT_QUESTIONS for f in literal_fragments(t)]
    assert len(fragments) >= len(HELDOUT_CORES)  # every held-out family has a distinctive phrase
    assert not [f for f in fragments if f.lower() in trained]


def test_training_data_never_contains_a_heldout_wording():
    rng = random.Random(0)
    texts, fact_rows = [], 0
    mixes = ("varied", "recall_wordings", "recall_broad", "recall_open", "recall_notes")
    stages = [s for mix in mixes for s in curriculum(mix)]
    for stage in stages:  # every stage, dense and chunked layouts, as the training stream builds them
        for _ in range(6):
            batch = make_batch(rng, stage, 1024, 8192, (0.5, 0.0))
            for row in batch.ids.tolist():
                texts.append(bytes(t for t in row if t < 256).decode("utf-8", "replace"))
    for i in range(320):
        wording = ("train", "varied", "broad", "open")[i % 4]
        e = build_example(random.Random(i), 900, i % 4 >= 2, {"facts": 1.0}, wording=wording, queries=3)
        texts.append(bytes(t for t in e.ids if t < 256).decode())
        fact_rows += 1
    assert fact_rows and any(p.search(t) for t in texts for p in TRAINED)  # the check sees the needles it should
    leaks = [(p.pattern[:40], t[:80]) for t in texts for p in HELDOUT if p.search(t)]
    assert not leaks


def test_the_training_mix_cannot_draw_the_heldout_task():
    stages = [s for mix in MIXES for s in curriculum(mix)]
    assert stages and all("heldout_wording" not in s.tasks for s in stages)
    with pytest.raises(ValueError, match="held out"):
        build_example(random.Random(0), 900, False, {"heldout_wording": 1.0})


def test_the_varied_wording_is_a_grammar_whose_needles_still_name_subject_and_value():
    needles, questions, untemplated = set(), set(), 0
    for seed in range(300):
        s = make_sample("facts", 1200, seed, wording="varied")
        needles.update(s.meta["needles"])
        questions.add(s.question)
        untemplated += not any(p.search(n) for n in s.meta["needles"][:1] for p in TRAINED)
        assert s.meta["subject"] in s.question.lower()
        assert len(facts_key_spans(s)) == len(s.meta["facts"])  # every needle's subject and value are found
    assert len(needles) > 1000 and len(questions) > 150  # hundreds of wordings, not a dozen
    assert 150 < untemplated < 250  # two thirds of needles from the grammar, a third from the train templates


def test_the_broad_wording_adds_value_inside_and_aside_orders_and_requests():
    needles, questions, orders = set(), set(), {"inside": 0, "aside": 0}
    for seed in range(300):
        s = make_sample("facts", 1200, seed, wording="broad")
        needles.update(s.meta["needles"])
        questions.add(s.question)
        assert s.meta["subject"] in s.question.lower()
        assert len(facts_key_spans(s)) == len(s.meta["facts"])  # every needle's subject and value are found
        for needle, (subject, value) in zip(s.meta["needles"], s.meta["facts"], strict=True):
            at_value, at_subject = needle.find(value), needle.lower().find(subject)
            orders["inside"] += 0 < at_value < at_subject and any(f" {v} " in needle for v in BROAD_VERBS)
            orders["aside"] += any(f"{subject}, {a}, " in needle.lower() for a in BROAD_ASIDES)
    assert len(needles) > 1000 and len(questions) > 200
    assert orders["inside"] > 100 and orders["aside"] > 40  # of ~1000 needles: 28% inside, 12% aside
    assert sum(any(q.startswith(r.split(" {s}")[0]) for r in BROAD_REQUESTS) for q in questions) > 40


def test_the_open_wording_joins_a_value_before_its_subject_by_many_links_and_no_heldout_word():
    heldout_only = words(HELDOUT_CORES + HELDOUT_QUESTIONS) - words(
        TRAIN_CORES + TRAIN_COLON + TRAIN_QUESTIONS + VARIED_PARTS + BROAD_PARTS
    )
    assert {"notebook", "lists", "under", "settled", "whoever"} <= heldout_only  # the check sees the families' words
    assert not words(OPEN_PARTS) & (heldout_only | {"below", "beneath", "underneath"})
    links, value_first = set(), 0
    for seed in range(300):
        s = make_sample("facts", 1200, seed, wording="open")
        assert s.meta["subject"] in s.question.lower()
        assert len(facts_key_spans(s)) == len(s.meta["facts"])  # every needle's subject and value are found
        for needle, (subject, value) in zip(s.meta["needles"], s.meta["facts"], strict=True):
            at_value, at_subject = needle.find(value), needle.lower().find(subject)
            between = needle[at_value + len(value) : at_subject].strip().lower()
            if 0 <= at_value < at_subject and between.endswith(" the") or between == "the":
                value_first += 1
                links.update(link for link in OPEN_LINKS if between.endswith(f"{link} the"))
    assert value_first > 200  # of ~1000 needles: ~30% value first by an open part, ~8% by broad, ~4% by varied
    assert len(links) > 30


def test_a_note_is_the_facts_alone_with_little_prose_and_the_recall_notes_mix_draws_them():
    from pdllm.tasks.facts import FACT_PREFIX, facts

    sizes = []
    for seed in range(60):
        s = facts(2000, seed, len, split="train", wording="open", task="facts", note=True)
        assert FACT_PREFIX not in s.context and s.meta["needles"][0] in s.context
        assert all(n in s.context for n in s.meta["needles"]) and 1 <= len(s.meta["facts"]) <= 5
        assert len(facts_key_spans(s)) == len(s.meta["facts"])
        sizes.append(len(s.context.encode()))
    assert max(sizes) < 900 and min(sizes) < 100  # a sentence or a few, never the 2000 asked for
    (stage,) = [s for s in curriculum("recall_notes") if s.name == "recall"]
    rows = [build_example(random.Random(i), 1200, False, {"facts": 1.0}, notes=stage.notes) for i in range(200)]
    short = sum(len(e.ids) < 600 for e in rows)
    assert stage.notes == 0.2 and 20 < short < 70  # a fifth of facts rows


def test_heldout_samples_use_only_heldout_wordings_with_distractors():
    for seed in range(12):
        s = make_sample("heldout_wording", 3000, seed)
        needles = s.meta["needles"]
        assert 2 <= len(needles) <= 5 and all(n in s.context for n in needles)
        assert all(any(p.search(n) for p in HELDOUT) for n in needles)
        assert not any(p.search(n) for n in needles for p in TRAINED)
        assert any(p.fullmatch(s.question) for p in HELDOUT)
        assert s.meta["subject"] in s.question and s.answers[0] in needles[0]


@pytest.mark.parametrize(
    "kind,pattern",
    [
        ("digits", r"\d{4,10}"),
        ("word", r"[a-z]+"),
        ("code", r"(\d{4}-[A-Z]+|[A-Z]{2}-\d{4}-[A-Z]|[A-Z0-9]{4}-[A-Z0-9]{4}|[a-z]+-\d{2})"),
        ("uuid", r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"),
    ],
)
def test_value_kinds(kind, pattern):
    rng = random.Random(kind)
    assert all(re.fullmatch(pattern, make_value(rng, kind)) for _ in range(50))


def test_kinds_cycle_with_the_seed_and_partial_answers_score_zero():
    assert [make_sample("heldout_wording", 2000, i).meta["kind"] for i in range(4)] == list(VALUE_KINDS)
    assert {make_sample("value_kinds", 2000, i).meta["kind"] for i in range(3)} == {"word", "code", "uuid"}
    answers = ("4471-KESTREL",)
    assert score("heldout_wording", " 4471-KESTREL.", answers) == 1.0
    assert score("heldout_wording", " 4471", answers) == 0.0  # the old model's answer to a user's own notes
    assert TASKS["value_kinds"].gen_length > 37  # a UUID and its end token fit the answer span


def test_the_ranking_target_is_the_needles_chunk_even_when_the_value_also_occurs_in_prose():
    from pdllm.tasks import Sample
    from pdllm.training.data import answer_offset

    needle = "Note: the vault code is amber."
    context = "The amber light was on. " * 20 + needle + " More prose follows."
    s = Sample("facts", context, "What is the vault code?", ("amber",), " amber", 0.5, 900, {"needles": [needle]})
    assert answer_offset(s) == context.index(needle) + needle.index("amber") > context.index("amber")
    plain = Sample("passkey", context, "q", ("amber",), " amber", 0.5, 900)
    assert answer_offset(plain) == context.index("amber")
