"""FlexAttention for training: the same loss as SDPA under the chunk mask, with the masked blocks skipped (on CPU,
PyTorch's reference implementation of it; the compiled GPU kernel and its gradients are checked and timed by
benchmarks/bench_training_step.py --attention flex)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from pdllm.models.tiny import random_model, tiny_spec
from pdllm.training.data import PAD_SEGMENT, attention_mask, build_example, collate, curriculum, make_batch
from pdllm.training.flex import FlexMaskedAttention, allowed, block_mask
from pdllm.training.objective import MaskedAttention, diffusion_loss

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # CPU: the reference
LOSSES = {"rank_weight": 0.2, "pointer_weight": 0.5, "key_weight": 0.5, "match_weight": 0.5}


@pytest.mark.parametrize("chunked", [True, False])
def test_flex_attention_computes_the_loss_of_sdpa_under_the_batch_mask(chunked):
    """Forward only: FlexAttention has no CPU backward. The gradients are compared on the GPU, by
    benchmarks/bench_training_step.py --attention flex, before it times the step."""
    stage = curriculum("reading")[1]  # several questions per row: segments -1, -3, ... and padding
    batch = make_batch(random.Random(4), stage, 2048, 900, (1.0 if chunked else 0.0, 0.0))
    model = random_model(tiny_spec("llada", hidden=32, layers=4, heads=2, inner=64), seed=1)
    runs = []
    for attention_class in (MaskedAttention, FlexMaskedAttention):
        with torch.no_grad():
            runs.append(diffusion_loss(model, batch, 0.1, torch.Generator().manual_seed(0),
                                       attention_class=attention_class, **LOSSES))  # fmt: skip
    (loss, metrics), (flex_loss, flex_metrics) = runs
    assert {"point", "key", "match"} <= set(metrics) and set(flex_metrics) == set(metrics)
    for name, value in metrics.items():
        torch.testing.assert_close(flex_metrics[name], value, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(flex_loss, loss, rtol=1e-4, atol=1e-5)


def test_the_block_mask_of_chunked_rows_skips_the_blocks_between_chunks():
    rng = random.Random(2)
    rows = [build_example(rng, 2000, True, {"passkey": 1.0}, chunk_sizes=(128,)) for _ in range(2)]
    batch = collate(rows)  # 2K-token rows in 16 chunks of 128
    mask = attention_mask(batch.seg, batch.full)
    blocks = block_mask(batch.seg, batch.full)
    assert torch.equal(blocks.to_dense().bool().flatten(), _blocks_touched(mask).flatten())
    assert blocks.sparsity() > 70  # percent of the blocks SDPA computes that flex skips


def test_a_padding_query_block_computes_one_block_not_its_row():
    """Padding queries see themselves alone (data.attention_mask), so a query block of padding costs one block."""
    rng = random.Random(3)
    rows = [build_example(rng, n, True, {"passkey": 1.0}, chunk_sizes=(128,)) for n in (2000, 1200)]
    batch = collate(rows)  # the short row is padded by more than 600 tokens: several query blocks of padding
    blocks = block_mask(batch.seg, batch.full)
    per_query_block = blocks.kv_num_blocks + (blocks.full_kv_num_blocks if blocks.full_kv_num_blocks is not None else 0)
    first_padding_block = -(-len(rows[1].ids) // 128)
    assert first_padding_block < per_query_block.shape[-1] - 1
    assert per_query_block[1, 0, first_padding_block:].tolist() == [1] * (
        per_query_block.shape[-1] - first_padding_block
    )
    assert per_query_block[1, 0, :first_padding_block].min() >= 1


def test_what_padding_queries_see_changes_no_loss_or_gradient():
    """The outputs at padding positions are never scored: with padding queries seeing every key (the rule before)
    the loss, its metrics and every gradient are those of the rule now (eager SDPA, CPU backward)."""
    stage = curriculum("reading")[1]
    batch = make_batch(random.Random(6), stage, 2048, 1500, (1.0, 0.0))
    padding = batch.seg == PAD_SEGMENT
    assert padding.any()

    class SeesAll(MaskedAttention):
        @classmethod
        def of_batch(cls, seg, full, capture=(), outputs=(), tokens=None):
            return cls(attention_mask(seg, full) | padding[:, None, :, None], capture, outputs, tokens)

    results = []
    for attention_class in (MaskedAttention, SeesAll):
        model = random_model(tiny_spec("llada", hidden=32, layers=4, heads=2, inner=64), seed=1)
        loss, metrics = diffusion_loss(model, batch, 0.1, torch.Generator().manual_seed(0),
                                       attention_class=attention_class, **LOSSES)  # fmt: skip
        loss.backward()
        results.append((loss, metrics, [p.grad for p in model.parameters()]))
    (loss, metrics, grads), (all_loss, all_metrics, all_grads) = results
    torch.testing.assert_close(all_loss, loss)
    for name, value in metrics.items():
        torch.testing.assert_close(all_metrics[name], value, msg=name)
    for grad, all_grad in zip(grads, all_grads, strict=True):
        torch.testing.assert_close(all_grad, grad)


@pytest.mark.parametrize("layout,seed", [("chunked", 5), ("prefix", 8), ("full", 7)])
def test_the_flex_rule_is_the_dense_mask_at_every_query_and_key(layout, seed):
    stage = curriculum("reading")[1]  # several questions per row, padding
    batch = make_batch(random.Random(seed), stage, 2048, 1500, (1.0 if layout == "chunked" else 0.0, 0.0))
    assert bool(batch.full.all()) == (layout == "full") and batch.seg.shape[0] > 1
    b, t = batch.seg.shape
    rule = allowed(batch.seg, batch.full)
    grid = torch.meshgrid(torch.arange(b), torch.arange(t), torch.arange(t), indexing="ij")
    dense = rule(grid[0], None, grid[1], grid[2])
    assert torch.equal(dense[:, None], attention_mask(batch.seg, batch.full))


def _blocks_touched(mask: torch.Tensor, size: int = 128) -> torch.Tensor:
    """[B, 1, Tq/size, Tk/size]: the blocks where the mask lets any query see any key."""
    b, _, t, _ = mask.shape
    n = -(-t // size)
    padded = torch.zeros(b, 1, n * size, n * size, dtype=torch.bool)
    padded[..., :t, :t] = mask
    return padded.view(b, 1, n, size, n, size).any(-1).any(-2)


def test_training_with_flex_attention_without_a_gpu_is_one_line_error(monkeypatch, capsys, tmp_path):
    from pdllm.training.train import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        main(["--smoke", "--out", str(tmp_path), "--attention", "flex"])
    assert exit_.value.code == 2 and "--attention flex needs a GPU" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_padding_blocks_counts_fewer_blocks_now_than_when_padding_saw_every_key():
    """benchmarks/padding_blocks.py: its rule before is the rule now plus every key for a padding query."""
    from benchmark_scripts import load_benchmark

    bench = load_benchmark("padding_blocks")
    batch = make_batch(random.Random(9), curriculum("reading")[1], 2048, 1500, (1.0, 0.0))
    b, t = batch.seg.shape
    grid = torch.meshgrid(torch.arange(b), torch.arange(t), torch.arange(t), indexing="ij")
    before = bench.padding_sees_all(batch.seg, batch.full)(grid[0], None, grid[1], grid[2])
    padding = batch.seg == PAD_SEGMENT
    assert torch.equal(before, attention_mask(batch.seg, batch.full)[:, 0] | padding[:, :, None])
    row = bench.count("recall_facts", "recall", 8192, 2048, 2, 1234)
    assert 0 < row["padding_share"] < 1 and 0 < row["blocks_now"] < row["blocks_before"]


def test_flex_options_are_a_json_object_of_the_names_flex_attention_knows():
    """FlexAttention ignores a misspelt option silently, so train.py --flex-options checks each name; the mask's tile
    is ours, and the kernel's block sizes must divide it."""
    from pdllm.training.flex import FlexTuning, flex_tuning

    assert flex_tuning('{"bwd_BLOCK_M1": 32, "fwd_BLOCK_N": 64, "ROWS_GUARANTEED_SAFE": true}') == FlexTuning(
        128, {"bwd_BLOCK_M1": 32, "fwd_BLOCK_N": 64, "ROWS_GUARANTEED_SAFE": True}
    )
    assert flex_tuning("{}") == FlexTuning()
    tuned = flex_tuning('{"MASK_BLOCK_SIZE": 64, "BLOCK_M": 64, "bwd_BLOCK_M1": 16}')
    assert tuned == FlexTuning(64, {"BLOCK_M": 64, "bwd_BLOCK_M1": 16})
    assert flex_tuning(tuned.as_json()) == tuned and FlexTuning().as_json() == "{}"
    for text, why in [('{"BLOK_M": 64}', "unknown FlexAttention kernel option 'BLOK_M'"),
                      ("[64]", "a JSON object"), ("{BLOCK_M: 64}", "not JSON"),
                      ('{"BLOCK_M": [64]}', "option 'BLOCK_M': a number"),
                      ('{"MASK_BLOCK_SIZE": 48}', "MASK_BLOCK_SIZE 48: a power of two"),
                      ('{"MASK_BLOCK_SIZE": 8}', "MASK_BLOCK_SIZE 8: a power of two"),
                      ('{"MASK_BLOCK_SIZE": true}', "MASK_BLOCK_SIZE True: a power of two"),
                      ('{"MASK_BLOCK_SIZE": 64, "fwd_BLOCK_N": 128}', "'fwd_BLOCK_N' 128 does not divide"),
                      ('{"bwd_BLOCK_N2": 0}', "'bwd_BLOCK_N2' 0 does not divide")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            flex_tuning(text)


def test_a_smaller_mask_tile_gives_the_same_loss_and_skips_more():
    """FlexTuning.mask_block: the block mask in tiles of 64 tokens holds the same mask, skips more of a chunked
    row's area than tiles of 128, and the loss is SDPA's."""
    rng = random.Random(2)
    rows = [build_example(rng, 2000, True, {"passkey": 1.0}, chunk_sizes=(96,)) for _ in range(2)]
    batch = collate(rows)  # chunks of 96 (+ BOS): borders inside tiles of 64 and of 128
    mask = attention_mask(batch.seg, batch.full)
    coarse, fine = block_mask(batch.seg, batch.full), block_mask(batch.seg, batch.full, 64)
    assert fine.BLOCK_SIZE == (64, 64)
    assert torch.equal(fine.to_dense().bool().flatten(), _blocks_touched(mask, 64).flatten())
    assert fine.sparsity() > coarse.sparsity()
    tiled = FlexMaskedAttention.with_mask_block(64)
    assert tiled is FlexMaskedAttention.with_mask_block(64) and FlexMaskedAttention.with_mask_block(128) is (
        FlexMaskedAttention
    )
    assert tiled.of_batch(batch.seg, batch.full).blocks.BLOCK_SIZE == (64, 64)
    model = random_model(tiny_spec("llada", hidden=32, layers=4, heads=2, inner=64), seed=1)
    stage = curriculum("reading")[1]
    batch = make_batch(random.Random(4), stage, 2048, 900, (1.0, 0.0))
    with torch.no_grad():
        runs = [diffusion_loss(model, batch, 0.1, torch.Generator().manual_seed(0), attention_class=a, **LOSSES)[0]
                for a in (MaskedAttention, tiled)]  # fmt: skip
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-5)


