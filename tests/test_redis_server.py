"""The embedded Redis-protocol server is real: password required, data survives a restart on the same directory."""

from __future__ import annotations

import pytest
import redis
from pdllm.cluster.kv.redis_server import EmbeddedRedis


def test_password_persistence_and_restart(tmp_path):
    server = EmbeddedRedis(data_dir=tmp_path).start()
    try:
        r = server.client()
        r.set("job:1", "done")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=server.host, port=server.port).get("job:1")
    finally:
        server.stop()
    assert not server.running
    again = EmbeddedRedis(data_dir=tmp_path, port=server.port, password=server.password).start()
    try:
        assert again.client().get("job:1") == b"done"
    finally:
        again.stop()
