"""The decode engine: a batched run answers every job exactly as the job run alone, whatever it is batched with.

Jobs differ in question length, selected chunks, token sparsity, unmasking rule (LLaDA's fixed count, Fast-dLLM's
threshold), sampling (greedy, temperature, random remasking) and kept question KV; they arrive staggered; one is
cancelled and one passes its deadline mid-batch. The scheduler is driven step by step here (no engine thread), so
the interleaving is exact and the test waits on nothing. Also: the kept-question-KV path against an independent
dense reference, and the pool's pinning, eviction and byte bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from pdllm.decode_node.engine import DecodeEngine, EngineConfig, MissingChunks
from pdllm.decode_node.job import JobCancelled, JobExpired
from pdllm.decode_node.kv_pool import RESERVED_PAGES, KVPool, PoolFull, page_bytes

from pdllm.method import MethodConfig, encode_chunks, split_chunks
from pdllm.models.attention import DenseCachedAttention
from pdllm.models.loader import LoadedModel
from pdllm.models.tiny import random_model, tiny_spec
from pdllm.sampler import SamplerConfig, denoise

LLADA = SamplerConfig(gen_length=16, block_length=8, steps=8)


def tiny_lm(family: str = "llada", kv_heads: int | None = None, seed: int = 0) -> LoadedModel:
    spec = tiny_spec(family, layers=2, kv_heads=kv_heads)
    return LoadedModel(random_model(spec, seed), None, spec, Path("."), f"tiny-{family}-{seed}")


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def new_engine(lm, pool_bytes: int = 8 << 20, **kw) -> DecodeEngine:
    cfg = EngineConfig(max_batch=8, pool_bytes=pool_bytes, page_rows=8, max_span=96, max_block=16, max_selected=512)
    return DecodeEngine(lm, EngineConfig(**{**cfg.__dict__, **kw}))


def paged_pool(lm, pages: int) -> KVPool:
    """A CPU pool of `pages` usable pages of 8 rows (a 16-token chunk with its BOS takes 3)."""
    return KVPool(lm.spec, "cpu", torch.float32, (RESERVED_PAGES + pages) * page_bytes(lm.spec, torch.float32, 8), 8)


@dataclass
class Spec:
    question: list[int]
    chunks: list[int]  # indices into the document's chunks
    method: MethodConfig
    sampler: SamplerConfig
    seed: int = 0


def document(lm, chunk_size: int = 16, n: int = 5):
    cfg = MethodConfig(chunk_size=chunk_size)
    kvs = encode_chunks(lm, split_chunks(ids(chunk_size * n - 3, 11), chunk_size), cfg, lm.model_id)
    return kvs, {c.chunk_id: c for c in kvs}


def prepare(engine, kvs, by_id, spec: Spec, fetched: list | None = None, **kw):
    cids = [kvs[i].chunk_id for i in spec.chunks]

    def fetch(need):
        if fetched is not None:
            fetched.extend(need)
        return {c: by_id[c] for c in need}

    return engine.prepare(spec.question, cids, fetch, spec.method, spec.sampler, spec.seed, **kw)


def drive(engine, handles, max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if all(h.done.is_set() for h in handles):
            return
        engine.scheduler.step()
    raise AssertionError("jobs did not finish")


def alone(lm, kvs, by_id, spec: Spec) -> list[int]:
    engine = new_engine(lm)
    handle = engine.scheduler.submit(prepare(engine, kvs, by_id, spec))
    drive(engine, [handle])
    return handle.wait().tokens


def mixed_specs() -> list[Spec]:
    m = MethodConfig(chunk_size=16)
    half = MethodConfig(chunk_size=16, keep_ratio=0.5)
    kept = MethodConfig(chunk_size=16, keep_question_kv=True)
    thr = SamplerConfig(gen_length=16, block_length=8, steps=16, threshold=0.006)
    return [
        Spec(ids(5, 1), [0, 2], m, LLADA),
        Spec(ids(13, 2), [1, 3, 4], half, LLADA),
        Spec(ids(9, 3), [4], m, thr),
        Spec(ids(7, 4), [0, 1, 2, 3], kept, LLADA),
        Spec(ids(11, 5), [2], m, SamplerConfig(gen_length=16, block_length=8, steps=8, temperature=0.8), seed=7),
        Spec(ids(6, 6), [3, 0], kept, SamplerConfig(gen_length=8, block_length=8, steps=8, remasking="random"), 3),
        Spec(ids(8, 7), [1, 2], half, thr),
    ]


@pytest.mark.parametrize("family,kv_heads", [("llada", None), ("dream", 2)])
def test_batched_answers_equal_alone_with_staggered_admission_cancel_and_deadline(family, kv_heads):
    lm = tiny_lm(family, kv_heads)
    kvs, by_id = document(lm)
    specs = mixed_specs()
    expected = [alone(lm, kvs, by_id, s) for s in specs]

    now = [0.0]
    engine = new_engine(lm)
    engine.scheduler.clock = lambda: now[0]
    steps_seen: dict[int, list[int]] = {}

    def recorder(i):
        return lambda step, gen: steps_seen.setdefault(i, []).append(step)

    first = [
        engine.scheduler.submit(prepare(engine, kvs, by_id, s, on_step=recorder(i))) for i, s in enumerate(specs[:4])
    ]
    doomed = engine.scheduler.submit(prepare(engine, kvs, by_id, specs[0]))
    expiring = engine.scheduler.submit(prepare(engine, kvs, by_id, specs[1], deadline=5.0))
    for _ in range(3):
        engine.scheduler.step()
    assert engine.scheduler.max_batch_seen == 6
    doomed.cancel()
    now[0] = 10.0  # past the deadline of `expiring`
    late = [
        engine.scheduler.submit(prepare(engine, kvs, by_id, s, on_step=recorder(4 + i)))
        for i, s in enumerate(specs[4:])
    ]
    drive(engine, first + late + [doomed, expiring])
    with pytest.raises(JobCancelled):
        doomed.wait()
    with pytest.raises(JobExpired):
        expiring.wait()
    got = [h.wait().tokens for h in first + late]
    assert got == expected
    assert all(steps_seen[i] == list(range(1, len(steps_seen[i]) + 1)) for i in steps_seen)
    # they shared steps: fewer batched steps than the jobs' steps added up
    assert engine.scheduler.total_steps < sum(h.wait().steps for h in first + late)
    assert engine.pool.snapshot()["pinned_chunks"] == 0  # every job, cancelled and expired too, unpinned its chunks
    # the kept questions' private pages went back: only resident chunks hold pages
    assert engine.pool.used_pages() == sum(len(e.pages) for e in engine.pool.chunks.values())


class KeptQuestionReference:
    """Dense reference of keep_question_kv: step 1 runs question + generated tokens over the selected chunks' KV
    and keeps the question's KV; later steps run the generated tokens (and the question's last token for shifted
    logits) over the chunks' KV plus the kept question KV."""

    def __init__(self, lm, chunks, question: list[int]) -> None:
        self.model, self.question = lm.model, torch.tensor([question])
        self.shift = 1 if lm.spec.shift_logits else 0
        self.start = max(c.length for c in chunks)
        self.kv = [
            (torch.cat([c.k[layer] for c in chunks], 1)[None], torch.cat([c.v[layer] for c in chunks], 1)[None])
            for layer in range(lm.spec.num_layers)
        ]
        self.kept = None

    @torch.no_grad()
    def logits(self, gen):
        tq = self.question.shape[1]
        if self.kept is None:
            x, first = torch.cat([self.question, gen], 1), self.start
        else:
            x, first = torch.cat([self.question[:, tq - self.shift :], gen], 1), self.start + tq - self.shift
        pos = torch.arange(first, first + x.shape[1])[None]
        kv = (
            self.kv
            if self.kept is None
            else [
                (torch.cat([k, qk], 2), torch.cat([v, qv], 2))
                for (k, v), (qk, qv) in zip(self.kv, self.kept, strict=True)
            ]
        )
        live = x.shape[1] - gen.shape[1]
        out = self.model(
            x,
            position_ids=pos,
            context=DenseCachedAttention(kv),
            return_kv=self.kept is None,
            logits_from=live - self.shift,
        )
        if self.kept is None:
            n = tq - self.shift
            self.kept = [(k[:, :, :n], v[:, :, :n]) for k, v in out.kv]
        return out.logits[:, : gen.shape[1]]