def test_block_attention_hands_its_options_to_flex_attention(monkeypatch):
    """The options reach FlexAttention's call (on the CPU they change nothing; on a GPU they pick the kernel)."""
    import pdllm.training.flex as flex

    seen, real = [], flex.flex_attention
    monkeypatch.setattr(flex, "flex_attention", lambda *a, **kw: seen.append(kw["kernel_options"]) or real(*a, **kw))
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    seg = torch.zeros(1, 64, dtype=torch.long)
    blocks = block_mask(seg, torch.zeros(1, dtype=torch.bool))
    plain = flex.block_attention(q, k, v, blocks)
    tuned = flex.block_attention(q, k, v, blocks, {"BLOCK_M": 32})
    assert seen == [None, {"BLOCK_M": 32}]
    torch.testing.assert_close(tuned, plain)


def test_flex_options_need_the_compiled_stacks_flex_attention(capsys):
    from pdllm.training.train import parse_args

    cases = [
        (["--flex-options", '{"BLOK_M": 64}'], "unknown FlexAttention kernel option"),
        (["--flex-options", '{"BLOCK_M": 64}', "--compile", "stack"], "give it with --attention flex"),
    ]
    for flags, why in cases:
        with pytest.raises(SystemExit):
            parse_args(["--smoke", "--out", "x", *flags])
        assert why in capsys.readouterr().err


