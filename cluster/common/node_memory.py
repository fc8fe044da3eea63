"""How full this node's memory is, read as Ray's memory monitor reads it, and the admission line derived from the
monitor's kill threshold.

Why: Ray's memory monitor kills a worker once the node's used memory passes `RAY_memory_usage_threshold` (0.95 of
the node's memory by default, cgroup-aware); actors that stop taking new work a margin below that line leave the
work they hold room to finish instead of being killed mid-job. The line follows the deployment's own threshold, so
it needs no per-machine setting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

RAY_THRESHOLD_ENV = "RAY_memory_usage_threshold"
RAY_DEFAULT_THRESHOLD = 0.95  # Ray's default memory_usage_threshold
REFUSE_MARGIN = 0.05  # refuse new work this fraction of the node's memory below Ray's kill threshold
LOWEST_DERIVED = 0.5  # a derived line never lower than this (a threshold set very low is a test's, not a budget)


def ray_threshold(env: Mapping[str, str] = os.environ) -> float:
    """Ray's memory monitor threshold in this process's environment (Ray's workers inherit the raylet's)."""
    try:
        value = float(env.get(RAY_THRESHOLD_ENV, RAY_DEFAULT_THRESHOLD))
    except ValueError:
        return RAY_DEFAULT_THRESHOLD
    return value if 0.0 < value <= 1.0 else RAY_DEFAULT_THRESHOLD


def derived_refuse_fraction(env: Mapping[str, str] = os.environ) -> float:
    """The default admission line: Ray's threshold less REFUSE_MARGIN (0.90 with Ray's defaults)."""
    return max(LOWEST_DERIVED, round(ray_threshold(env) - REFUSE_MARGIN, 4))


def _fields(path: Path) -> dict[str, int]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.replace(":", " ", 1).partition(" ")
        parts = value.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def node_memory(proc: str = "/proc", cgroup: str = "/sys/fs/cgroup") -> tuple[int, int] | None:
    """(used, total) bytes of this node's memory: MemTotal - MemAvailable, or the cgroup v2 limit and its usage
    less inactive file pages where a limit is set and smaller; None where neither can be read (not Linux)."""
    try:
        info = _fields(Path(proc) / "meminfo")
        total, used = info["MemTotal"], info["MemTotal"] - info["MemAvailable"]
    except (OSError, KeyError):
        return None
    try:
        limit = (Path(cgroup) / "memory.max").read_text().strip()
        if limit.isdigit() and int(limit) < total:
            current = int((Path(cgroup) / "memory.current").read_text())
            inactive = _fields(Path(cgroup) / "memory.stat").get("inactive_file", 0)
            total, used = int(limit), max(0, current - inactive)
    except (OSError, ValueError):
        pass
    return used, total
