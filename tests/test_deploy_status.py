"""`pdllm status`: the table from a status dict, and the command against a real gRPC server on loopback."""

from __future__ import annotations

import json

import pytest
from pdllm.cluster.api.server import ApiServer, ApiServerConfig

from pdllm.cli import main
from pdllm.commands.status import human_bytes, render_status

CLUSTER = {
    "serving": True,
    "backend": "ray-cluster",
    "actors": [
        {
            "name": "prefill-0",
            "role": "prefill",
            "node": "10.0.0.2",
            "gpu_ids": [0.0],
            "alive": True,
            "store": {"used_bytes": 3 << 30, "capacity_bytes": 12 << 30},
            "chunks": 24.0,
            "queue": 2.0,
        },
        {
            "name": "decode-0",
            "role": "decode",
            "node": "10.0.0.3",
            "gpu_ids": [1],
            "alive": False,
            "running": 1,
            "state": "restarting",
            "restarts": 1.0,
            "fault": {"cause": "out of memory", "since_s": 41.2},
        },
    ],
    "index": {"chunks": 24, "bytes": 3 << 30},
    "queues": {"prefill": 2, "decode": 0},
}


def test_render_status_shows_actors_stores_index_and_queues():
    text = render_status(
        {
            "server": "h:1",
            "serving": True,
            "model": {"name": "llada-8b", "family": "llada"},
            "backend": CLUSTER,
            "admission": {"running": 1, "waiting": 3, "refused": 0},
            "batches": {"redis": True, "queued_jobs": 5, "leased_jobs": 1},
            "requests": {"ok": 10, "failed": 1},
        }
    )
    lines = text.splitlines()
    assert lines[0].startswith("h:1: serving  model llada-8b (llada)  backend ray-cluster")
    header = next(line for line in lines if line.startswith("ACTOR"))
    assert header.split() == [
        "ACTOR", "ROLE", "NODE", "GPU", "STATE", "CHUNK", "STORE", "CHUNKS", "QUEUE", "RUNNING", "FAULTS"
    ]  # fmt: skip
    decode = next(line for line in lines if line.startswith("decode-0"))
    prefill = next(line for line in lines if line.startswith("prefill-0"))
    assert lines.index(decode) < lines.index(prefill)  # sorted by role
    assert "RESTARTING" in decode and " 1" in decode
    assert decode.endswith("1 restart; out of memory, 41 s ago")  # the cause and the time since the death
    assert "3.0 GiB / 12.0 GiB (25%)" in prefill and "up" in prefill.split()
    assert prefill.split()[3] == "0" and "24" in prefill.split()  # Struct doubles print as integers
    assert "1/2 actors up" in lines
    assert "chunk index: 24 chunks, 3.0 GiB of KV indexed" in lines
    queues = {line.split()[0]: line.split()[1] for line in lines if line.startswith(("api_", "batch_", "prefill "))}
    assert queues == {"api_running": "1", "api_waiting": "3", "api_refused": "0", "batch_queued_jobs": "5",
                      "batch_leased_jobs": "1", "prefill": "2"}  # fmt: skip
    assert "batch store redis: up" in lines
    assert "requests: failed 1, ok 10" in lines


def test_render_status_accepts_a_bare_backend_dict_and_actor_mapping():
    text = render_status({"serving": False, "actors": {"decode-3": {"role": "decode", "healthy": True}}})
    assert "NOT SERVING" in text.splitlines()[0]
    assert any(line.startswith("decode-3") and "up" in line.split() for line in text.splitlines())
    assert "ACTOR" not in render_status({"serving": True})  # nothing reported: no empty table


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(80 << 30) == "80.0 GiB"
    assert human_bytes(None) == "-"


class StatusBackend:
    """A backend reporting a cluster status, as the cluster backend's health() does."""

    def generate(self, *a, **kw):
        raise AssertionError("status must not generate")

    def model_info(self) -> dict:
        return {"name": "tiny", "model_id": "abc", "family": "llada", "modes": ["vanilla"], "max_context_tokens": 1024}

    def health(self) -> dict:
        return CLUSTER


@pytest.fixture
def server():
    srv = ApiServer(StatusBackend(), ApiServerConfig(port=0, auth_token="s3cret")).start()
    yield srv
    srv.stop(0.5)


def test_status_command_against_a_live_server(server, capsys):
    assert main(["status", "--server", server.address, "--auth-token", "s3cret", "--timeout", "5"]) == 0
    out = capsys.readouterr().out
    assert "serving  model tiny (llada)" in out and "prefill-0" in out and "RESTARTING" in out
    assert "1 restart; out of memory, 41 s ago" in out  # the fault crosses the wire (Struct doubles)
    assert "api_waiting" in out and "1/2 actors up" in out

    assert main(["status", "--server", server.address, "--auth-token", "s3cret", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["serving"] is True and doc["model"]["name"] == "tiny"
    assert [a["name"] for a in doc["backend"]["actors"]] == ["prefill-0", "decode-0"]


def test_status_command_errors_are_one_line(server, capsys):
    assert main(["status", "--server", server.address, "--auth-token", "wrong", "--timeout", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pdllm: error: cannot get status from {server.address}") and "\n" not in err
    assert "UNAUTHENTICATED" in err


def test_status_command_with_nothing_listening(capsys):
    from pdllm.cluster.kv.redis_server import free_port

    address = f"127.0.0.1:{free_port()}"
    assert main(["status", "--server", address, "--timeout", "2"]) == 2
    assert capsys.readouterr().err.startswith(f"pdllm: error: cannot get status from {address}: UNAVAILABLE")
