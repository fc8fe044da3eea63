"""This process's memory and thread count from /proc (Linux), for health reports and the load benchmark.

Every actor and the API server report their own figures, so a leak shows up where it happens whatever node it is
on; elsewhere than Linux the values are None.
"""

from __future__ import annotations

import threading
from pathlib import Path


def process_stats(pid: int | str = "self") -> dict:
    """{"rss_bytes", "peak_rss_bytes", "threads", "rss_anon_bytes", "rss_shmem_bytes"} of `pid` (VmRSS, VmHWM,
    Threads, RssAnon, RssShmem from /proc/PID/status). The split says whether a resident set is the process's own
    heap (anon) or shared memory it has mapped (shmem: e.g. Ray's object store pages it wrote or read)."""
    threads = threading.active_count() if pid == "self" else None
    out: dict = {"rss_bytes": None, "peak_rss_bytes": None, "threads": threads}
    out.update(rss_anon_bytes=None, rss_shmem_bytes=None)
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    fields = {"VmRSS": "rss_bytes", "VmHWM": "peak_rss_bytes", "Threads": "threads", "RssAnon": "rss_anon_bytes"}
    fields["RssShmem"] = "rss_shmem_bytes"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            parts = value.split()
            out[fields[key]] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out
