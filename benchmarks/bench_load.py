"""Bounded load test: N concurrent clients on loopback send a fixed number of requests per round to a `pdllm serve`
process (the real command: embedded cluster with a private Ray, embedded Valkey, one prefill and one decode actor,
the bundled model), for several rounds. Per round: p50/p99/max latency, requests/s, errors (any non-OK status,
and any answer that differs from the answer the same request got before), and the server process's peak RSS in
that round (VmHWM, reset before each round through /proc/PID/clear_refs), plus the actors' RSS after it. A server
that leaks per request shows a peak that climbs from round to round; the last line compares the last round with
the first. `--api grpc,http` runs the rounds over the gRPC API and then over the OpenAI-compatible HTTP API of the
same server (`--http-port`, the official `openai` client, completions with the `question` field); an HTTP answer
that differs from the gRPC warm-up answer of the same request counts as an error too.

    python benchmarks/bench_load.py                  # 32 clients, 3 rounds x 96 requests; about 1 min on 2 cores
    python benchmarks/bench_load.py --api grpc,http --clients 8 --rounds 2 --requests 32 --out /tmp/load
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from pdllm.cluster.common.proc_stats import process_stats
from pdllm.cluster.kv.redis_server import free_port

from pdllm.client import Client
from pdllm.load_client import LoadRequest, run_round

TOKEN = "bench-load-token"
PARAMS = {"gen_length": 16, "block_length": 16, "steps": 8}
RSS_GROWTH_LIMIT = 0.05  # a last-round peak more than 5% over the first round's is reported as growth
ROOT = Path(__file__).resolve().parent.parent


def workload(requests: int) -> list[LoadRequest]:
    """`requests` questions over four short documents (24 distinct requests, repeated in order)."""
    line = "Doc {d} item {i}: the value is {v}."
    docs = [" ".join(line.format(d=d, i=i, v=(d * 97 + i * 31) % 1000) for i in range(12)) for d in range(4)]
    questions = [f"What is the value of item {q}?" for q in (1, 4, 7, 9, 10, 11)]
    distinct = [LoadRequest(doc, question, PARAMS) for doc in docs for question in questions]
    return [distinct[i % len(distinct)] for i in range(requests)]


def start_server(
    port: int, http_port: int, log: Path, max_running: int, max_waiting: int, timeout_s: float
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pdllm.cli", "serve", "--port", str(port), "--auth-token", TOKEN, "--no-batch"]
    cmd += ["--http-port", str(http_port)]
    cmd += ["--no-metrics", "--max-running", str(max_running), "--max-waiting", str(max_waiting)]
    out = log.open("w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    proc.command = " ".join(cmd[1:])  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout_s
    while "pdllm serving on" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"pdllm serve did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def reset_peak_rss(pid: int) -> bool:
    """Start a new VmHWM window for `pid` (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def actor_rss(health: dict) -> dict[str, int]:
    return {a["name"]: int(a["process"]["rss_bytes"]) for a in health["backend"]["actors"] if a.get("process")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=96, help="requests per round")
    parser.add_argument("--max-running", type=int, default=4, help="pdllm serve --max-running")
    parser.add_argument("--max-waiting", type=int, default=64, help="pdllm serve --max-waiting")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="deadline of every call")
    parser.add_argument("--api", default="grpc", help="comma list of grpc, http: the APIs the rounds go through")
    parser.add_argument("--out", help="write <out>.json and <out>.txt (default benchmarks/results/load_<date>_cpuN)")
    args = parser.parse_args()
    date = datetime.now(timezone.utc)
    out = args.out or str(ROOT / "benchmarks" / "results" / f"load_{date:%Y-%m-%d}_cpu{os.cpu_count()}")
    env = "".join(f"{k}={os.environ[k]} " for k in ("MALLOC_ARENA_MAX",) if k in os.environ)  # changes RSS
    command = (
        env
        + "python benchmarks/bench_load.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out")
    )
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "processor": platform.processor() or platform.machine()}  # fmt: skip
    requests = workload(args.requests)
    apis = [a.strip() for a in args.api.split(",") if a.strip()]
    if not apis or set(apis) - {"grpc", "http"}:
        parser.error("--api takes a comma list of grpc and http")
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        t_start = time.perf_counter()
        http_port = free_port()
        proc = start_server(free_port(), http_port, Path(tmp) / "serve.log", args.max_running, args.max_waiting, 300)
        address = Path(tmp, "serve.log").read_text().split("pdllm serving on ")[1].split()[0]
        targets = {"grpc": address, "http": f"http://127.0.0.1:{http_port}"}
        started_s = time.perf_counter() - t_start
        try:
            with Client(address, auth_token=TOKEN, timeout_s=60, retries=0) as client:
                distinct = list({(r.context, r.question): r for r in requests}.values())
                warm = run_round(address, distinct, 1, TOKEN, args.timeout_s)  # every document prefilled once
                if warm.errors:
                    raise RuntimeError(f"the warm-up pass failed: {warm.errors[:3]}")
                seen = {(r.context, r.question): a for r, a in zip(distinct, warm.answers, strict=True)}
                plan = [(api, n) for api in apis for n in range(1, args.rounds + 1)]
                for n, (api, _) in enumerate(plan, 1):
                    resettable = reset_peak_rss(proc.pid)
                    result = run_round(targets[api], requests, args.clients, TOKEN, args.timeout_s, api=api)
                    stats = process_stats(proc.pid)
                    health = client.health()
                    differ = sum(
                        1
                        for r, a in zip(requests, result.answers, strict=True)
                        if a is not None and a != seen[(r.context, r.question)]
                    )
                    rounds.append(
                        {
                            "round": n,
                            "api": api,
                            "requests": len(requests),
                            "clients": args.clients,
                            "answered": len(result.latencies_s),
                            "errors": len(result.errors) + differ,
                            "error_samples": result.errors[:5],
                            "answers_differing_from_warmup": differ,
                            "p50_ms": round(1000 * result.percentile(0.5), 1),
                            "p99_ms": round(1000 * result.percentile(0.99), 1),
                            "max_ms": round(1000 * max(result.latencies_s, default=float("nan")), 1),
                            "requests_per_s": round(len(result.latencies_s) / result.wall_s, 2),
                            "server_peak_rss_mib": round(stats["peak_rss_bytes"] / 2**20, 1),
                            "peak_is_this_round": resettable,
                            "server_threads_after": stats["threads"],
                            "actor_rss_mib_after": {k: round(v / 2**20, 1) for k, v in actor_rss(health).items()},
                            "open_streams_after": health["streams"]["open"],
                            "refused_total": health["admission"]["refused"],
                        }
                    )
                    print(f"round {n}: {rounds[-1]}", flush=True)
        finally:
            stop_server(proc)
    peaks = [r["server_peak_rss_mib"] for r in rounds]
    growth = (peaks[-1] - peaks[0]) / peaks[0]
    result = {
        "command": command,
        "server": proc.command,  # type: ignore[attr-defined]
        "date": date.isoformat(timespec="seconds"),
        "machine": machine,
        "params": PARAMS,
        "server_start_s": round(started_s, 1),
        "rounds": rounds,
        "peak_rss_growth_first_to_last": round(growth, 4),
        "peak_rss_grew": growth > RSS_GROWTH_LIMIT,
    }
    lines = [f"# {command}", f"# server: {result['server']}", f"# {result['date']}  {machine}", ""]
    lines.append(f"params {PARAMS}; server started in {started_s:.1f} s; one warm-up pass over the distinct requests")
    header = "round  api   clients  requests  errors   p50 ms   p99 ms   max ms  req/s  server peak RSS MiB"
    lines.append(header + "  actors RSS MiB")
    for r in rounds:
        actors = " ".join(f"{v:.0f}" for v in r["actor_rss_mib_after"].values())
        lines.append(
            f"{r['round']:>5}  {r['api']:<4}  {r['clients']:>7}  {r['requests']:>8}  {r['errors']:>6}  "
            f"{r['p50_ms']:>7.0f}  {r['p99_ms']:>7.0f}  {r['max_ms']:>7.0f}  {r['requests_per_s']:>5.1f}  "
            f"{r['server_peak_rss_mib']:>19.1f}  {actors}"
        )
    verdict = "grew" if result["peak_rss_grew"] else "did not grow"
    limit = f"limit +{RSS_GROWTH_LIMIT:.0%}"
    lines.append(f"server peak RSS, last round vs first: {100 * growth:+.1f}% ({verdict}; {limit})")
    text = "\n".join(lines)
    Path(out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(out + ".txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
