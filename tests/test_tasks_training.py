"""Training: examples in the engine's layouts, the objective (answer-focused diffusion loss, chunk ranking as the
decode actor ranks), the curriculum, the held-out probe, and a resumable CPU smoke run."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from pdllm.method import MethodConfig
from pdllm.method.prefill import encode_chunks
from pdllm.method.selection import chunk_scores
from pdllm.models.tiny import random_model, tiny_spec
from pdllm.models.transformer import ForwardOutput
from pdllm.training import train
from pdllm.training.data import (
    BOS_ID,
    CURRICULUM,
    EOS_ID,
    QUERY_SEGMENT,
    ExampleStream,
    attention_mask,
    build_example,
    byte_ids,
    collate,
    curriculum,
)
from pdllm.training.objective import diffusion_loss, mask_tokens, ranking_scores
from pdllm.training.probe import exact_match, probe_batches
from pdllm.training.train import advance_reason


def test_chunked_layout_matches_what_sparse_decoding_sees():
    e = build_example(random.Random(1), 1500, chunked=True, chunk_sizes=(256,))
    b = collate([e])
    starts = [i for i, s in enumerate(e.seg) if s >= 0 and (i == 0 or e.seg[i - 1] != s)]
    assert len(starts) >= 5 and all(e.ids[i] == BOS_ID and e.pos[i] == 0 for i in starts)
    m = attention_mask(b.seg)[0, 0]
    a, c = starts[0], starts[1]
    assert not m[a, c] and m[c, c + 1]  # a chunk never sees another chunk
    q = e.seg.index(QUERY_SEGMENT)
    assert m[q, a] and m[q, c] and not m[a, q]  # the question sees every chunk; chunks do not see the question
    assert e.pos[q] == 257  # right after the longest chunk ([BOS] + 256), where the sparse decoder puts it
    assert e.ids[q : q + len(e.question)] == e.question and e.ids[-1] == EOS_ID and e.answer_start > q
    gold = bytes(e.ids[e.answer_start : e.answer_start + e.core_len - 1]).decode().strip()
    hold = [t for t, s in zip(e.ids, e.seg, strict=True) if s == e.needle_seg and t != BOS_ID]
    assert gold[:5] in bytes(hold).decode()  # the recorded chunk holds the answer


def test_dense_layout_and_answer_masking():
    e = build_example(random.Random(2), 900, chunked=False, full=True)
    assert e.pos == list(range(len(e.ids))) and e.needle_seg == -1
    b = collate([e, build_example(random.Random(3), 700, chunked=False)])
    m = attention_mask(b.seg, b.full)
    assert m[0, 0, 1, len(e.ids) - 1] and not m[1, 0, 1, b.answer[1].nonzero()[0, 0]]  # only "full" rows see q
    assert (b.core <= b.answer).all() and b.core[0].sum() == e.core_len < b.answer[0].sum()
    b.pretrain = torch.tensor([False, True])
    noisy, masked, _, eligible = mask_tokens(b, 258, 0.5, torch.Generator().manual_seed(0))
    assert masked[0].any() and not (masked[0] & ~b.answer[0]).any()  # SFT row: answer only
    assert eligible[1].sum() > b.answer[1].sum()  # pre-training row: the whole sequence is eligible
    assert (noisy[masked] == 258).all()


def test_long_value_rows_keep_the_official_wording_and_copy_more():
    rows = [build_example(random.Random(i), 400, False, {"passkey": 1.0}, long_values=1.0) for i in range(8)]
    for e in rows:
        text = bytes(e.ids[1 : e.answer_start]).decode()
        value = bytes(e.ids[e.answer_start : e.answer_start + e.core_len - 1]).decode().strip()
        assert f"The pass key is {value}. Remember it. {value} is the pass key." in text
        assert 5 <= len(value) <= 32 and len(e.ids) - e.answer_start == 48
    assert max(e.core_len for e in rows) > 12


def test_byte_ids_are_the_tokenizer_ids():
    from pdllm.models.tokenizer import build_byte_tokenizer

    text = "The pass key is 71432. Remember it.\n"
    assert byte_ids(text) == build_byte_tokenizer()(text, add_special_tokens=False).input_ids


def test_ranking_loss_scores_chunks_exactly_as_the_decode_actor_does():
    spec = tiny_spec("llada", hidden=32, layers=3, heads=2, inner=64)
    model = random_model(spec, seed=3)
    lm = SimpleNamespace(model=model, spec=spec)
    e = build_example(random.Random(4), 900, chunked=True, chunk_sizes=(128,))
    b = collate([e])
    kv = model(b.ids, b.pos, _masked(b), return_kv=True).kv
    got, valid = ranking_scores(model, b, kv)
    chunks = [[t for t, s in zip(e.ids, e.seg, strict=True) if s == c][1:] for c in range(max(e.seg) + 1)]
    encoded = encode_chunks(lm, chunks, MethodConfig(chunk_size=128), "m")
    want = chunk_scores(lm, e.question, [c.summary for c in encoded])
    assert valid.all() and got.shape == (1, len(chunks))
    torch.testing.assert_close(got[0], want, rtol=2e-2, atol=2e-3)  # summaries are stored as float16


def test_ranking_across_rows_scores_every_rows_chunks_as_the_decode_actor_would():
    spec = tiny_spec("llada", hidden=32, layers=3, heads=2, inner=64)
    model = random_model(spec, seed=3)
    lm = SimpleNamespace(model=model, spec=spec)
    tasks = {"kv_retrieval": 0.5, "niah_multikey": 0.5}
    examples = [build_example(random.Random(i), 700 + 200 * i, True, tasks, chunk_sizes=(128,)) for i in range(3)]
    b = collate(examples)
    kv = model(b.ids, b.pos, _masked(b), return_kv=True).kv
    own, own_valid = ranking_scores(model, b, kv)
    cross, valid = ranking_scores(model, b, kv, across_rows=True)
    c = own.shape[1]
    assert cross.shape == valid.shape == (3, 3 * c)
    for row, e in enumerate(examples):
        torch.testing.assert_close(cross[row, row * c : (row + 1) * c], own[row])
        assert torch.equal(valid[row, row * c : (row + 1) * c], own_valid[row])
        for n, other in enumerate(examples):
            chunks = [[t for t, s in zip(other.ids, other.seg, strict=True) if s == k][1:] for k in range(c)]
            chunks = [x for x in chunks if x]
            encoded = encode_chunks(lm, chunks, MethodConfig(chunk_size=128), "m")
            want = chunk_scores(lm, e.question, [x.summary for x in encoded])  # row's question, other's chunks
            torch.testing.assert_close(cross[row, n * c : n * c + len(chunks)], want, rtol=2e-2, atol=2e-3)
            if n != row:  # another row lends its chunks but its needle's (it may answer this question too)
                lent = valid[row, n * c : (n + 1) * c]
                assert not lent[other.needle_seg] and lent.sum() == len(chunks) - 1


def test_the_ranking_loss_across_rows_targets_the_rows_own_needle_chunk():
    spec = tiny_spec("llada", hidden=32, layers=2, heads=2, inner=64)
    model = random_model(spec, seed=0)
    rows = [build_example(random.Random(i), 600, True, {"kv_retrieval": 1.0}, (128,)) for i in range(3)]
    b = collate(rows)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    plain, m_plain = diffusion_loss(model, b, 0.5, gen(), rank_weight=1.0)
    across, m_across = diffusion_loss(model, b, 0.5, gen(), rank_weight=1.0, rank_across_rows=True)
    assert m_across["rank"] > m_plain["rank"]  # more negatives: a random model's ranking loss can only rise
    assert torch.isclose(plain - m_plain["rank"], across - m_across["rank"])  # the rest of the loss is the same
    across.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_ranking_loss_never_ranks_an_instruction_kept_apart():
    """The engine keeps a task's instruction and ranks only the context's chunks: with --instruction-apart chunk 0
    (the instruction) is no candidate, in its own row or lent to another; joined rows rank every chunk."""
    spec = tiny_spec("llada", hidden=32, layers=2, heads=2, inner=64)
    model = random_model(spec, seed=0)
    tasks = {"kv_retrieval": 0.5, "niah_multikey": 0.5}
    apart = [build_example(random.Random(i), 700, True, tasks, (128,), instruction_apart=True) for i in range(2)]
    joined = build_example(random.Random(5), 700, True, tasks, (128,))
    assert [e.ranked_from for e in apart] == [1, 1] and joined.ranked_from == 0
    b = collate([*apart, joined])
    kv = model(b.ids, b.pos, _masked(b), return_kv=True).kv
    _, own = ranking_scores(model, b, kv)
    _, cross = ranking_scores(model, b, kv, across_rows=True)
    c = own.shape[1]
    assert own[:2, 0].logical_not().all() and own[:2, 1].all() and own[2, 0]
    assert not cross[:, 0].any() and not cross[:, c].any()  # the apart rows' instructions, to every row
    assert cross[0, 2 * c] and cross[2, 2 * c]  # the joined row's first chunk holds context: ranked
    loss, metrics = diffusion_loss(model, b, 0.5, torch.Generator().manual_seed(1), rank_weight=1.0)
    assert torch.isfinite(loss) and torch.isfinite(metrics["rank"])


def test_loss_is_finite_and_padding_weighs_less():
    spec = tiny_spec("llada", hidden=32, layers=2, heads=2, inner=64)
    model = random_model(spec, seed=0)
    b = collate([build_example(random.Random(i), 400, True, {"passkey": 1.0}, (64,)) for i in range(3)])
    loss, metrics = diffusion_loss(model, b, 0.5, torch.Generator().manual_seed(1), rank_weight=0.5)
    assert torch.isfinite(loss) and {"diff", "acc", "rank", "rank_acc"} <= set(metrics)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    heavy, _ = diffusion_loss(model, b, 1.0, torch.Generator().manual_seed(1), pad_weight=1.0)
    light, _ = diffusion_loss(model, b, 1.0, torch.Generator().manual_seed(1), pad_weight=0.0)
    assert not torch.isclose(heavy, light)  # t = 1: every answer token masked; only the weighting differs


def test_curriculum_starts_on_digit_copying_and_ends_on_every_task_at_the_training_length():
    first, last = CURRICULUM[0], CURRICULUM[-1]
    assert set(first.tasks) == {"passkey", "number_string"} and first.max_len < 512 and first.long_values > 0.5
    official = {"passkey", "number_string", "kv_retrieval", "niah_single", "niah_multikey"}
    assert set(last.tasks) == official and last.max_len == 0 and 512 in last.chunk_sizes and last.advance_at is None
    varied = curriculum("varied")
    assert varied[0] == first and set(varied[-1].tasks) == official | {"facts"}  # same copy stage, facts added
    assert advance_reason(first, first.advance_at, 0.0) == "probe" and advance_reason(last, 1.0, 1.0) is None
    assert advance_reason(first, first.advance_at, first.until) == "probe"  # the probe wins when both hold
    assert advance_reason(first, 0.0, first.until) == "deadline" and advance_reason(first, 0.0, 0.0) is None
    stream = ExampleStream(0, 4096, 1024, 0.5)

    def openings() -> set[str]:
        ids = next(iter(stream)).ids
        return {bytes(ids[i, 1:9].tolist()).decode() for i in range(ids.shape[0])}

    assert openings() == {"There is"}  # passkey / number_string rows only (InfiniteBench's retrieval preamble)
    stream.stage.value = 1  # what the training loop does when the probe passes
    assert len(openings()) > 1  # kv_retrieval / niah rows appear


def test_probe_counts_a_row_only_when_the_whole_answer_is_right():
    (batch, chunked, tasks) = probe_batches(CURRICULUM[0], 1024, samples=4, rows=4)[0]
    assert set(tasks) <= {"passkey", "number_string"}
    assert chunked.tolist() == [False, True, False, True]

    class Oracle(torch.nn.Module):  # predicts the true tokens, except where told to be wrong
        spec = SimpleNamespace(mask_token_id=258)

        def __init__(self, wrong_at: int | None) -> None:
            super().__init__()
            self.wrong_at = wrong_at

        def forward(self, ids, pos, ctx):
            target = batch.ids.clone()
            if self.wrong_at is not None:
                target[0, self.wrong_at] = (target[0, self.wrong_at] + 1) % 256
            return ForwardOutput(torch.nn.functional.one_hot(target, 260).float(), None)

    assert exact_match(Oracle(None), batch).all()
    first_digit = int(batch.core[0].nonzero()[1])
    assert exact_match(Oracle(first_digit), batch).tolist() == [False, True, True, True]
    after = int(batch.answer[0].nonzero()[-1])  # padding after the end token does not count
    assert exact_match(Oracle(after), batch).all()


def _masked(b):
    from pdllm.training.objective import MaskedAttention

    return MaskedAttention(attention_mask(b.seg, b.full))


@pytest.mark.timeout(120)
def test_smoke_train_resume_export(tmp_path):
    from pdllm.models.loader import load_model
    from pdllm.training.train import main

    assert main(["--smoke", "--out", str(tmp_path / "a"), "--max-steps", "2", "--workers", "0"]) == 0
    assert main(["--smoke", "--out", str(tmp_path / "b"), "--resume", str(tmp_path / "a"), "--max-steps", "3"]) == 0
    meta = json.loads((tmp_path / "b" / "state.json").read_text())
    assert meta["step"] == 3 and any("em" in e for e in meta["log"]) and meta["stage"] in range(len(CURRICULUM))
    assert main(["--export", str(tmp_path / "b"), "--out", str(tmp_path), "--bundle", str(tmp_path / "m")]) == 0
    lm = load_model(tmp_path / "m")
    assert lm.spec.family == "llada" and lm.spec.num_layers == 2


@pytest.mark.timeout(120)
def test_a_run_planned_by_steps_ends_there_on_a_schedule_of_steps(tmp_path):
    """--steps: the LR's cosine runs over the planned steps (not the wall clock), and the run stops at the last."""
    from pdllm.training.train import main

    assert main(["--smoke", "--out", str(tmp_path), "--steps", "5", "--workers", "0", "--lr", "1e-3"]) == 0
    meta = json.loads((tmp_path / "state.json").read_text())
    assert meta["step"] == 5 and meta["args"]["steps"] == 5
    lrs = [e["lr"] for e in meta["log"]]  # step n's entry holds the LR step n - 1 ran at; warmup is 2 steps
    cosine = [1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * n / 5))) for n in (2, 3, 4)]
    assert lrs == pytest.approx([5e-4, 1e-3, *cosine], abs=1e-6)
    # cut short, then resumed without --steps: it goes on to its plan's end on the same schedule
    cut = tmp_path / "cut"
    smoke = ["--smoke", "--out", str(cut), "--workers", "0", "--lr", "1e-3"]
    assert main([*smoke, "--steps", "5", "--max-steps", "3"]) == 0
    assert main([*smoke, "--resume", str(cut)]) == 0
    resumed = json.loads((cut / "state.json").read_text())
    assert resumed["step"] == 5 and [e["lr"] for e in resumed["log"]] == pytest.approx(lrs, abs=1e-6)


