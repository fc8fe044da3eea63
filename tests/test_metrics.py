"""Metrics: the helpers move the right series, /metrics serves them over real HTTP, remote snapshots add up."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdllm.observability import metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana-dashboard.json"


def scrape(port: int) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def server():
    metrics.clear_remote_sources()
    port = metrics.start_metrics_server(0)
    yield port
    metrics.stop_metrics_servers()
    metrics.clear_remote_sources()


def test_helpers_move_counters_over_http(server):
    before = scrape(server)
    metrics.observe_request(1.5, first_step_s=0.2)
    metrics.record_prefill(4096, chunks=8)
    metrics.record_fetch("grpc", 1 << 20)
    metrics.record_fetch("nccl", 512)
    metrics.record_cache(hit=True, n=3)
    metrics.record_cache(hit=False)
    metrics.record_step(0.012, steps=2)
    metrics.set_queue_depth("decode", 7)
    metrics.set_batch_jobs({"pending": 4, "done": 2})
    metrics.set_actor_health("prefill-0", True)
    metrics.set_actor_health("decode-1", False)
    after = scrape(server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("pdllm_request_seconds_count", outcome="ok") == 1
    assert delta("pdllm_request_seconds_sum", outcome="ok") == pytest.approx(1.5)
    assert delta("pdllm_request_seconds_bucket", outcome="ok", le="1.0") == 0  # 1.5 s lands above the 1 s bucket
    assert delta("pdllm_request_seconds_bucket", outcome="ok", le="2.5") == 1
    assert delta("pdllm_request_first_step_seconds_count") == 1
    assert delta("pdllm_prefill_tokens_total") == 4096
    assert delta("pdllm_prefill_chunks_total") == 8
    assert delta("pdllm_kv_fetch_bytes_total", transport="grpc") == 1 << 20
    assert delta("pdllm_kv_fetch_bytes_total", transport="nccl") == 512
    assert delta("pdllm_kv_fetches_total", transport="grpc") == 1
    assert delta("pdllm_chunk_cache_lookups_total", result="hit") == 3
    assert delta("pdllm_chunk_cache_lookups_total", result="miss") == 1
    assert delta("pdllm_denoise_steps_total") == 2
    assert delta("pdllm_denoise_step_seconds_count") == 1
    assert value(after, "pdllm_queue_depth", queue="decode") == 7
    assert value(after, "pdllm_batch_jobs", state="pending") == 4
    assert value(after, "pdllm_batch_jobs", state="failed") == 0  # known states absent from the dict read 0
    assert value(after, "pdllm_actor_up", actor="prefill-0") == 1
    assert value(after, "pdllm_actor_up", actor="decode-1") == 0


def test_remote_snapshots_add_to_local_samples(server):
    metrics.record_fetch("local", 100)
    local = scrape(server)
    actor = {
        "v": 1,
        "origin": "other-host:1",
        "samples": [
            ["pdllm_kv_fetch_bytes_total", {"transport": "local"}, 50.0],
            ["pdllm_kv_fetch_bytes_total", {"transport": "grpc"}, 7.0],
            ["pdllm_prefill_tokens_total", {}, 1000.0],
            ["pdllm_not_a_metric_total", {}, 1.0],
        ],
    }
    itself = metrics.snapshot()  # an in-process router reporting this very process must not double count

    def broken():
        raise RuntimeError("actor gone")

    metrics.add_remote_source(broken)
    metrics.add_remote_source(lambda: [actor, actor, itself])
    merged = scrape(server)
    assert (
        value(merged, "pdllm_kv_fetch_bytes_total", transport="local")
        == value(local, "pdllm_kv_fetch_bytes_total", transport="local") + 100
    )
    assert (
        value(merged, "pdllm_kv_fetch_bytes_total", transport="grpc")
        == value(local, "pdllm_kv_fetch_bytes_total", transport="grpc") + 14
    )
    assert value(merged, "pdllm_prefill_tokens_total") == value(local, "pdllm_prefill_tokens_total") + 2000
    assert not any(name == "pdllm_not_a_metric_total" for name, _ in merged)


def test_snapshot_histograms_merge_bucketwise(server):
    metrics.record_step(0.003)
    snap = metrics.snapshot()
    json.dumps(snap)  # plain data: travels in any status dict
    mine = scrape(server)
    metrics.add_remote_source(lambda: [dict(snap, origin="elsewhere:2")])
    both = scrape(server)
    for le in ("0.002", "0.005", "+Inf"):
        assert value(both, "pdllm_denoise_step_seconds_bucket", le=le) == 2 * value(
            mine, "pdllm_denoise_step_seconds_bucket", le=le
        )
    assert value(mine, "pdllm_denoise_step_seconds_bucket", le="0.005") >= 1


def test_labels_are_bounded():
    with pytest.raises(ValueError):
        metrics.record_fetch("carrier-pigeon", 1)
    with pytest.raises(ValueError):
        metrics.observe_request(1.0, outcome="meh")


def exposed_names() -> set[str]:
    names = set()
    for fam in metrics.REGISTRY.collect():
        if fam.type == "counter":
            names.add(fam.name + "_total")
        elif fam.type == "histogram":
            names |= {fam.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(fam.name)
    return names


def test_dashboard_uses_only_defined_metrics():
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    used = {m for e in exprs for m in re.findall(r"\bpdllm_[a-z_]+", e)}
    assert used, "the dashboard references no pdllm metric"
    unknown = used - exposed_names()
    assert not unknown, f"dashboard references metrics the module does not define: {sorted(unknown)}"
    families = {f.name for f in metrics.REGISTRY.collect()}
    covered = {f for f in families if any(u.startswith(f) for u in used)}
    assert covered == families, f"metrics missing from the dashboard: {sorted(families - covered)}"
