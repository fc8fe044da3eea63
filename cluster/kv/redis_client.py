"""Redis clients that ride out a server restart: every command is retried with backoff for up to `outage_s`.

Why retrying is safe here: the chunk index and the batch store only send commands that are idempotent or
compare-and-set (HSET of the same fields, deletes guarded by the holder, claims that recognise their own owner,
results written once with HSETNX), so a command that ran but whose reply was lost does no harm when sent again.
"""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

RETRY_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def retry_policy(outage_s: float) -> Retry:
    """Backoff 50 ms doubling to 1 s, enough tries to span `outage_s` seconds of a server being away."""
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=int(outage_s) + 6, supported_errors=RETRY_ERRORS)


def connect(url: str, timeout_s: float = 5.0, outage_s: float = 15.0, **kwargs) -> redis.Redis:
    """A client for `url` with socket timeouts of `timeout_s` and retries spanning `outage_s` seconds."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=retry_policy(outage_s),
        retry_on_error=list(RETRY_ERRORS),
        **kwargs,
    )
