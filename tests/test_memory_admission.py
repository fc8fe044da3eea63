"""Memory admission and the memory limit in one process: the node's usage read as Ray reads it (meminfo, a cgroup v2
limit), the default refuse line derived from Ray's memory monitor threshold, refusals in one line, and the limit's
watchdog ending the process (here: a stand-in for SIGKILL that sets an event) after recording the cause in a real
Valkey, where the router reads it."""

from __future__ import annotations

import threading

import pytest
from pdllm.cluster.common.heap_trim import HeapTrim
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.common.memory_guard import MemoryBudgetExceeded, MemoryGuard
from pdllm.cluster.common.memory_limit import MemoryLimit, death_note, record_death
from pdllm.cluster.common.node_memory import RAY_THRESHOLD_ENV, derived_refuse_fraction, node_memory, ray_threshold
from pdllm.cluster.common.proc_stats import process_stats
from pdllm.cluster.kv.redis_server import EmbeddedRedis
from pdllm.cluster.router.faults import OUT_OF_MEMORY

GIB = 1 << 30


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_node_memory_is_meminfo_or_a_smaller_cgroup_limit(tmp_path):
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    write(proc / "meminfo", "MemTotal:       16777216 kB\nMemFree:  1000 kB\nMemAvailable:   12582912 kB\n")
    assert node_memory(str(proc), str(cgroup)) == (4 * GIB, 16 * GIB)  # no cgroup files: the machine's figures
    write(cgroup / "memory.max", "max\n")
    assert node_memory(str(proc), str(cgroup)) == (4 * GIB, 16 * GIB)  # no limit set
    write(cgroup / "memory.max", f"{8 * GIB}\n")
    write(cgroup / "memory.current", f"{3 * GIB}\n")
    write(cgroup / "memory.stat", f"anon 100\ninactive_file {GIB}\nactive_file 5\n")
    assert node_memory(str(proc), str(cgroup)) == (2 * GIB, 8 * GIB)  # the container's limit, less cold page cache
    assert node_memory(str(tmp_path / "none"), str(cgroup)) is None
    used, total = node_memory()  # this machine, for real
    assert 0 < used < total


def test_the_default_refuse_line_is_derived_from_rays_memory_monitor_threshold(monkeypatch):
    assert ClusterLimits().node_memory_refuse_fraction is None  # on by default, derived where the actor runs
    assert ray_threshold({}) == 0.95 and derived_refuse_fraction({}) == 0.9
    assert derived_refuse_fraction({RAY_THRESHOLD_ENV: "0.8"}) == 0.75
    assert derived_refuse_fraction({RAY_THRESHOLD_ENV: "0.1"}) == 0.5  # never below half the node
    assert derived_refuse_fraction({RAY_THRESHOLD_ENV: "lots"}) == 0.9  # what Ray would use: its default
    monkeypatch.setenv(RAY_THRESHOLD_ENV, "0.85")
    assert MemoryGuard.from_limits(ClusterLimits()).node_fraction == 0.8
    assert MemoryGuard.from_limits(ClusterLimits(node_memory_refuse_fraction=0.0)).node_fraction == 0.0  # off
    assert MemoryGuard.from_limits(ClusterLimits(node_memory_refuse_fraction=0.6)).node_fraction == 0.6
    for bad in (ClusterLimits(node_memory_refuse_fraction=1.5), ClusterLimits(actor_memory_limit_bytes=-1)):
        with pytest.raises(ValueError):
            bad.validate()
    with pytest.raises(ValueError, match="actor_memory_budget_bytes must be below actor_memory_limit_bytes"):
        ClusterLimits(actor_memory_budget_bytes=2 * GIB, actor_memory_limit_bytes=GIB).validate()


def test_a_node_over_its_refuse_line_refuses_in_one_line():
    guard = MemoryGuard(0, node_fraction=0.9, node=lambda: (95, 100))
    with pytest.raises(MemoryBudgetExceeded) as refused:
        guard.admit("decode actor d0")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("decode actor d0 refuses new work: its node's memory is 95% used, over 90%")
    assert guard.status()["memory_refused"] == 1 and guard.status()["node_memory_used_fraction"] == 0.95
    MemoryGuard(0, node_fraction=0.9, node=lambda: (89, 100)).admit("decode actor d0")  # under the line
    MemoryGuard(0, node_fraction=0.0, node=lambda: (100, 100)).admit("decode actor d0")  # off
    with pytest.raises(MemoryBudgetExceeded):  # the real node: some of its memory is always used
        MemoryGuard(0, node_fraction=1e-6).admit("prefill actor p0")
    MemoryGuard(0, node_fraction=1.0).admit("prefill actor p0")


def test_over_its_limit_the_watchdog_records_out_of_memory_then_ends_the_process(tmp_path):
    server = EmbeddedRedis(str(tmp_path / "valkey")).start()
    try:
        client = server.client()
        ended = threading.Event()
        rss = {"now": 100 << 20}
        record = lambda detail: record_death(client, "t:kv", "d0", 4242, OUT_OF_MEMORY, detail)  # noqa: E731
        limit = MemoryLimit("decode actor d0", 200 << 20, record, rss=lambda: rss["now"], end=ended.set)
        assert not limit.check() and death_note(client, "t:kv", "d0", 4242) is None
        limit.start()  # its thread reads the RSS every poll
        rss["now"] = 300 << 20
        assert ended.wait(10), "the watchdog did not end the process"
        note = death_note(client, "t:kv", "d0", 4242)
        assert note["cause"] == OUT_OF_MEMORY
        assert note["detail"] == "RSS 300 MiB over its limit of 200 MiB (actor_memory_limit_bytes)"
        assert limit.fired and death_note(client, "t:kv", "d0", 4243) is None  # another incarnation: no record
        assert death_note(client, "t:kv", "d0", None) is None
    finally:
        server.stop()
    assert death_note(client, "t:kv", "d0", 4242) is None  # Redis gone: no cause, not an error


def test_the_drill_holds_real_memory_and_a_zero_limit_never_fires():
    limit = MemoryLimit("prefill actor p0", 0, record=lambda d: None, end=lambda: pytest.fail("ended"))
    before = process_stats()["rss_bytes"]
    limit.hold(64 << 20)
    assert process_stats()["rss_bytes"] - before >= 60 << 20  # written, so resident
    assert not limit.check()
    with pytest.raises(ValueError):
        limit.hold(-1)


def test_heap_trim_hands_freed_holes_back_to_the_system():
    trim = HeapTrim(min_interval_s=60.0)
    kept = [bytes(100_000) + b"x" for _ in range(2000)]  # ~200 MB in blocks under glibc's mmap threshold
    del kept[::2]  # every other one freed: holes between live blocks, which free() alone keeps
    released = trim.trim_now()
    trim.stop()
    assert released >= 40 << 20, released  # most of the ~100 MB of holes (this process's other work moves RSS too)
    assert trim.status() == {"heap_trims": 1, "heap_trim_released_bytes": released}
    del kept


def test_heap_trim_runs_after_work_on_its_thread_and_at_most_once_an_interval():
    calls, first = [], threading.Event()

    def fake_trim() -> int:
        calls.append(1)
        first.set()
        return 1

    trim = HeapTrim(min_interval_s=60.0, trim=fake_trim)
    assert not calls  # nothing before work ends
    trim.after_work()
    assert first.wait(10), "no trim after work"
    trim.after_work()
    trim.after_work()  # within the interval: coalesced, not run now
    assert len(calls) == 1
    trim.stop()  # ends the wait without another trim