@pytest.mark.timeout(120)
def test_a_required_stage_left_below_its_target_stops_the_run_there(tmp_path, capsys):
    """--require copy: the official run stops (exit 3, state saved) at the probe that leaves its copy stage on the
    deadline below target, instead of training later stages on a model that did not learn to copy."""
    from pdllm.training.train import REQUIRED_STAGE_MISSED, main

    smoke = ["--smoke", "--workers", "0", "--steps", "10"]  # the copy deadline, 0.3 of 10 steps, at step 4's probe
    with pytest.raises(SystemExit) as stopped:
        main([*smoke, "--out", str(tmp_path / "a"), "--require", "copy"])
    assert stopped.value.code == REQUIRED_STAGE_MISSED == 3
    meta = json.loads((tmp_path / "a" / "state.json").read_text())
    assert (meta["step"], meta["stage"]) == (4, 0) and "advance" not in meta["log"][-1]
    assert "stopped: --require copy" in capsys.readouterr().err
    assert main([*smoke, "--out", str(tmp_path / "b"), "--require", "long"]) == 0  # the last stage is never left
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 10
    with pytest.raises(SystemExit) as refused:
        main([*smoke, "--out", str(tmp_path / "c"), "--require", "cpoy"])
    assert refused.value.code == 2 and "--require cpoy: no such stage" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_a_run_stopped_after_a_stage_is_resumed_from_there_to_its_planned_end(tmp_path, capsys):
    """--stop-after copy: the run saves and stops (exit 0) at the probe that leaves the copy stage, in the next stage,
    and --resume trains on from that step to the end of the run's plan."""
    from pdllm.training.train import main

    run = tmp_path / "run"
    smoke = ["--smoke", "--workers", "0", "--steps", "10", "--out", str(run)]  # copy is left at step 4's probe
    assert main([*smoke, "--stop-after", "copy"]) == 0
    meta = json.loads((run / "state.json").read_text())
    assert (meta["step"], meta["stage"]) == (4, 1) and meta["log"][-1]["advance"] == "tasks"
    assert f"stopped after stage copy (--stop-after); --resume {run} goes on" in capsys.readouterr().out
    assert main([*smoke, "--resume", str(run)]) == 0
    resumed = json.loads((run / "state.json").read_text())
    assert resumed["step"] == 10 and [e["step"] for e in resumed["log"]][:5] == [1, 2, 3, 4, 5]
    with pytest.raises(SystemExit) as refused:
        main([*smoke, "--stop-after", "cpoy"])
    assert refused.value.code == 2 and "--stop-after cpoy: no such stage" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_a_run_marks_the_step_it_left_a_stage_at_and_trains_on(tmp_path, capsys):
    """--mark-after copy FILE: FILE holds the step of the probe that left the copy stage, and the run goes on to the
    end of its plan (a script watching several tries stops the others)."""
    from pdllm.training.train import main

    run, mark = tmp_path / "run", tmp_path / "left"
    smoke = ["--smoke", "--workers", "0", "--steps", "10", "--out", str(run)]  # copy is left at step 4's probe
    assert main([*smoke, "--mark-after", "copy", str(mark)]) == 0
    assert mark.read_text() == "4\n" and not list(tmp_path.glob("*.part"))
    assert json.loads((run / "state.json").read_text())["step"] == 10
    assert main([*smoke, "--mark-after", "long", str(tmp_path / "never")]) == 0  # the last stage is never left
    assert not (tmp_path / "never").exists()
    with pytest.raises(SystemExit) as refused:
        main([*smoke, "--mark-after", "cpoy", str(mark)])
    assert refused.value.code == 2 and "--mark-after cpoy: no such stage" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_smoke_train_on_the_varied_mix(tmp_path):
    from pdllm.training.train import main

    assert main(["--smoke", "--mix", "varied", "--out", str(tmp_path), "--max-steps", "2", "--workers", "0"]) == 0
    meta = json.loads((tmp_path / "state.json").read_text())
    assert meta["args"]["mix"] == "varied" and meta["step"] == 2