@pytest.mark.parametrize("family,kv_heads", [("llada", None), ("dream", 2)])
def test_kept_question_kv_equals_dense_reference_and_shrinks_the_span(family, kv_heads):
    lm = tiny_lm(family, kv_heads, seed=3)
    kvs, by_id = document(lm)
    spec = Spec(ids(10, 9), [0, 2, 3], MethodConfig(chunk_size=16, keep_question_kv=True), LLADA)
    engine = new_engine(lm)
    handle = engine.scheduler.submit(prepare(engine, kvs, by_id, spec))
    engine.scheduler.step()
    state = engine.scheduler.running[0]
    shift = 1 if lm.spec.shift_logits else 0
    assert state.q_live == shift and int(engine.buf.self_len[0]) == shift + 16  # only the block (+1) runs now
    assert int(engine.buf.sel_len[0]) == sum(kvs[i].length for i in spec.chunks) + 10 - shift
    drive(engine, [handle])
    ref = KeptQuestionReference(lm, [kvs[i] for i in spec.chunks], spec.question)
    expected = denoise(ref, 1, LLADA, lm.spec.mask_token_id, lm.spec.eos_token_ids).tokens[0].tolist()
    assert handle.wait().tokens == expected
    plain = Spec(spec.question, spec.chunks, MethodConfig(chunk_size=16), LLADA)
    assert alone(lm, kvs, by_id, plain) != expected  # the kept KV is stale after step 1: the option is visible


