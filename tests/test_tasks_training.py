"""Training: examples in both layouts, the masked-diffusion objective, and a resumable CPU smoke run."""

from __future__ import annotations

import random

import torch

from pdllm.training.data import BOS_ID, EOS_ID, QUERY_SEGMENT, attention_mask, build_example, byte_ids, collate
from pdllm.training.objective import mask_tokens


def test_chunked_layout_has_bos_anchors_local_positions_and_isolated_chunks():
    e = build_example(random.Random(1), 1500, chunked=True, train_length=2048)
    b = collate([e])
    starts = [i for i, s in enumerate(e.seg) if s >= 0 and (i == 0 or e.seg[i - 1] != s)]
    assert len(starts) >= 2 and all(e.ids[i] == BOS_ID and e.pos[i] == 0 for i in starts)
    m = attention_mask(b.seg)[0, 0]
    a, c = starts[0], starts[1]
    assert not m[a, c] and m[c, c + 1]  # a chunk never sees another chunk
    q = e.seg.index(QUERY_SEGMENT)
    assert m[q, a] and m[q, c] and not m[a, q]  # the question sees every chunk; chunks do not see the question
    assert e.ids[-1] == EOS_ID and e.answer_start > q


def test_dense_layout_and_answer_masking():
    e = build_example(random.Random(2), 900, chunked=False, train_length=2048, full=True)
    assert e.pos == list(range(len(e.ids)))
    b = collate([e, build_example(random.Random(3), 700, chunked=False, train_length=2048)])
    m = attention_mask(b.seg, b.full)
    assert (
        m[0, 0, 1, len(e.ids) - 1] and not m[1, 0, 1, b.answer[1].nonzero()[0, 0]]
    )  # only "full" rows see the question
    b.pretrain = torch.tensor([False, True])
    noisy, masked, _, eligible = mask_tokens(b, 258, 1e-3, torch.Generator().manual_seed(0))
    assert masked[0].any() and not (masked[0] & ~b.answer[0]).any()  # SFT row: answer only
    assert eligible[1].sum() > b.answer[1].sum()  # pre-training row: the whole sequence is eligible
    assert (noisy[masked] == 258).all()


def test_byte_ids_are_the_tokenizer_ids():
    from pdllm.models.tokenizer import build_byte_tokenizer

    text = "The pass key is 71432. Remember it.\n"
    assert byte_ids(text) == build_byte_tokenizer()(text, add_special_tokens=False).input_ids


def test_smoke_train_resume_export(tmp_path):
    from pdllm.models.loader import load_model
    from pdllm.training.train import main

    assert main(["--smoke", "--out", str(tmp_path / "a"), "--max-steps", "2", "--workers", "0"]) == 0
    assert main(["--smoke", "--out", str(tmp_path / "b"), "--resume", str(tmp_path / "a"), "--max-steps", "3"]) == 0
    import json

    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 3
    assert main(["--export", str(tmp_path / "b"), "--out", str(tmp_path), "--bundle", str(tmp_path / "m")]) == 0
    lm = load_model(tmp_path / "m")
    assert lm.spec.family == "llada" and lm.spec.num_layers == 2