@pytest.mark.parametrize("mix", ["recall_wordings", "recall_text"])
def test_smoke_train_on_the_recall_wordings_mixes(tmp_path, mix):
    from pdllm.training.train import main

    args = ["--smoke", "--mix", mix, "--stage", "1", "--out", str(tmp_path), "--workers", "0"]
    assert main([*args, "--max-steps", "2", "--chunked-frac", "1"]) == 0
    log = json.loads((tmp_path / "state.json").read_text())["log"]
    assert all("rank" in e for e in log)  # every batch chunked: each one ranked across its rows


@pytest.mark.timeout(120)
def test_smoke_train_on_the_recall_mix_runs_every_loss_it_is_given(tmp_path):
    from pdllm.training.train import main

    args = ["--smoke", "--mix", "recall", "--stage", "1", "--out", str(tmp_path), "--max-steps", "2", "--workers", "0"]
    assert main([*args, "--pointer-weight", "0.5", "--key-weight", "0.5", "--match-weight", "0.5"]) == 0
    log = json.loads((tmp_path / "state.json").read_text())["log"]
    assert all({"point", "point_acc", "key", "key_mass", "match", "match_acc"} <= set(e) for e in log)
    resume = [a for a in args if a not in ("--mix", "recall")]  # no --mix: the resumed run keeps its own
    assert main([*resume, "--resume", str(tmp_path), "--max-steps", "3"]) == 0  # weights 0: those losses off
    state = json.loads((tmp_path / "state.json").read_text())
    assert not {"point", "key", "match"} & set(state["log"][-1])
    assert state["args"]["mix"] == "recall" and state["stage"] == 1


