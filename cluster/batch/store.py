"""Durable batch jobs in Redis: every state change is one atomic step, so no job is lost or answered twice.

Keys (under `prefix`, default "pdllm:batch:"):
  index             ZSET  batch id -> creation time (listing, newest first)
  b:<bid>           HASH  fingerprint, created, total, state (open | cancelled), counters running/done/failed/cancelled
  b:<bid>:jobs      LIST  job ids in submission order (results are exported in this order)
  b:<bid>:answered  LIST  job ids in the order their results were accepted: one entry per result ever written, so
                          counting ids here checks "exactly one result per job" (refused late results: counter
                          `refused_results` on b:<bid>)
  j:<bid>:<jid>     HASH  spec (JSON), state (pending | leased | done | failed | cancelled), attempts, owner,
                          result (JSON, written once with HSETNX), error
  pending           LIST  "<bid>|<jid>" members waiting for a worker (FIFO across batches)
  leases            ZSET  member -> lease expiry (ms, Redis server clock)
  doc:<sha256>      STRING a document shared by jobs, stored once
  claimtok:<token>  STRING the job a claim call leased (short-lived): a claim retried after its reply was lost
                          gets the same job back instead of leasing a second one

Life of a job: submit (pending) -> claim (Lua: pop + lease) -> complete (Lua: HSETNX result, done) or fail
(Lua: requeue while attempts remain, else failed). A lease that expires, or that belongs to a worker that
restarted under the same owner name, is requeued by `requeue`; a job whose state is not `pending` when popped
is skipped, so a duplicate queue entry never runs a finished job again.
Scripts build key names from the prefix, which suits a single Redis/Valkey server (not Redis Cluster).
`from_url` clients retry through a server restart (cluster/kv/redis_client.py); every script above is safe to run twice.
"""

from __future__ import annotations

import json
import time
import uuid

import redis
from pdllm.cluster.api.params import ApiLimits
from pdllm.cluster.batch.spec import fingerprint, jobs_from_request
from pdllm.cluster.kv.redis_client import connect

from pdllm.errors import Conflict, InvalidRequest, NotFound

_NOW_MS = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
_SPLIT = "local function split(m) local i = string.find(m, '|', 1, true) return m:sub(1, i - 1), m:sub(i + 1) end\n"

CLAIM = (
    _NOW_MS
    + _SPLIT
    + """
local p, owner, lease_ms, max_skip, token = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
if token ~= '' then
  local prev = redis.call('GET', p .. 'claimtok:' .. token)
  if prev then
    local bid, jid = split(prev)
    local jk = p .. 'j:' .. bid .. ':' .. jid
    if redis.call('HGET', jk, 'state') == 'leased' and redis.call('HGET', jk, 'owner') == owner then
      return {prev, redis.call('HGET', jk, 'spec'), tonumber(redis.call('HGET', jk, 'attempts'))}
    end
    return false
  end
end
for _ = 1, max_skip do
  local m = redis.call('LPOP', p .. 'pending')
  if not m then return false end
  local bid, jid = split(m)
  local jk = p .. 'j:' .. bid .. ':' .. jid
  if redis.call('HGET', jk, 'state') == 'pending' then
    redis.call('HSET', jk, 'state', 'leased', 'owner', owner)
    local attempts = redis.call('HINCRBY', jk, 'attempts', 1)
    redis.call('HINCRBY', p .. 'b:' .. bid, 'running', 1)
    redis.call('ZADD', p .. 'leases', now + lease_ms, m)
    if token ~= '' then redis.call('SET', p .. 'claimtok:' .. token, m, 'PX', lease_ms) end
    return {m, redis.call('HGET', jk, 'spec'), attempts}
  end
end
return false
"""
)

COMPLETE = (
    _SPLIT
    + """
local p, m, result = ARGV[1], ARGV[2], ARGV[3]
local bid, jid = split(m)
local jk, bk = p .. 'j:' .. bid .. ':' .. jid, p .. 'b:' .. bid
local state = redis.call('HGET', jk, 'state')
-- this very answer is there already: the client's retry of a write whose reply was lost (a restart), not a second one
if state == 'done' and redis.call('HGET', jk, 'result') == result then return 1 end
if (state ~= 'leased' and state ~= 'pending') or redis.call('HSETNX', jk, 'result', result) == 0 then
  if state then redis.call('HINCRBY', bk, 'refused_results', 1) end
  return 0
end
redis.call('RPUSH', bk .. ':answered', jid)
redis.call('HSET', jk, 'state', 'done')
if state == 'leased' then redis.call('HINCRBY', bk, 'running', -1) end
redis.call('HINCRBY', bk, 'done', 1)
redis.call('ZREM', p .. 'leases', m)
return 1
"""
)

