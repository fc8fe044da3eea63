"""Synthetic tasks: official formats and metrics, determinism, token-length control, needle depth, held-out prose."""

from __future__ import annotations

import pytest

from pdllm.errors import InvalidRequest
from pdllm.prompt import QUESTION_TEMPLATE
from pdllm.tasks import TASKS, byte_counter, make_sample, metrics, score, tokenizer_counter
from pdllm.tasks.prose import load_sentences


def prompt_tokens(sample, count=byte_counter) -> int:
    return 1 + count(sample.prompt_text) + count(QUESTION_TEMPLATE.format(question=sample.question))


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [1000, 8192])
def test_length_is_counted_in_tokens_and_answer_is_in_context(task, length):
    s = make_sample(task, length, seed=5)
    n = prompt_tokens(s)
    assert length - 90 <= n <= length  # kv_retrieval may fall short by at most one JSON pair (82 bytes)
    assert s.answers[0] in s.context
    assert s.target.strip() == s.answers[0]
    assert score(task, s.target, s.answers) == 1.0


def test_length_follows_any_tokenizer():
    words = lambda text: len(text.split())  # a tokenizer that counts words instead of bytes
    s = make_sample("niah_single", 2000, seed=1, count=words)
    assert 1900 <= prompt_tokens(s, words) <= 2000
    assert byte_counter(s.context) > 4 * 2000  # so the length really was measured in words


def test_byte_counter_matches_the_byte_tokenizer():
    from pdllm.models.tokenizer import build_byte_tokenizer

    s = make_sample("kv_retrieval", 1500, seed=2)
    assert tokenizer_counter(build_byte_tokenizer())(s.context) == byte_counter(s.context)


def test_deterministic_from_seed():
    a, b, c = (make_sample("passkey", 4096, seed) for seed in (3, 3, 4))
    assert a == b
    assert a.answers != c.answers or a.context != c.context


@pytest.mark.parametrize("task", ["passkey", "niah_single", "kv_retrieval"])
def test_needle_depth(task):
    needle_at = []
    for depth in (0.0, 0.5, 1.0):
        s = make_sample(task, 6000, seed=9, depth=depth)
        needle_at.append(s.context.index(s.answers[0] if task != "kv_retrieval" else s.question.split('"')[1]))
        needle_at[-1] /= len(s.context)
    assert needle_at[0] < 0.1 and 0.4 < needle_at[1] < 0.6 and needle_at[2] > 0.9


@pytest.mark.parametrize("task", list(TASKS))
def test_a_depth_sweep_moves_the_needle_of_the_sample_drawn_without_one(task):
    """A sweep compares depths, so every depth must hold the same question, answer and wording (the held-out facts
    templates differ in difficulty: a sweep that re-drew them would measure wordings, not depths). kv_retrieval's
    values are drawn in key order, so moving its probe key moves which random UUID it maps to; its question stays."""
    free = make_sample(task, 3000, seed=4)
    for depth in (0.0, free.depth, 1.0):
        fixed = make_sample(task, 3000, seed=4, depth=depth)
        assert (fixed.question, fixed.meta) == (free.question, free.meta)
        assert (fixed.answers == free.answers) or (task == "kv_retrieval" and depth != free.depth)
        assert fixed.depth == depth and (fixed.context == free.context) == (depth == free.depth)


def test_multikey_has_distractor_needles():
    s = make_sample("niah_multikey", 4000, seed=1)
    assert s.context.count("One of the special magic numbers for") == 4
    assert s.answers[0] in s.context


def test_official_metrics():
    assert metrics.passkey_score("The pass key is 71432.", ("71432",)) == 1.0
    assert metrics.passkey_score("7 then 71432", ("71432",)) == 0.0  # first integer only
    assert metrics.kv_retrieval_score('"abc-1": "v-2",', ("v-2",)) == 1.0
    assert metrics.kv_retrieval_score("xv-2", ("v-2",)) == 0.0  # a whole word, not a substring
    assert metrics.string_match_all("Numbers: 123 and 456", ("123", "789")) == 0.5


def test_heldout_prose_is_disjoint_from_training_prose():
    train, held = set(load_sentences("train")), set(load_sentences("heldout"))
    assert len(train) > 10_000 and len(held) > 2_000
    assert not train & held
    s = make_sample("niah_single", 3000, seed=0)  # evaluation default: held-out prose
    body = [x for x in s.context.split(". ") if len(x) > 40][:5]
    assert any(any(b in h for h in held) for b in body)


def test_bad_requests():
    with pytest.raises(InvalidRequest, match="unknown task"):
        make_sample("nope", 2048, 0)
    with pytest.raises(InvalidRequest, match="length"):
        make_sample("passkey", 100, 0)
    with pytest.raises(InvalidRequest, match="depth"):
        make_sample("passkey", 2048, 0, depth=1.5)