@pytest.mark.parametrize("layer", [0, 1])
def test_the_pointer_loss_trains_the_layer_it_is_given(layer):
    e = build_example(random.Random(3), 300, False, {"niah_multikey": 1.0}, keys=(2, 2), queries=2)
    b = collate([e])
    model = random_model(tiny_spec("llada", hidden=32, layers=2, heads=2, inner=64))

    def q_grads(weight: float) -> list[torch.Tensor]:
        model.zero_grad()
        loss, _ = diffusion_loss(model, b, generator=torch.Generator().manual_seed(0), pointer_weight=weight,
                                 pointer_at_layer=layer)  # fmt: skip
        loss.backward()
        return [blk.q_proj.weight.grad.clone() for blk in model.layers]

    plain, pointed = q_grads(0.0), q_grads(1.0)
    moved = [not torch.allclose(a, c) for a, c in zip(plain, pointed, strict=True)]
    assert moved == [True, layer == 1]  # layer 0's queries feed layer 1; layer 1's reach nothing below


def test_the_pointer_layer_must_exist_and_not_be_the_key_layer():
    from pdllm.training.train import parse_args

    assert parse_args(["--out", "x", "--pointer-layer", "3"]).pointer_layer == 3
    for bad in (["--pointer-layer", "8"], ["--pointer-layer", "2", "--pointer-weight", "1", "--match-weight", "1"]):
        with pytest.raises(SystemExit):
            parse_args(["--out", "x", *bad])


def test_a_resumed_run_keeps_its_mix_unless_another_is_asked_for():
    from pdllm.training.train import resumed_mix

    assert resumed_mix(None, {"args": {"mix": "recall"}}) == "recall"
    assert resumed_mix("lookup", {"args": {"mix": "recall"}, "stage": 1}) == "lookup"
    assert resumed_mix(None, {"args": {}}) == "official"  # saved before the mix was recorded


@pytest.mark.timeout(120)
def test_a_resumed_run_keeps_its_rows_layout_unless_the_flags_say_otherwise(tmp_path):
    """A run saved with --instruction-apart --text-chunks resumes in that layout when the flags are left out, and in
    the one asked for when they are given."""
    from pdllm.training.train import main, parse_args, resume_layout, run_stages

    out = tmp_path / "run"
    args = ["--smoke", "--mix", "recall_notes", "--stage", "1", "--workers", "0"]
    assert main([*args, "--out", str(out), "--max-steps", "1", "--instruction-apart", "--text-chunks", "0.5"]) == 0
    meta = json.loads((out / "state.json").read_text())
    resumed = parse_args(["--out", str(out), "--resume", str(out)])
    resume_layout(resumed, meta)
    resumed.mix = "recall_notes"
    assert all(s.instruction_apart and s.text_chunks == 0.5 for s in run_stages(resumed))
    asked = parse_args(["--out", str(out), "--resume", str(out), "--text-chunks", "0"])
    resume_layout(asked, {"args": {"text_chunks": 0.5, "instruction_apart": None}})
    asked.mix = "recall_notes"
    assert asked.text_chunks == 0 and not any(s.instruction_apart for s in run_stages(asked))
    assert main([*args, "--out", str(out), "--resume", str(out), "--max-steps", "2"]) == 0
    saved = json.loads((out / "state.json").read_text())["args"]
    assert saved["instruction_apart"] is True and saved["text_chunks"] == 0.5


def test_the_official_mix_reads_the_data_that_trained_the_bundled_model():
    """The bundled weights come from `--mix official --seed 1234`: its first batches of every stage hash to the
    value the recipe's data had when the bundle was trained, so adding other mixes did not change it."""
    import hashlib

    h = hashlib.sha256()
    for stage in range(3):
        it = iter(ExampleStream(1234, 32768, 2048, 0.5, 0, 0.0, stage))
        for _ in range(3):
            b = next(it)
            for t in (b.ids, b.pos, b.seg, b.answer, b.core, b.needle_seg):
                h.update(t.numpy().tobytes())
    assert h.hexdigest() == "cd0e1fd237fbc36dc44cb2806bc634e0ee6d41fe8a5102705b5e1da479a3e951"


def test_the_lookup_mix_puts_a_key_value_stage_after_copying():
    from pdllm.training.data import LOOKUP_STAGE, make_batch

    stages = curriculum("lookup")
    assert [s.name for s in stages] == ["copy", "lookup", "tasks", "long"] and stages[0] == CURRICULUM[0]
    assert stages[1] is LOOKUP_STAGE and {"niah_multikey", "kv_retrieval", "facts"} <= set(LOOKUP_STAGE.tasks)
    assert all(s.keys is None for s in CURRICULUM)  # the official recipe keeps RULER's 4 keys
    needles = set()
    for i in range(40):
        e = build_example(random.Random(i), 600, False, {"niah_multikey": 1.0}, keys=LOOKUP_STAGE.keys)
        needles.add(bytes(e.ids[1 : e.answer_start]).decode().count("One of the special magic numbers for"))
    assert needles == {2, 3, 4}
    kv_pairs = set()
    for i in range(40):
        e = build_example(random.Random(i), random.Random(i).randint(300, 640), False, {"kv_retrieval": 1.0})
        kv_pairs.add(bytes(e.ids[1 : e.answer_start]).decode().count('": "'))
    assert 1 in kv_pairs and max(kv_pairs) >= 4  # from a plain 36-character copy to a lookup among several keys
    b = make_batch(random.Random(0), LOOKUP_STAGE, 2048, 8192, (1.0, 0.0))
    assert b.ids.shape[1] <= 1024 and b.needle_seg.ge(0).all()