FAIL = (
    _SPLIT
    + """
local p, m, owner, err, retry, max_attempts = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local bid, jid = split(m)
local jk, bk = p .. 'j:' .. bid .. ':' .. jid, p .. 'b:' .. bid
if redis.call('HGET', jk, 'state') ~= 'leased' or redis.call('HGET', jk, 'owner') ~= owner then return 0 end
redis.call('HINCRBY', bk, 'running', -1)
redis.call('ZREM', p .. 'leases', m)
redis.call('HSET', jk, 'error', err)
if retry == '1' and tonumber(redis.call('HGET', jk, 'attempts')) < max_attempts then
  redis.call('HSET', jk, 'state', 'pending')
  redis.call('RPUSH', p .. 'pending', m)
  return 2
end
redis.call('HSET', jk, 'state', 'failed')
redis.call('HINCRBY', bk, 'failed', 1)
return 1
"""
)

REQUEUE = (
    _NOW_MS
    + _SPLIT
    + """
local p, owner = ARGV[1], ARGV[2]
local leases = redis.call('ZRANGE', p .. 'leases', 0, -1, 'WITHSCORES')
local n = 0
for i = 1, #leases, 2 do
  local m, expiry = leases[i], tonumber(leases[i + 1])
  local bid, jid = split(m)
  local jk = p .. 'j:' .. bid .. ':' .. jid
  if redis.call('HGET', jk, 'state') ~= 'leased' then
    redis.call('ZREM', p .. 'leases', m)
  elseif expiry <= now or (owner ~= '' and redis.call('HGET', jk, 'owner') == owner) then
    redis.call('HSET', jk, 'state', 'pending')
    redis.call('HINCRBY', p .. 'b:' .. bid, 'running', -1)
    redis.call('ZREM', p .. 'leases', m)
    redis.call('LPUSH', p .. 'pending', m)
    n = n + 1
  end
end
return n
"""
)

RENEW = (
    _NOW_MS
    + _SPLIT
    + """
local p, owner, lease_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local n = 0
for i = 4, #ARGV do
  local bid, jid = split(ARGV[i])
  local jk = p .. 'j:' .. bid .. ':' .. jid
  if redis.call('HGET', jk, 'state') == 'leased' and redis.call('HGET', jk, 'owner') == owner then
    redis.call('ZADD', p .. 'leases', 'XX', now + lease_ms, ARGV[i])
    n = n + 1
  end
end
return n
"""
)

CANCEL = """
local p, bid = ARGV[1], ARGV[2]
local bk = p .. 'b:' .. bid
if redis.call('EXISTS', bk) == 0 then return -1 end
redis.call('HSET', bk, 'state', 'cancelled')
local n = 0
for _, jid in ipairs(redis.call('LRANGE', bk .. ':jobs', 0, -1)) do
  local jk = p .. 'j:' .. bid .. ':' .. jid
  if redis.call('HGET', jk, 'state') == 'pending' then
    redis.call('HSET', jk, 'state', 'cancelled')
    n = n + 1
  end
end
redis.call('HINCRBY', bk, 'cancelled', n)
return n
"""


class BatchNotFound(NotFound):
    """No batch of that id."""


class BatchConflict(Conflict):
    """A batch of that id exists with other jobs."""


def member(batch_id: str, job_id: str) -> str:
    return f"{batch_id}|{job_id}"


