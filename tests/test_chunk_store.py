"""Chunk index (real embedded Valkey), chunk store with LRU eviction that keeps the index consistent, prefill
claims, the tensor codec, and the ChunkTransfer gRPC service on loopback (pieces, checksums, rows, missing, auth)."""

from __future__ import annotations

import threading
import time
import zlib
from dataclasses import replace

import grpc
import msgpack
import pytest
import torch
from pdllm.cluster.common.auth import new_token
from pdllm.cluster.kv.chunk_index import ChunkIndex
from pdllm.cluster.kv.chunk_store import ChunkStore, StoreFull
from pdllm.cluster.kv.kv_codec import chunk_from_parts, chunk_parts, pack_tensor, unpack_tensor
from pdllm.cluster.kv.redis_server import EmbeddedRedis
from pdllm.cluster.kv.transfer_server import serve
from pdllm.cluster.kv.transport import FetchItem, FetchResult, GrpcTransport, TransferError
from pdllm.decode_node.summaries import SummaryCache
from pdllm.proto import chunk_transfer_pb2 as pb
from pdllm.proto import chunk_transfer_pb2_grpc as pb_grpc

from pdllm.method.chunk_kv import ChunkKV
from pdllm.observability import counters


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with EmbeddedRedis(tmp_path_factory.mktemp("valkey")) as server:
        yield server


@pytest.fixture
def index(redis_server, request):
    return ChunkIndex(redis_server.client(socket_timeout=5), prefix=f"test:{request.node.name}")


def make_chunk(seed: int, rows: int = 17, dtype=torch.float32) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 4, rows, 16, generator=g).to(dtype)
    v = torch.randn(2, 4, rows, 16, generator=g).to(dtype)
    summary = torch.randn(2, 4, 16, generator=g).half()
    return ChunkKV(chunk_id=f"{seed:064x}", tokens=list(range(rows - 1)), k=k, v=v, summary=summary, has_bos=True)