def test_the_loss_reads_its_layout_on_the_cpu_and_equals_the_gathered_formula():
    from pdllm.training.objective import batch_layout

    spec = tiny_spec("llada", hidden=32, layers=2, heads=2, inner=64)
    model = random_model(spec, seed=1)
    b = collate([build_example(random.Random(i), 500, True, None, (128,)) for i in range(4)])
    layout = batch_layout(b)
    assert layout.ranked and layout.chunks == int(b.seg.max()) + 1
    assert layout.first == int(b.answer.float().argmax(-1).min())
    given, m1 = diffusion_loss(model, b, 0.3, torch.Generator().manual_seed(5), rank_weight=0.5, layout=layout)
    read, m2 = diffusion_loss(model, b, 0.3, torch.Generator().manual_seed(5), rank_weight=0.5)
    torch.testing.assert_close(given, read)
    assert set(m1) == set(m2) == {"diff", "acc", "rank", "rank_acc"}
    # the reference: cross-entropy gathered at the masked positions, weighted 1/t and per-row normalised
    noisy, masked, t, eligible = mask_tokens(b, spec.mask_token_id, 0.3, torch.Generator().manual_seed(5))
    logits = model(noisy, b.pos, _masked(b)).logits
    w = torch.where(b.core | ~b.answer, 1.0, 0.1)
    scale = w / (t[:, None] * (w * eligible).sum(-1, keepdim=True))
    ce = torch.nn.functional.cross_entropy(logits[masked], b.ids[masked], reduction="none")
    torch.testing.assert_close(m1["diff"], (ce * scale[masked]).sum() / b.ids.shape[0])
    core = b.core[masked]
    torch.testing.assert_close(m1["acc"], (logits[masked].argmax(-1) == b.ids[masked])[core].float().mean())