class BatchStore:
    """Batch jobs in Redis. Safe to share between threads (redis-py pools connections)."""

    def __init__(self, client: redis.Redis, prefix: str = "pdllm:batch:", max_attempts: int = 3) -> None:
        self.r, self.p, self.max_attempts = client, prefix, max_attempts
        self._claim = client.register_script(CLAIM)
        self._complete = client.register_script(COMPLETE)
        self._fail = client.register_script(FAIL)
        self._requeue = client.register_script(REQUEUE)
        self._renew = client.register_script(RENEW)
        self._cancel = client.register_script(CANCEL)

    @classmethod
    def from_url(cls, url: str, outage_s: float = 15.0, **kwargs) -> BatchStore:
        """A store whose commands ride out `outage_s` seconds of Redis being away (restart, failover)."""
        return cls(connect(url, timeout_s=10, outage_s=outage_s, decode_responses=True), **kwargs)

    def _bk(self, batch_id: str) -> str:
        return f"{self.p}b:{batch_id}"

    def _jk(self, batch_id: str, job_id: str) -> str:
        return f"{self.p}j:{batch_id}:{job_id}"

    # -- submission --------------------------------------------------------------------------------------------
    def submit_request(self, request, modes: tuple[str, ...], limits: ApiLimits) -> tuple[dict, bool]:
        """A `SubmitBatchRequest` checked against the server's modes and limits, then stored (`submit`). The API
        server calls this, so it needs no knowledge of job specs (the batch layer sits above the API)."""
        batch_id, jobs, documents = jobs_from_request(request, modes, limits)
        return self.submit(batch_id, jobs, documents)

    def submit(self, batch_id: str, jobs: list[dict], documents: dict[str, str]) -> tuple[dict, bool]:
        """Store a batch once; the same id with the same jobs again returns (status, False), other jobs conflict."""
        fp = fingerprint(jobs)
        bk = self._bk(batch_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(bk)
                    existing = pipe.hget(bk, "fingerprint")
                    if existing is not None:
                        pipe.reset()
                        if _text(existing) != fp:
                            raise BatchConflict(f"batch {batch_id!r} exists with different jobs; use a new batch id")
                        return self.status(batch_id), False
                    refs = {j["document_ref"] for j in jobs if "document_ref" in j} - set(documents)
                    missing = [ref for ref in sorted(refs) if not pipe.exists(f"{self.p}doc:{ref}")]
                    if missing:
                        raise InvalidRequest(f"unknown document_ref {missing[0]!r}: send the document with the batch")
                    pipe.multi()
                    for ref, text in documents.items():
                        pipe.set(f"{self.p}doc:{ref}", text, nx=True)
                    created = time.time()
                    fields = {"fingerprint": fp, "created": created, "total": len(jobs), "state": "open"}
                    fields.update(running=0, done=0, failed=0, cancelled=0)
                    pipe.hset(bk, mapping=fields)
                    for job in jobs:
                        spec = json.dumps(job, ensure_ascii=False)
                        pipe.hset(
                            self._jk(batch_id, job["id"]), mapping={"spec": spec, "state": "pending", "attempts": 0}
                        )
                    ids = [j["id"] for j in jobs]
                    for i in range(0, len(ids), 1000):
                        pipe.rpush(f"{bk}:jobs", *ids[i : i + 1000])
                        pipe.rpush(f"{self.p}pending", *(member(batch_id, j) for j in ids[i : i + 1000]))
                    pipe.zadd(f"{self.p}index", {batch_id: created})
                    pipe.execute()
                    return self.status(batch_id), True
                except redis.WatchError:
                    continue  # someone submitted the same id at the same moment: look again

    def document(self, ref: str) -> str:
        text = self.r.get(f"{self.p}doc:{ref}")
        if text is None:
            raise InvalidRequest(f"document {ref!r} is gone from Redis")
        return _text(text)

    # -- queries -----------------------------------------------------------------------------------------------
    def status(self, batch_id: str) -> dict:
        raw = self.r.hgetall(self._bk(batch_id))
        if not raw:
            raise BatchNotFound(f"no batch {batch_id!r}")
        h = {_text(k): _text(v) for k, v in raw.items()}
        counts = {k: int(h.get(k, 0)) for k in ("total", "running", "done", "failed", "cancelled")}
        finished = counts["done"] + counts["failed"] + counts["cancelled"]
        pending = max(counts["total"] - finished - counts["running"], 0)
        if h.get("state") == "cancelled":
            state = "cancelled"
        elif finished >= counts["total"]:
            state = "done"
        elif counts["running"] or finished:
            state = "running"
        else:
            state = "pending"
        return {"batch_id": batch_id, "state": state, "pending": pending, "created_unix": float(h["created"]), **counts}

    def results(self, batch_id: str, offset: int, limit: int) -> tuple[list[dict], int]:
        """One page of job results in submission order, and the next offset (-1 at the end)."""
        total = self.status(batch_id)["total"]
        ids = [_text(i) for i in self.r.lrange(f"{self._bk(batch_id)}:jobs", offset, offset + limit - 1)]
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self._jk(batch_id, job_id), "state", "result", "error", "attempts")
            rows = pipe.execute()
        out = []
        for job_id, (state, result, error, attempts) in zip(ids, rows, strict=True):
            item = {"id": job_id, "state": _text(state), "attempts": int(attempts or 0)}
            if result is not None:
                item.update(json.loads(result))
            if error is not None and _text(state) != "done":
                item["error"] = _text(error)
            out.append(item)
        end = offset + len(ids)
        return out, (end if end < total else -1)

    def list(self, limit: int = 100) -> list[dict]:
        ids = [_text(i) for i in self.r.zrevrange(f"{self.p}index", 0, limit - 1)]
        return [self.status(i) for i in ids]

    def answered(self, batch_id: str) -> list[str]:
        """Job ids in the order their results were accepted; an id appears once per result ever written."""
        return [_text(i) for i in self.r.lrange(f"{self._bk(batch_id)}:answered", 0, -1)]

    def refused_results(self, batch_id: str) -> int:
        """Results offered for jobs that already had one (or were cancelled), and refused."""
        return int(self.r.hget(self._bk(batch_id), "refused_results") or 0)

    def job(self, batch_id: str, job_id: str) -> dict:
        return {_text(k): _text(v) for k, v in self.r.hgetall(self._jk(batch_id, job_id)).items()}

    def state_counts(self, batches: int = 1000) -> dict[str, int]:
        """Jobs per state (pdllm_batch_jobs): pending and leased from the work queue itself, done, failed and
        cancelled summed over the newest `batches` batches (older ones are history, not load)."""
        counts = {"pending": int(self.r.llen(f"{self.p}pending")), "leased": int(self.r.zcard(f"{self.p}leases"))}
        for key in ("done", "failed", "cancelled"):
            counts[key] = 0
        for status in self.list(batches):
            for key in ("done", "failed", "cancelled"):
                counts[key] += status[key]
        return counts

    def health(self) -> dict:
        return {
            "redis": bool(self.r.ping()),
            "queued_jobs": int(self.r.llen(f"{self.p}pending")),
            "leased_jobs": int(self.r.zcard(f"{self.p}leases")),
        }

    # -- worker side -------------------------------------------------------------------------------------------
    def claim(self, owner: str, lease_s: float, max_skip: int = 100) -> tuple[str, dict, int] | None:
        """Lease the next pending job: (member, spec, attempt number) or None when nothing is pending. The call
        carries a fresh token, so the client's own retry of it (reply lost) returns the same lease."""
        got = self._claim(args=[self.p, owner, int(lease_s * 1000), max_skip, uuid.uuid4().hex])
        if not got:
            return None
        m, spec, attempts = got
        return _text(m), json.loads(spec), int(attempts)

    def complete(self, m: str, result: dict) -> bool:
        """Record the answer once; False when the job already has another one (or was cancelled): nothing is
        overwritten. The same answer again is True and counts nothing: a retry of this call after its reply was lost."""
        return bool(self._complete(args=[self.p, m, json.dumps(result, ensure_ascii=False)]))

    def fail(self, m: str, owner: str, error: str, retry: bool) -> str:
        """'requeued' while attempts remain and `retry`, else 'failed'; 'ignored' if `owner` no longer holds it."""
        code = int(self._fail(args=[self.p, m, owner, error[:2000], "1" if retry else "0", self.max_attempts]))
        return {0: "ignored", 1: "failed", 2: "requeued"}[code]

    def renew(self, owner: str, members: list[str], lease_s: float) -> int:
        if not members:
            return 0
        return int(self._renew(args=[self.p, owner, int(lease_s * 1000), *members]))

    def requeue(self, owner: str = "") -> int:
        """Put expired leases, and every lease held under `owner` (a restarted worker's old self), back in line."""
        return int(self._requeue(args=[self.p, owner]))

    def cancel(self, batch_id: str) -> dict:
        """Pending jobs become cancelled; jobs already running finish and keep their answers."""
        if int(self._cancel(args=[self.p, batch_id])) < 0:
            raise BatchNotFound(f"no batch {batch_id!r}")
        return self.status(batch_id)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
