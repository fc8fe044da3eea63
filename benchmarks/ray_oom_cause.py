"""What reaches the router when Ray's memory monitor kills an actor mid-call, and the cause cluster/router/faults.py
makes of it. A private local Ray is started with the monitor's threshold set just above the node's usage at start
(`RAY_memory_usage_threshold`, polled every 100 ms); a restartable actor then grows in 128 MiB steps until the
monitor kills it. Prints the error's type, its first lines, `death_cause` of it, Ray's worker-table record of the
killed process and the cause the router makes of both, and whether the actor came back.

A check, not a test: the threshold is a fraction of the whole machine's memory, so on a shared machine another
process's growth moves when it fires (and a threshold too low would kill whatever Ray runs).

    python benchmarks/ray_oom_cause.py [--headroom-mib 1024] [--out results/ray_oom_cause.txt]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from pdllm.cluster.common.node_memory import node_memory

MIB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--headroom-mib", type=int, default=1024, help="the threshold this far above the usage at start")
    ap.add_argument("--max-grow-mib", type=int, default=4096, help="the actor stops growing here (bounded)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    used, total = node_memory()
    threshold = (used + args.headroom_mib * MIB) / total
    os.environ["RAY_memory_usage_threshold"] = f"{threshold:.4f}"  # the raylet started below inherits these
    os.environ["RAY_memory_monitor_refresh_ms"] = "100"
    import ray
    from pdllm.cluster.router.faults import death_cause, death_message, ray_exit_cause, ray_worker_exit

    lines = [
        f"ray_oom_cause {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, ray {ray.__version__}; "
        f"node used {used / MIB:.0f} of {total / MIB:.0f} MiB at start, threshold {threshold:.4f} "
        f"(+{args.headroom_mib} MiB)"
    ]
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:

        @ray.remote(max_restarts=1, max_task_retries=0)
        class Grower:
            def __init__(self) -> None:
                self.held: list[bytes] = []

            def pid(self) -> int:
                return os.getpid()

            def grow(self, limit_mib: int) -> int:
                while len(self.held) * 128 < limit_mib:
                    self.held.append(b"\x01" * (128 * MIB))
                    time.sleep(0.05)  # lets the monitor's 100 ms poll see each step
                return len(self.held) * 128

        actor = Grower.remote()
        first = ray.get(actor.pid.remote(), timeout=60)
        started = time.monotonic()
        try:
            grown = ray.get(actor.grow.remote(args.max_grow_mib), timeout=120)
            lines.append(f"not killed: grew to {grown} MiB (threshold not reached; raise --max-grow-mib)")
        except ray.exceptions.RayError as e:
            text = [line for line in str(e).splitlines() if line.strip()]
            lines.append(f"killed after {time.monotonic() - started:.1f} s: {type(e).__module__}.{type(e).__name__}")
            lines.extend(f"  | {line[:200]}" for line in text[:6])
            cause = death_cause(e)
            lines.append(f"death_cause of the error: {cause!r}")
            node = ray.get_runtime_context().get_node_id()  # one node: the actor's
            exit_type, noted = ray_worker_exit(first, node), ray_exit_cause(first, node)
            cause = noted or cause  # what the router does with a cause-less death (cluster/router/faults.py, _lost)
            lines.append(f"Ray's worker table: exit type {exit_type}; ray_exit_cause {noted!r}")
            lines.append(f"the router's line: {death_message('decode', cause, True)!r}")
        again = ray.get(actor.pid.remote(), timeout=60)
        lines.append(f"actor back: pid {first} -> {again} ({'restarted' if again != first else 'same process'})")
    finally:
        ray.shutdown()
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