def test_the_step_bench_times_each_flex_stack_variant_once_per_option_set():
    from benchmark_scripts import load_benchmark

    from pdllm.training.flex import FlexTuning

    bench = load_benchmark("bench_training_step")
    sets = '{};{"bwd_BLOCK_M1": 32}'
    runs, stages, picked = bench.plan(["sdpa", "flex+stack+losses", "sdpa+stack"], sets, "recall_facts", "recall")
    assert runs == [("flex+stack+losses", FlexTuning()), ("flex+stack+losses", FlexTuning(128, {"bwd_BLOCK_M1": 32})),
                    ("sdpa+stack", FlexTuning())]  # fmt: skip
    assert [stages[i].name for i in picked] == ["recall"]
    _, stages, picked = bench.plan(["flex+stack"], None, "recall_facts", None)  # default: the second and last stage
    assert picked == [1, len(stages) - 1]
    assert getattr(torch._dynamo.config, bench.RECOMPILE_LIMIT) >= 8 * 3  # room for every compile of the first plan
    for stages_arg, options, why in [("recal", None, "--stages: recal not in"),
                                     ("recall", '{"BLOK": 1}', "--flex-options: unknown")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            bench.plan(["flex+stack"], options, "recall_facts", stages_arg)


def test_the_step_bench_reports_a_variant_that_fails_and_times_the_next(monkeypatch, tmp_path):
    """A kernel option set the kernel cannot take fails at compile time on the GPU (e.g. no backward config for a
    tile of 32); the bench names it in a row and goes on to the next variant (CPU: the variants run eager)."""
    from benchmark_scripts import load_benchmark

    bench = load_benchmark("bench_training_step")
    real_check, calls = bench.variant_check, []

    def check(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 1:
            raise RuntimeError("NoValidChoicesError: No choices to select")
        return real_check(*args, **kwargs)

    monkeypatch.setattr(bench, "variant_check", check)
    monkeypatch.setattr(bench, "compile_blocks", lambda model: None)  # the variants' steps run eager on the CPU
    monkeypatch.setattr(bench, "compile_stack", lambda model, **kwargs: None)
    out = tmp_path / "rows.json"
    flags = "--device cpu --shape smoke --tokens 2048 --steps 2 --data-batches 1 --workers 0 --loader-seconds 0.1"
    assert bench.main([*flags.split(), "--mix", "recall_facts", "--stages", "recall",
                       "--variants", "sdpa+compile,sdpa+stack", "--json", str(out)]) == 0  # fmt: skip
    rows = {r["what"]: r for r in json.loads(out.read_text())["rows"]}
    assert calls == ["sdpa+compile", "sdpa+stack"]
    assert "NoValidChoicesError" in rows["sdpa+compile failed recall"]["error"]
    assert rows["step recall, shapes seen, sdpa/sdpa+stack"]["new_ms"] > 0


def test_the_loop_bench_times_each_condition_on_one_model(tmp_path, capsys):
    """benchmarks/bench_training_loop.py runs train.py's loop (over its loader and over pre-made batches) and the
    step bench's step on the same batches, one row per condition (CPU: the smoke model, eager)."""
    from benchmark_scripts import load_benchmark

    bench = load_benchmark("bench_training_loop")
    out = tmp_path / "rows.json"
    flags = ["--smoke", "--steps", "2", "--workers", "1", "--conditions", "premade,bench,loop,packed,repeated"]
    assert bench.main([*flags, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["what"] for r in rows] == ["compile", "premade", "bench", "loop", "packed", "repeated"]
    assert all(r["ms_per_step"] > 0 for r in rows)
    for bad, why in [(["--conditions", "loop,fast"], "unknown fast"), (["--steps", "1", "--smoke"], "at least 2")]:
        with pytest.raises(SystemExit):
            bench.main(bad)
        assert why in capsys.readouterr().err