def same(a: ChunkKV, b: ChunkKV) -> bool:
    return (
        a.chunk_id == b.chunk_id
        and a.tokens == b.tokens
        and a.has_bos == b.has_bos
        and all(torch.equal(x, y) for x, y in ((a.k, b.k), (a.v, b.v), (a.summary, b.summary)))
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codec_round_trip_keeps_every_byte(dtype):
    chunk = make_chunk(1, dtype=dtype)
    header, parts = chunk_parts(chunk)
    header = msgpack.unpackb(msgpack.packb(header))
    back = chunk_from_parts(header, b"".join(parts))
    assert same(chunk, back) and back.k.dtype == dtype
    assert torch.equal(unpack_tensor(pack_tensor(chunk.summary)), chunk.summary)
    with pytest.raises(ValueError, match="payload bytes"):
        chunk_from_parts(header, b"".join(parts)[:-1])


def test_index_register_lookup_touch_remove(index):
    chunk = make_chunk(2)
    index.register(chunk, "prefill-0", "node-a", "127.0.0.1:1")
    got = index.lookup([chunk.chunk_id, "f" * 64])
    assert list(got) == [chunk.chunk_id]
    entry = got[chunk.chunk_id]
    assert (entry.holder, entry.address, entry.nbytes, entry.dtype, entry.length) == (
        "prefill-0",
        "127.0.0.1:1",
        chunk.nbytes(),
        "float32",
        17,
    )
    assert torch.equal(entry.summary, chunk.summary)
    time.sleep(0.01)
    index.touch([chunk.chunk_id, "e" * 64])
    assert index.lookup([chunk.chunk_id])[chunk.chunk_id].last_used > entry.last_used
    assert index.lookup(["e" * 64]) == {}  # touching an absent id creates nothing
    assert not index.remove(chunk.chunk_id, "prefill-1")  # not the holder: the entry stays
    assert index.size() == 1
    assert index.remove(chunk.chunk_id, "prefill-0")
    assert index.size() == 0 and index.lookup([chunk.chunk_id]) == {}


def test_lookup_without_summaries_reads_the_same_entry_less_its_summary(index):
    chunk = make_chunk(5)
    index.register(chunk, "prefill-0", "node-a", "127.0.0.1:1")
    full = index.lookup([chunk.chunk_id, "d" * 64])[chunk.chunk_id]
    light = index.lookup([chunk.chunk_id, "d" * 64], summaries=False)
    assert list(light) == [chunk.chunk_id] and light[chunk.chunk_id].summary is None
    assert replace(light[chunk.chunk_id], summary=full.summary) == full


def test_summary_cache_reads_each_summary_once_and_stays_within_its_bytes(index):
    chunks = [make_chunk(10 + i) for i in range(4)]
    for c in chunks:
        index.register(c, "prefill-0", "node-a", "127.0.0.1:1")
    ids = [c.chunk_id for c in chunks]
    calls = []

    def read(cids):
        calls.append(list(cids))
        return {c: e.summary for c, e in index.lookup(cids).items()}

    one = chunks[0].summary.numel() * 4  # kept as float32
    cache = SummaryCache("cpu", max_bytes=3 * one)
    got = cache.get(ids[:3] + ["c" * 64], read)  # an id the index does not have is left out
    assert sorted(got) == sorted(ids[:3]) and calls == [ids[:3] + ["c" * 64]]
    assert all(torch.equal(got[c.chunk_id], c.summary.float()) for c in chunks[:3])
    assert cache.get(ids[:3], read).keys() == set(ids[:3]) and len(calls) == 1  # kept: no index read
    cache.get(ids[:1], read)  # chunks[0] most recently used: chunks[1] goes first
    cache.get(ids[3:], read)
    assert len(cache) == 3 and cache.bytes == 3 * one and calls[-1] == ids[3:]
    cache.get(ids[1:2], read)
    assert calls[-1] == ids[1:2]


def test_claim_is_exclusive_and_expires(index):
    assert index.claim("c1", "a", ttl_s=0.3)
    assert not index.claim("c1", "b", ttl_s=0.3)
    index.release("c1", "b")  # not the owner: no effect
    assert index.claimed(["c1"]) == {"c1": True}
    key = f"{index.prefix}:claim:c1"
    assert 0 < index.r.pttl(key) <= 300  # the claim carries its TTL: Redis drops it if the claimant dies
    index.r.pexpire(key, 0)  # what Redis does when the TTL runs out, without waiting on the clock
    assert index.claimed(["c1"]) == {"c1": False}
    assert index.claim("c1", "b", ttl_s=5)
    index.release("c1", "b")
    assert index.claim("c1", "c", ttl_s=5)


def test_claims_of_a_dead_holder_are_released_at_once_and_only_its_own(index):
    assert index.claim("c1", "prefill-0:aa11", ttl_s=60) and index.claim("c2", "prefill-0:bb22", ttl_s=60)
    assert index.claim("c3", "prefill-01:cc33", ttl_s=60)  # a holder whose name starts alike keeps its claim
    assert index.claim("c4", "prefill-1:dd44", ttl_s=60)
    assert index.release_claims_of("prefill-0") == 2
    assert index.claimed(["c1", "c2", "c3", "c4"]) == {"c1": False, "c2": False, "c3": True, "c4": True}
    assert index.claim("c1", "prefill-0:ee55", ttl_s=60)  # the new incarnation can claim without waiting the TTL


def test_claim_all_claims_the_free_ids_in_one_round_trip(index):
    index.register(make_chunk(1), "prefill-1", "node-a", "127.0.0.1:1")
    assert index.claim(make_chunk(2).chunk_id, "other:aa", ttl_s=60)
    ids = [make_chunk(s).chunk_id for s in (1, 2, 3)]
    assert index.claim_all(ids, "me:bb", ttl_s=60) == {ids[0]: "indexed", ids[1]: "waiting", ids[2]: "claimed"}
    assert index.claim_all([ids[2]], "me:bb", ttl_s=60) == {ids[2]: "claimed"}  # a retry finds its own claim
    assert 0 < index.r.pttl(f"{index.prefix}:claim:{ids[2]}") <= 60_000


def test_a_waiter_is_told_when_a_claimed_chunk_lands_and_when_its_claimant_is_gone(index):
    """The waiter sleeps on the index's ready channel (a claims check only every 30 s here): the chunk's
    registration wakes it with the entry; a claim that vanished without an entry is found at the next check."""
    landing, orphan = make_chunk(5), make_chunk(6)
    for chunk in (landing, orphan):
        assert index.claim(chunk.chunk_id, "other:cc", ttl_s=60)
    waiting, out = threading.Event(), {}

    def wait() -> None:
        out["result"] = index.wait_for([landing.chunk_id], time.monotonic() + 60, 30.0, waiting.set)

    before = counters.snapshot()
    waiter = threading.Thread(target=wait)
    waiter.start()
    assert waiting.wait(10)  # subscribed, and nothing was there yet
    index.register(landing, "prefill-2", "node-b", "127.0.0.1:2")
    waiter.join(10)
    found, dead = out["result"]
    assert list(found) == [landing.chunk_id] and found[landing.chunk_id].holder == "prefill-2" and dead == []
    assert counters.difference(counters.snapshot(), before).get("index.lookup") == 2  # on entry, and once told
    index.release(orphan.chunk_id, "other:cc")  # its claimant died without registering it
    found, dead = index.wait_for([orphan.chunk_id], time.monotonic() + 60, recheck_s=0.0)
    assert found == {} and dead == [orphan.chunk_id]


def test_store_evicts_lru_and_deletes_from_index(index):
    chunks = [make_chunk(10 + i) for i in range(4)]
    size = chunks[0].nbytes()
    store = ChunkStore(3 * size, index, "prefill-0", "node-a", "127.0.0.1:1")
    for c in chunks[:3]:
        assert store.put(c) == []
    store.get(chunks[0].chunk_id)  # chunk 0 becomes the most recently used
    assert store.put(chunks[3]) == [chunks[1].chunk_id]
    assert chunks[1].chunk_id not in store and store.used_bytes == 3 * size
    assert index.ids() == {chunks[i].chunk_id for i in (0, 2, 3)}
    with pytest.raises(StoreFull):
        ChunkStore(size - 1, index, "x", "n", "a").put(chunks[0])
    store.clear()
    assert index.size() == 0 and store.usage()["used_bytes"] == 0


def test_a_call_registers_all_its_chunks_and_releases_all_its_claims_in_one_round_trip_each(index):
    chunks = [make_chunk(20 + i) for i in range(5)]
    ids = [c.chunk_id for c in chunks]
    assert index.claim(ids[4], "other:bb", ttl_s=60)  # another owner's claim: releasing ours leaves it
    assert index.claim_all(ids[:4], "me:aa", ttl_s=60) == dict.fromkeys(ids[:4], "claimed")
    before = counters.snapshot()
    store = ChunkStore(10 * chunks[0].nbytes(), index, "prefill-0", "node-a", "127.0.0.1:1")
    assert store.put_all(chunks[:4]) == []
    assert index.release_all(ids, "me:aa") == 4
    done = counters.difference(counters.snapshot(), before)
    assert done == {"index.register": 1, "index.release": 1}
    assert set(index.lookup(ids)) == set(ids[:4]) and index.ids() == set(ids[:4])
    assert index.claimed(ids) == {**dict.fromkeys(ids[:4], False), ids[4]: True}
    entry = index.lookup([ids[2]])[ids[2]]
    assert (entry.holder, entry.length, entry.nbytes) == ("prefill-0", 17, chunks[2].nbytes())
    assert torch.equal(entry.summary, chunks[2].summary)
    before = counters.snapshot()
    assert store.put_all([]) == [] and index.release_all([], "me:aa") == 0  # nothing to do: no round trip
    assert counters.difference(counters.snapshot(), before) == {}


def test_a_call_larger_than_the_store_registers_only_the_chunks_it_kept(index):
    chunks = [make_chunk(30 + i) for i in range(4)]
    store = ChunkStore(2 * chunks[0].nbytes(), index, "prefill-0", "node-a", "127.0.0.1:1")
    assert store.put_all(chunks) == [chunks[0].chunk_id, chunks[1].chunk_id]  # evicted by the call's later chunks
    assert index.ids() == {chunks[2].chunk_id, chunks[3].chunk_id} == set(store.ids())
    small = ChunkStore(chunks[0].nbytes(), index, "x", "n", "a")
    with pytest.raises(StoreFull):  # one chunk larger than the store: nothing of the call is stored
        small.put_all([chunks[0], make_chunk(39, rows=40)])
    assert len(small) == 0 and not index.holders().get("x")


def test_a_call_into_a_full_store_unregisters_what_it_evicts_in_one_round_trip(index):
    old, new = [make_chunk(40 + i) for i in range(3)], [make_chunk(50 + i) for i in range(2)]
    store = ChunkStore(3 * old[0].nbytes(), index, "prefill-0", "node-a", "127.0.0.1:1")
    store.put_all(old)
    index.register(old[1], "prefill-9", "node-b", "127.0.0.1:9")  # another holder's entry now: not this store's
    before = counters.snapshot()
    assert store.put_all(new) == [old[0].chunk_id, old[1].chunk_id]
    assert counters.difference(counters.snapshot(), before) == {"index.remove": 1, "index.register": 1}
    assert index.ids() == {old[1].chunk_id, old[2].chunk_id, *(c.chunk_id for c in new)}
    assert index.lookup([old[1].chunk_id])[old[1].chunk_id].holder == "prefill-9"  # left to its holder
    before = counters.snapshot()
    store.clear()  # shutdown: every entry of this store out, in one round trip
    assert counters.difference(counters.snapshot(), before) == {"index.remove": 1}
    assert index.ids() == {old[1].chunk_id} and index.remove_all([], "prefill-0") == 0


@pytest.fixture
def transfer(index):
    token = new_token()
    store = ChunkStore(1 << 30, index, "prefill-0", "node-a", "127.0.0.1:0")
    server, port = serve(store, token=token, piece_bytes=4096)
    yield store, f"127.0.0.1:{port}", token
    server.stop(grace=None)


def test_grpc_fetch_whole_rows_and_missing(transfer):
    store, address, token = transfer
    a, b = make_chunk(20, rows=65), make_chunk(21, rows=9, dtype=torch.bfloat16)
    store.put(a)
    store.put(b)
    transport = GrpcTransport(token=token, piece_bytes=4096)
    items = [FetchItem(a.chunk_id, address), FetchItem("0" * 64, address), FetchItem(b.chunk_id, address)]
    got = transport.fetch(items, timeout_s=10)
    assert got.missing == ["0" * 64]
    assert same(got.chunks[a.chunk_id], a) and same(got.chunks[b.chunk_id], b)
    assert got.bytes == a.nbytes() + b.nbytes() and a.nbytes() > 4 * 4096  # several pieces per chunk
    rows = (0, 3, 64)
    part = transport.fetch([FetchItem(a.chunk_id, address, rows)], timeout_s=10).chunks[a.chunk_id]
    assert torch.equal(part.k, a.k[:, :, list(rows)]) and torch.equal(part.v, a.v[:, :, list(rows)])
    transport.close()


def test_grpc_fetch_needs_the_token_and_reports_a_dead_holder(transfer):
    store, address, _ = transfer
    chunk = make_chunk(30)
    store.put(chunk)
    with pytest.raises(TransferError, match="UNAUTHENTICATED"):
        GrpcTransport(token="wrong").fetch([FetchItem(chunk.chunk_id, address)], timeout_s=5)
    dead = GrpcTransport().fetch([FetchItem(chunk.chunk_id, "127.0.0.1:1")], timeout_s=5)
    assert dead.missing == [chunk.chunk_id] and not dead.chunks


def test_pieces_carry_checksums_below_the_message_limit(transfer):
    store, address, token = transfer
    chunk = make_chunk(40, rows=200)
    store.put(chunk)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ChunkTransferStub(channel)
        request = pb.FetchRequest(chunks=[pb.ChunkRequest(chunk_id=chunk.chunk_id)], max_piece_bytes=10_000)
        pieces = list(stub.Fetch(request, timeout=10, metadata=[("authorization", f"Bearer {token}")]))
    assert len(pieces) == -(-chunk.nbytes() // 10_000)
    assert all(len(p.data) <= 10_000 for p in pieces) and pieces[-1].last and not any(p.last for p in pieces[:-1])
    assert [p.seq for p in pieces] == list(range(len(pieces))) and pieces[0].header and not pieces[1].header
    assert all(p.crc32 == zlib.crc32(p.data) for p in pieces)  # the generated class reads the hand-written pieces
    whole = FetchResult()
    GrpcTransport._collect(iter([p.SerializeToString() for p in pieces]), whole)  # and ours reads the generated ones
    assert torch.equal(whole.chunks[chunk.chunk_id].k, chunk.k)
    bad = pieces[1]
    bad.data = bytes([bad.data[0] ^ 1]) + bad.data[1:]
    with pytest.raises(TransferError, match="checksum"):
        GrpcTransport._collect(iter([p.SerializeToString() for p in pieces]), FetchResult())