def test_a_job_with_no_room_for_its_kept_question_kv_and_nothing_running_fails_and_unblocks_the_queue():
    """Two jobs pin the whole pool; the first also wants pages for its kept question KV. Nothing runs that could
    free any, so it fails at once, naming why, and the job behind it runs (it waited at the head before)."""
    lm = tiny_lm("llada")
    kvs, by_id = document(lm)  # chunks of 17 rows: 3 pages each
    engine = new_engine(lm, pool_bytes=(RESERVED_PAGES + 6) * page_bytes(lm.spec, torch.float32, 8))
    kept = Spec(ids(10, 9), [0], MethodConfig(chunk_size=16, keep_question_kv=True), LLADA)
    plain = Spec(ids(10, 8), [1], MethodConfig(chunk_size=16), LLADA)
    first = engine.scheduler.submit(prepare(engine, kvs, by_id, kept))
    second = engine.scheduler.submit(prepare(engine, kvs, by_id, plain))
    drive(engine, [first, second])
    with pytest.raises(PoolFull, match="no room for its kept question KV"):
        first.wait()
    assert second.wait().tokens == alone(lm, kvs, by_id, plain)
    assert engine.pool.snapshot()["pinned_chunks"] == 0


def test_evicted_chunk_is_fetched_again_and_answers_the_same():
    lm = tiny_lm("llada")
    kvs, by_id = document(lm, n=6)
    pages_per_chunk = -(-kvs[0].length // 8)
    pool_bytes = (2 + 3 * pages_per_chunk) * page_bytes(lm.spec, torch.float32, 8)  # room for three chunks
    engine = new_engine(lm, pool_bytes=pool_bytes)
    spec = Spec(ids(6, 1), [0, 1], MethodConfig(chunk_size=16), LLADA)
    fetched: list[str] = []
    for s in (spec, Spec(ids(6, 2), [2, 3, 4], MethodConfig(chunk_size=16), LLADA), spec):
        handle = engine.scheduler.submit(prepare(engine, kvs, by_id, s, fetched=fetched))
        drive(engine, [handle])
        if s is spec:
            assert handle.wait().tokens == alone(lm, kvs, by_id, spec)
    assert fetched.count(kvs[0].chunk_id) == 2 and engine.pool.evictions >= 2
    # a chunk the fetch cannot bring: named, nothing left pinned
    with pytest.raises(MissingChunks) as err:
        engine.prepare(spec.question, [kvs[5].chunk_id, kvs[1].chunk_id], lambda need: {}, spec.method, LLADA)
    assert err.value.cids == [kvs[5].chunk_id] and engine.pool.snapshot()["pinned_chunks"] == 0


def test_pool_never_evicts_a_pinned_chunk_and_stays_within_its_bytes():
    lm = tiny_lm("dream", kv_heads=2)
    kvs, _ = document(lm, n=4)
    per_page = page_bytes(lm.spec, torch.float32, 8)
    budget = (2 + 2 * 3) * per_page + per_page // 2  # two chunks of 17 rows (3 pages each) and change
    pool = KVPool(lm.spec, "cpu", torch.float32, budget, page_rows=8)
    assert pool.capacity_bytes <= budget
    pool.insert_pinned(kvs[:2])
    with pytest.raises(PoolFull):
        pool.insert_pinned([kvs[2]])
    for c in kvs[:2]:  # still there, intact
        assert torch.equal(pool.chunk_keys(c.chunk_id, 1), c.k[1])
    pool.unpin([kvs[0].chunk_id])
    pool.insert_pinned([kvs[2]])  # evicts the unpinned one, never the pinned one
    assert kvs[0].chunk_id not in pool and kvs[1].chunk_id in pool and pool.evictions == 1
    assert torch.equal(pool.chunk_keys(kvs[2].chunk_id, 0), kvs[2].k[0])
    assert torch.equal(pool.k[:, 0], torch.zeros_like(pool.k[:, 0]))  # the null page reads as zeros
    with pytest.raises(RuntimeError):
        pool.unpin([kvs[0].chunk_id])


def test_a_full_pool_makes_a_submitter_wait_then_fail_with_the_cause():
    lm = tiny_lm("llada")
    kvs, by_id = document(lm, n=3)
    pool = paged_pool(lm, 3)
    pool.insert_pinned([kvs[0]])
    ticks = iter(range(100))
    with pytest.raises(PoolFull, match="every resident chunk is in use"):
        pool.acquire([kvs[1].chunk_id], lambda need: {c: by_id[c] for c in need}, 3.0, clock=lambda: next(ticks))
    assert pool.snapshot()["pinned_chunks"] == 1


def test_jobs_waiting_for_room_hold_nothing_so_two_cannot_wait_on_each_other():
    """Two jobs each read one resident chunk and bring two more; the pool has room for one job's chunks once the
    other's resident chunk is evicted. Each pins its resident chunk before either inserts, so, holding it while
    waiting, each would wait for the other to its deadline. A waiter holds nothing: one job gets in, then the other."""
    import threading

    lm = tiny_lm("llada")
    kvs, by_id = document(lm, n=7)  # chunks of 17 rows: 3 pages each
    pool = paged_pool(lm, 10)
    pool.insert_pinned(kvs[:2])
    pool.unpin([kvs[0].chunk_id, kvs[1].chunk_id])  # resident, unpinned: 6 pages used, 4 free
    jobs = {"a": [kvs[0], kvs[2], kvs[3]], "b": [kvs[1], kvs[4], kvs[5]]}
    both_pinned, out, first_fetch = threading.Barrier(2, timeout=30), {}, {"a": True, "b": True}

    def fetch(name: str, need: list[str]) -> dict:
        if first_fetch[name]:  # each job has pinned its resident chunk before either inserts
            first_fetch[name] = False
            both_pinned.wait()
        return {c: by_id[c] for c in need}

    def job(name: str) -> None:
        cids = [c.chunk_id for c in jobs[name]]
        try:
            out[name] = pool.acquire(cids, lambda need: fetch(name, need), timeout_s=20.0)
            for c in jobs[name]:
                assert torch.equal(pool.chunk_keys(c.chunk_id, 1), c.k[1])
            pool.unpin(cids)
        except Exception as exc:  # reported below
            out[name] = exc

    threads = [threading.Thread(target=job, args=(n,)) for n in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == {"a": [], "b": []}
    assert pool.snapshot()["pinned_chunks"] == 0 and pool.evictions >= 2


def test_a_newcomer_that_would_fit_does_not_pass_a_job_waiting_for_room():
    import threading

    lm = tiny_lm("llada")
    kvs, by_id = document(lm, n=7)  # chunks of 17 rows: 3 pages each
    pool = paged_pool(lm, 12)
    pool.insert_pinned(kvs[:3])  # another job reads 9 pages; 3 are free
    bring = lambda need: {c: by_id[c] for c in need}  # noqa: E731
    out = {}
    first = threading.Thread(target=lambda: out.update(a=pool.acquire([kvs[3].chunk_id, kvs[4].chunk_id], bring, 60)))
    first.start()  # needs 6 pages: waits in line
    with pool.cond:
        assert pool.cond.wait_for(lambda: len(pool._line) == 1, timeout=30)
    assert pool.snapshot()["jobs_waiting_for_room"] == 1
    ticks = iter(range(1000))
    with pytest.raises(PoolFull, match="1 job"):  # 3 pages would fit, but it queues behind the first
        pool.acquire([kvs[5].chunk_id], bring, 5, clock=lambda: next(ticks))
    assert kvs[5].chunk_id not in pool
    pool.unpin([c.chunk_id for c in kvs[:3]])
    first.join(30)
    assert out == {"a": []} and not pool._line
    assert all(pool.entry(c.chunk_id).pins == 1 for c in kvs[3:5])


def test_a_job_larger_than_the_pool_is_refused_at_once_naming_the_sizes():
    lm = tiny_lm("llada")
    kvs, by_id = document(lm, n=4)
    pool = paged_pool(lm, 8)
    pool.insert_pinned([kvs[0]])
    pool.unpin([kvs[0].chunk_id])
    ticks = iter(range(3))  # a wait would read the clock more often than this
    cids = [c.chunk_id for c in kvs[:3]]  # 9 pages, the pool has 8
    with pytest.raises(PoolFull, match="need 9 pages, the pool has 8"):
        pool.acquire(cids, lambda need: {c: by_id[c] for c in need}, 1e9, clock=lambda: next(ticks))
    assert pool.snapshot()["pinned_chunks"] == 0 and not pool._line


def test_engine_thread_serves_concurrent_generate_calls_in_shared_steps():
    from concurrent.futures import ThreadPoolExecutor

    from pdllm.engine import generate

    lm = tiny_lm("llada", seed=5)
    lm = LoadedModel(lm.model, _ByteTokenizer(), lm.spec, lm.path, lm.model_id)
    engine = new_engine(lm)
    method = MethodConfig(chunk_size=16, top_k=2)
    questions = [f"question {i}?" for i in range(6)]
    context = "".join(chr(97 + (i * 7) % 26) for i in range(120))
    solo = [generate(lm, context, q, LLADA, "sparse", method=method, engine=new_engine(lm)).tokens for q in questions]
    with ThreadPoolExecutor(6) as pool:
        outs = list(
            pool.map(lambda q: generate(lm, context, q, LLADA, "sparse", method=method, engine=engine), questions)
        )
    engine.close()
    assert [o.tokens for o in outs] == solo
    assert engine.scheduler.total_steps < sum(o.stats["steps"] for o in outs)
    assert max(o.stats["mean_batch"] for o in outs) > 1


class _ByteTokenizer:
    """Bytes as token ids (the tiny models' vocabulary starts with the 256 bytes)."""

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": list(text.encode())})()

    def decode(self, tokens):
        return bytes(t for t in tokens if t < 256).decode(errors="replace")


def test_jobs_ranking_together_share_one_question_forward_and_rank_as_alone():
    """Six jobs ask while a step holds the GPU: the engine's thread then ranks all six in one padded forward, and
    each gets the chunks rank_chunks picks for its question alone (questions of different lengths)."""
    import threading

    from pdllm.errors import InvalidRequest
    from pdllm.method import rank_chunks

    lm = tiny_lm("dream", kv_heads=2, seed=6)
    engine = new_engine(lm)
    kvs, _ = document(lm, n=6)
    questions = [ids(3 + 2 * i, 70 + i) for i in range(6)]
    summaries = [c.summary for c in kvs]
    want = [rank_chunks(lm, q, summaries, 2) for q in questions]
    assert len({tuple(w) for w in want}) > 1  # the questions do not all pick the same chunks
    got = [None] * len(questions)

    def ask(i: int) -> None:
        got[i] = engine.rank_chunks(questions[i], summaries, 2)

    with engine.scheduler.gpu_lock:  # as a denoising step would
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        assert engine.ranker.wait_for_pending(len(questions), timeout_s=30)
    for t in threads:
        t.join(timeout=60)
    assert got == want
    assert engine.status()["rank_forwards"] == 1 and engine.status()["ranked_jobs"] == len(questions)
    with pytest.raises(InvalidRequest, match="summaries have shape"):  # refused before it joins a batch
        engine.rank_chunks(questions[0], [s[:1] for s in summaries], 2)
    with pytest.raises(InvalidRequest, match="top_k"):
        engine.rank_chunks(questions[0], summaries, 0)
    engine.close()


def test_the_process_stops_its_engines_at_exit_before_the_interpreter_finalizes():
    """An engine's loop is a daemon thread; one left running while the interpreter finalized aborted
    `pdllm generate --in-process` now and then (exit status 134). A handler registered before the engine module's
    own runs after it (atexit is last in, first out) and sees every loop already stopped: the one engine_for made
    and one made directly, as a decode actor makes its engine."""
    import subprocess
    import sys

    script = """
import atexit
seen = {}
atexit.register(lambda: print("loops alive at exit:", [e._thread.is_alive() for e in seen["engines"]], flush=True))
from pathlib import Path
from pdllm.decode_node.engine import DecodeEngine, EngineConfig
from pdllm.engine import engine_for
from pdllm.models.loader import LoadedModel
from pdllm.models.tiny import random_model, tiny_spec
spec = tiny_spec("llada", layers=2)
lm = LoadedModel(random_model(spec, 0), None, spec, Path("."), "tiny")
seen["engines"] = engines = [engine_for(lm), DecodeEngine(lm, EngineConfig(pool_bytes=1 << 20))]
for engine in engines:
    engine.start()
print("loops alive before exit:", [e._thread.is_alive() for e in engines], flush=True)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout.splitlines() == ["loops alive before exit: [True, True]", "loops alive at exit: [False, False]"]