@pytest.mark.timeout(120)
def test_training_starts_from_a_checkpoint_and_refuses_another_shape(tmp_path, capsys):
    from safetensors.torch import load_file

    from pdllm.models.loader import load_model
    from pdllm.training.train import main

    assert main(["--smoke", "--out", str(tmp_path / "a"), "--max-steps", "2", "--workers", "0"]) == 0
    assert main(["--export", str(tmp_path / "a"), "--out", str(tmp_path), "--bundle", str(tmp_path / "m")]) == 0
    args = ["--smoke", "--init-from", str(tmp_path / "m"), "--max-steps", "1", "--workers", "0", "--lr", "0"]
    assert main([*args, "--out", str(tmp_path / "b")]) == 0  # lr 0: one step leaves the weights as loaded
    meta = json.loads((tmp_path / "b" / "state.json").read_text())
    assert meta["step"] == 1 and meta["args"]["init_from"] == str(tmp_path / "m")
    saved = {}
    for f in sorted((tmp_path / "b").glob("train-state-*.safetensors")):
        saved |= {k[6:]: v for k, v in load_file(str(f)).items() if k.startswith("model.")}
    source = load_model(tmp_path / "m", dtype=torch.float32).model.state_dict()
    assert saved.keys() == source.keys() and all(torch.equal(saved[k], source[k]) for k in source)
    fresh = main(["--smoke", "--out", str(tmp_path / "c"), "--max-steps", "1", "--workers", "0", "--lr", "0"])
    assert fresh == 0
    other = {k[6:]: v for f in (tmp_path / "c").glob("train-state-*") for k, v in load_file(str(f)).items()}
    assert not all(torch.equal(other[k], source[k]) for k in source)  # without it: the fresh initialisation
    with pytest.raises(SystemExit, match="--init-from .*not this --shape"):  # refused before any training
        main(["--shape", "small", "--init-from", str(tmp_path / "m"), "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="--init-from .*cannot load"):
        main([*args[:1], "--init-from", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit):
        main([*args, "--resume", str(tmp_path / "a"), "--out", str(tmp_path / "f")])
    assert "exclude each other" in capsys.readouterr().err


def _text(ids: list[int]) -> str:
    return bytes(i for i in ids if i < 256).decode()


@pytest.mark.parametrize("chunked", [False, True])
def test_recall_rows_ask_about_several_keys_each_as_a_lone_question(chunked):
    rng = random.Random(4)
    for task in ("niah_multikey", "kv_retrieval"):
        e = build_example(rng, 800, chunked, {task: 1.0}, chunk_sizes=(128,), keys=(4, 4), queries=4)
        assert len(e.extra) == 3
        b = collate([e])
        m = attention_mask(b.seg)[0, 0]
        context = b.seg[0] >= 0
        starts = [e.answer_start] + [s for s, _, _ in e.extra]
        segs = {int(b.seg[0, s]) for s in starts}
        assert len(segs) == 4 and QUERY_SEGMENT in segs  # each question and answer a segment of its own
        ctx = _text([t for t, s in zip(e.ids, e.seg, strict=True) if s >= 0])
        for s, core, _ in [(e.answer_start, e.core_len, 0)] + e.extra:
            own = b.seg[0] == b.seg[0, s]
            assert m[s][context].all() and torch.equal(m[s][~context], own[~context])  # context + itself only
            assert e.pos[e.seg.index(int(b.seg[0, s]))] == max(e.pos[: e.seg.index(QUERY_SEGMENT)]) + 1  # as alone
            value = _text(e.ids[s : s + core]).strip()
            question = _text([t for t, g in zip(e.ids, e.seg, strict=True) if g == b.seg[0, s]])
            key = (
                question.split("for ")[-1].split(" mentioned")[0] if task == "niah_multikey" else question.split('"')[1]
            )
            assert (f"{key} is: {value}." if task == "niah_multikey" else f'"{key}": "{value}"') in ctx
        assert e.pointer and all(
            e.ids[a] == e.ids[p] and b.seg[0, p] >= 0 for a, p in zip(e.pointer_at, e.pointer, strict=True)
        )
        assert set(b.seg[0, e.pointer_at].tolist()) == segs  # every answer is pointed


def test_the_pointer_loss_rewards_the_head_that_looks_at_the_copied_byte():
    from pdllm.training.objective import pointer_loss

    e = build_example(random.Random(2), 300, False, {"niah_multikey": 1.0}, keys=(2, 2), queries=2)
    b = collate([e])
    t = b.ids.shape[1]
    k = torch.eye(t)[None, None] * 20.0  # key t: the unit vector t
    right = torch.zeros(1, 1, t, t)
    right[0, 0, b.pointer_at[0]] = torch.eye(t)[b.pointer[0]] * 20.0  # each pointed token asks for its target
    wrong = torch.zeros(1, 1, t, t)
    wrong[0, 0, b.pointer_at[0]] = torch.eye(t)[b.pointer[0] - 1] * 20.0  # the byte before it
    good, good_acc = pointer_loss(b, (right, k), attention_mask(b.seg))
    bad, bad_acc = pointer_loss(b, (wrong, k), attention_mask(b.seg))
    assert good_acc == 1.0 and bad_acc == 0.0 and good < 1e-3 < 10 < bad
    loss, metrics = diffusion_loss(
        random_model(tiny_spec("llada", hidden=32, layers=2, heads=2, inner=64)), b, pointer_weight=0.5
    )
    assert torch.isfinite(loss) and 0 <= metrics["point_acc"] <= 1 and metrics["point"] > 0


@pytest.mark.parametrize("chunked", [False, True])
def test_the_match_loss_rewards_a_key_head_output_that_names_the_key(chunked):
    from pdllm.training.objective import match_loss

    e = build_example(random.Random(7), 700, chunked, {"niah_multikey": 1.0}, chunk_sizes=(128,), keys=(3, 3),
                      queries=3)  # fmt: skip
    b = collate([e])
    t, keys = b.ids.shape[1], sorted({_text(e.ids[lo:hi]) for lo, hi in e.key_span})
    key_at = {f: keys.index(_text(e.ids[lo:hi])) for f, (lo, hi) in zip(e.key_from, e.key_span, strict=True)}
    named = torch.zeros(1, t, len(keys) + 1)  # value tokens (either side): the one-hot of their key's text
    for f, i in key_at.items():
        named[0, f, i] = 1.0
    shuffled = torch.zeros_like(named)  # answers name the next key: they disagree with the value they copy
    for f, i in key_at.items():
        shuffled[0, f, (i + 1) % len(keys) if f in e.pointer_at else i] = 1.0
    good, good_acc = match_loss(b, named)
    same, same_acc = match_loss(b, torch.ones(1, t, 4))  # nothing said about keys: chance
    bad, bad_acc = match_loss(b, shuffled)
    assert len(keys) == 3 and good_acc == 1.0 and good < 1e-3
    assert same > 0.5 and bad > 5 and bad_acc == 0.0
    loss, metrics = diffusion_loss(
        random_model(tiny_spec("llada", hidden=32, layers=4, heads=2, inner=64)), b, match_weight=0.5
    )
    assert torch.isfinite(loss) and 0 <= metrics["match_acc"] <= 1 and metrics["match"] > 0
    loss.backward()


def test_the_lookup_diagnosis_prints_every_cell(tiny_llada):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "lookup_diagnosis.py"
    run = subprocess.run([sys.executable, str(script), str(tiny_llada), "--rows", "1", "--length", "300"],
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    lines = run.stdout.strip().splitlines()
    assert lines[1].split()[-2:] == ["key", "match"] and len(lines) == 2 + 8
    for line in lines[2:]:
        *_, token, row, pointer, same, match = line.split()
        assert all(0 <= float(v) <= 1 for v in (token, row, pointer, same))
        assert (match == "-") == line.startswith("niah_single") and (match == "-" or 0 <= float(match) <= 1)


def test_the_recall_mix_asks_several_questions_per_lookup_row():
    stages = curriculum("recall")
    assert [s.name for s in stages] == ["copy", "recall", "tasks", "long"]
    assert stages[1].queries == 4 and stages[2].queries == stages[3].queries == 2
    assert curriculum("official")[-1].queries == 1


def test_the_reading_mix_is_recall_with_its_lookup_stage_kept_to_80_percent_of_the_time():
    import dataclasses

    recall, reading = curriculum("recall"), curriculum("reading")
    assert [s.name for s in reading] == [s.name for s in recall]
    assert reading[1].until == 0.8 > recall[1].until and reading[2].until == 0.9
    assert dataclasses.replace(reading[1], until=recall[1].until) == recall[1]  # the same rows, longer
    assert reading[2].tasks == recall[2].tasks and reading[3] == recall[3]


@pytest.mark.parametrize("chunked", [False, True])
def test_value_tokens_know_the_key_they_sit_under_and_the_key_loss_reads_it(chunked):
    from pdllm.training.objective import key_loss

    rng = random.Random(6)
    for task in ("niah_multikey", "kv_retrieval"):
        e = build_example(rng, 700, chunked, {task: 1.0}, chunk_sizes=(128,), keys=(3, 3), queries=3)
        b = collate([e])
        mask = attention_mask(b.seg)
        ctx = _text([t for t, s in zip(e.ids, e.seg, strict=True) if s >= 0])
        answers = set(e.pointer_at)
        assert answers <= set(e.key_from)  # every copied answer token also gathers its question's key
        for f, (lo, hi) in zip(e.key_from, e.key_span, strict=True):
            key, value = _text(e.ids[lo:hi]), e.ids[f]
            assert mask[0, 0, f, lo:hi].all() and "-" in key
            assert key in ctx and (e.seg[f] < 0) == (f in answers)
            pattern = f"{key} is: " if task == "niah_multikey" else f'"{key}": "'
            assert bytes([value]).decode() in ctx.split(pattern)[1][:36]  # the value follows that key
        t = b.ids.shape[1]
        k = torch.eye(t)[None, None] * 30.0
        on = torch.zeros(1, 1, t, t)
        for f, (lo, hi) in zip(e.key_from, e.key_span, strict=True):
            on[0, 0, f, lo:hi] = 30.0  # equal scores on every key token, nothing elsewhere
        loss, mass = key_loss(b, (on, k), mask)
        off, off_mass = key_loss(b, (torch.zeros(1, 1, t, t), k), mask)
        assert mass > 0.99 and loss < 0.01 and off_mass < 0.2 < 1 < off


def _pointer_probe():
    from benchmark_scripts import load_benchmark

    return load_benchmark("pointer_probe")


def test_the_pointer_probe_heads_see_positions_only_through_their_rotary_part():
    from pdllm.training.objective import head_scores

    probe = _pointer_probe()
    torch.manual_seed(0)
    x, rows = torch.randn(1, 12, 16), torch.tensor([[3, 7]])
    pos = torch.arange(12)[None]
    far = torch.cat([pos[:, :6], pos[:, 6:] + 40], 1)  # half the tokens moved 40 positions on
    everything = torch.ones(1, 1, 12, 12, dtype=torch.bool)
    for encoding in ("rope", "half", "none"):
        head = probe.Head(16, 8, encoding, 10_000.0)
        scores = lambda p: head_scores(head.qk(x, p), rows, everything)  # noqa: B023, E731
        same = scores(pos)
        assert torch.allclose(same, scores(pos + 100), atol=1e-4)  # relative positions only
        moved = not torch.allclose(same, scores(far), atol=1e-4)
        assert moved == (encoding != "none"), encoding
    half = probe.Head(16, 8, "half", 10_000.0)
    assert half.rotated == 4 and probe.Head(16, 8, "none", 10_000.0).rotated == 0


def test_the_pointer_probe_prints_a_row_per_layer_and_encoding(tiny_llada):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "pointer_probe.py"
    args = [str(tiny_llada), "--rows", "4", "--steps", "3", "--length", "300", "--layers", "0,1"]
    run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120, check=True)
    table = run.stdout.strip().splitlines()[4:]
    encodings = ("rope", "rope5e5", "half", "none")
    assert [line.split()[:2] for line in table] == [[str(i), e] for i in (0, 1) for e in encodings]
    for line in table:
        shares = [float(v) for v in line.split()[2:] if v != "/"]
        assert len(shares) == 2 * 4 and all(0 <= v <= 1 for v in shares)


@pytest.mark.parametrize("chunked", [False, True])
def test_recall_facts_rows_ask_about_several_subjects_and_point_into_each_ones_needle(chunked):
    from pdllm.tasks.facts import SUBJECTS
    from pdllm.training.data import KEYED_TASKS

    rng, asked_more, keyed_answers = random.Random(5), 0, 0
    for _ in range(6):
        e = build_example(rng, 800, chunked, {"facts": 1.0}, chunk_sizes=(128,), queries=4, asking=KEYED_TASKS)
        b = collate([e])
        asked_more += len(e.extra)
        subject_at = {f: _text(e.ids[lo:hi]).lower() for f, (lo, hi) in zip(e.key_from, e.key_span, strict=True)}
        for s, core, _ in [(e.answer_start, e.core_len, 0)] + e.extra:
            value = _text(e.ids[s : s + core]).strip()
            question = _text([t for t, g in zip(e.ids, e.seg, strict=True) if g == b.seg[0, s]]).lower()
            subject = max((x for x in SUBJECTS if x in question.split("answer:")[0]), key=len)
            pointed = [p for a, p in zip(e.pointer_at, e.pointer, strict=True) if s <= a < s + core]
            assert _text([e.ids[p] for p in pointed]) == value and all(e.seg[p] >= 0 for p in pointed)
            under = {subject_at[p] for p in pointed if p in subject_at}  # the key of the copied context bytes
            assert under == {subject} or (chunked and not under)  # a needle cut by a chunk border has no key
            keyed_answers += bool(under)
    assert asked_more >= 6 and keyed_answers >= 6
    plain = build_example(random.Random(5), 800, chunked, {"facts": 1.0}, chunk_sizes=(128,), queries=4)
    assert plain.extra == [] and plain.key_from == []  # the reading mix's facts rows, as before


def test_the_recall_facts_mix_asks_facts_questions_in_every_stage_after_copy():
    import dataclasses

    from pdllm.training.data import KEYED_TASKS, stage_lengths

    reading, facts = curriculum("reading"), curriculum("recall_facts")
    assert [s.name for s in facts] == [s.name for s in reading]
    assert facts[0] == reading[0] and all(s.asking == KEYED_TASKS for s in facts[1:])
    assert "facts" in facts[1].tasks and facts[1].tasks["kv_retrieval"] > reading[1].tasks["kv_retrieval"]
    assert facts[1].until == reading[1].until and facts[1].queries == reading[1].queries == 4
    assert all("facts" not in s.asking for s in reading)
    long = curriculum("recall_facts_long")
    assert long[1].max_len == 0 and long[1].min_len > facts[1].max_len // 2  # rows out to the training length
    assert dataclasses.replace(long[1], min_len=facts[1].min_len, max_len=facts[1].max_len) == facts[1]
    assert long[2:] == facts[2:]
    lengths = stage_lengths(random.Random(0), long[1], 2048, 32768)
    assert max(lengths) > 900 and min(lengths) >= 600


def test_a_runs_text_chunks_share_replaces_its_mixs_in_every_stage_and_reaches_the_loaders_rows():
    """train.py --text-chunks: recall_notes cut at text borders without a mix of its own; the stream's batches then
    hold text-cut rows (kv_retrieval's pairs at equal positions in every chunk, as served)."""
    assert all(s.text_chunks == 0.5 for s in curriculum("recall_notes", 0.5))
    assert all(s.text_chunks == 0 for s in curriculum("recall_text", 0.0))
    assert curriculum("recall_notes", None) == curriculum("recall_notes")
    assert [s.notes for s in curriculum("recall_notes", 0.5)] == [s.notes for s in curriculum("recall_notes")]
    with pytest.raises(ValueError, match="0 to 1"):
        curriculum("recall_notes", 1.5)
    args = train.parse_args(["--out", "x", "--mix", "recall_notes", "--text-chunks", "1"])
    stream = ExampleStream(1234, 8192, 1024, 1.0, 0, 0.0, 1, args.mix, train.run_stages(args))
    assert all(s.text_chunks == 1.0 for s in stream.stages)
    plain = ExampleStream(1234, 8192, 1024, 1.0, 0, 0.0, 1, args.mix)
    cut, fixed = next(iter(stream)), next(iter(plain))
    lengths = [torch.bincount(row[row >= 0]).tolist() for row in cut.seg]  # tokens per chunk, BOS included

    def even(rows: list[list[int]]) -> int:  # rows whose chunks (the last aside) are all of one size
        return sum(len(set(r[:-1])) <= 1 for r in rows)

    assert even(lengths) < len(lengths)  # text cuts leave uneven chunks
    assert even([torch.bincount(row[row >= 0]).tolist() for row in fixed.seg]) == len(fixed.seg)


@pytest.mark.parametrize("task", ["kv_retrieval", "passkey", "niah_multikey"])
def test_rows_with_the_instruction_apart_are_laid_out_as_the_engine_lays_out_a_prompt(task):
    """--instruction-apart: the task's instruction is chunk 0 alone, and the context is cut from its own start, as
    the engine keeps an instruction whole and chunks the context after it (chunks of kv_retrieval's JSON then hold
    whole pairs at equal positions); pointers, needle chunk and keys follow."""
    from pdllm.method import MethodConfig, chunk_context
    from pdllm.models.tokenizer import build_byte_tokenizer
    from pdllm.tasks import TASKS
    from pdllm.training.data import byte_counter

    tok = build_byte_tokenizer()
    stage = curriculum("recall_notes", 1.0, True)[1]
    assert all(s.instruction_apart for s in curriculum("recall_notes", None, True))
    assert not any(s.instruction_apart for s in curriculum("recall_notes"))
    instruction = TASKS[task].make(1024, 1, byte_counter, None, split="heldout").instruction.encode()
    assert instruction
    for seed in range(6):
        e = build_example(random.Random(seed), 1400, True, {task: 1.0}, (256,), keys=(3, 3), queries=2,
                          asking=stage.asking, text_chunks=1.0, instruction_apart=True)  # fmt: skip
        chunks = [[t for t, s in zip(e.ids, e.seg, strict=True) if s == c][1:] for c in range(max(e.seg) + 1)]
        assert bytes(chunks[0]) == instruction
        context = [t for c in chunks[1:] for t in c]
        assert chunks[1:] == chunk_context(tok, context, MethodConfig(chunk_size=256))
        assert e.needle_seg >= 1 and all(e.ids[a] == e.ids[p] for a, p in zip(e.pointer_at, e.pointer, strict=True))
        gold = bytes(e.ids[e.answer_start : e.answer_start + e.core_len - 1]).decode().strip()
        assert gold in bytes(chunks[e.needle_seg]).decode()
        assert all(e.seg[lo] == e.seg[hi - 1] for lo, hi in e.key_span)
        joined = build_example(random.Random(seed), 1400, True, {task: 1.0}, (256,), keys=(3, 3), queries=2,
                               asking=stage.asking, text_chunks=1.0)  # fmt: skip
        head = bytes([t for t, s in zip(joined.ids, joined.seg, strict=True) if s == 0][1:])
        assert head.startswith(instruction)  # without it the instruction heads chunk 0 ...
        assert task != "kv_retrieval" or len(head) > len(instruction)  # ... and kv's 91 bytes never end a cut of 256
    if task == "kv_retrieval":  # whole 80-byte pairs, so every chunk but the last holds them at the same positions
        assert len({len(c) for c in chunks[1:-1]}) == 1 and len(chunks[1]) % 80 == 0


def test_the_probe_lays_its_rows_out_as_its_stage_does():
    """A run with --instruction-apart probes rows laid out as it trains them: kv_retrieval's chunked rows open with
    the instruction alone; without it their first chunk runs on into the JSON."""

    def first_chunks(stage) -> list[str]:  # chunk 0 of each chunked kv_retrieval row of the probe
        out = []
        for batch, chunked, tasks in probe_batches(stage, 2048, 16):
            for ids, seg, flag, task in zip(batch.ids, batch.seg, chunked, tasks, strict=True):
                if flag and task == "kv_retrieval":
                    out.append(bytes(ids[seg == 0][1:].tolist()).decode())
        return out

    apart, joined = first_chunks(curriculum("recall_notes", 1.0, True)[1]), first_chunks(curriculum("recall_notes")[1])
    assert apart and joined  # (the text cuts draw from the rng, so the two probes hold other rows)
    assert all(c.endswith("JSON data:\n") for c in apart)
    assert not any(c.endswith("JSON data:\n") for c in joined)


def test_text_chunked_rows_are_cut_as_the_engine_cuts_and_point_at_what_they_copy():
    """recall_text rows: chunks end where `chunking: text` ends them, and every index (pointers, needle chunk, keys)
    follows the uneven chunks."""
    from pdllm.method import MethodConfig, chunk_context
    from pdllm.models.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    stage = curriculum("recall_text")[1]
    assert stage.name == "recall" and stage.text_chunks == 0.8
    assert all(s.text_chunks == 0.8 for s in curriculum("recall_text"))
    assert all(s.text_chunks == 0 for s in curriculum("recall_wordings"))
    rng, uneven = random.Random(3), 0
    for _ in range(12):
        e = build_example(rng, 1200, True, stage.tasks, (128,), keys=(3, 3), queries=3, asking=stage.asking,
                          wording=stage.wording, text_chunks=1.0)  # fmt: skip
        chunks = [[t for t, s in zip(e.ids, e.seg, strict=True) if s == c][1:] for c in range(max(e.seg) + 1)]
        context = [t for c in chunks for t in c]
        assert chunks == chunk_context(tok, context, MethodConfig(chunk_size=128))
        uneven += len({len(c) for c in chunks[:-1]}) > 1
        assert e.pointer and all(e.ids[a] == e.ids[p] for a, p in zip(e.pointer_at, e.pointer, strict=True))
        gold = bytes(e.ids[e.answer_start : e.answer_start + e.core_len - 1]).decode().strip()
        assert gold in bytes(chunks[e.needle_seg]).decode()  # the whole answer in the recorded chunk
        assert all(e.seg[lo] == e.seg[hi - 1] for lo, hi in e.key_span)  # a key never spans two chunks
    assert uneven >= 10


def test_the_layout_probe_reads_the_same_rows_in_every_layout(capsys):
    """benchmarks/layout_probe.py: one held-out draw laid out four ways (instruction joined or apart, fixed or text
    cuts), the same answers in each; apart rows open with the instruction alone; a table row per model."""
    from benchmark_scripts import load_benchmark

    from pdllm.assets import default_model_dir

    probe = load_benchmark("layout_probe")
    rows = probe.layout_rows("kv_retrieval", 256, 3, 900, 0)
    assert list(rows) == ["joined fixed", "joined text", "apart fixed", "apart text"]
    answers = {k: [tuple(e.ids[e.answer_start : e.answer_start + e.core_len]) for e in v] for k, v in rows.items()}
    assert len({tuple(a) for a in answers.values()}) == 1
    firsts = {k: [bytes(e.ids[1 : e.seg.index(1)]) for e in v] for k, v in rows.items()}
    assert all(f.endswith(b"JSON data:\n") for f in firsts["apart text"] + firsts["apart fixed"])
    assert not any(f.endswith(b"JSON data:\n") for f in firsts["joined text"] + firsts["joined fixed"])
    assert probe.main([str(default_model_dir()), "--rows", "2", "--length", "700"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-1].startswith(f"| {default_model_dir()} |") and len(table[-1].split("|")) == 7
