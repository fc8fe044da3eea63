"""`pdllm status`: what a running server and its cluster look like right now, as a table (or JSON).

It asks the live server (the pdllm.v1 Health and ModelInfo RPCs); Health's detail carries the backend's own status
(in cluster mode the router's: actors, their GPUs and chunk stores, the Redis index, queues), the API's admission
queue and request counters, and the batch store's queue. `render_status` turns that dict into text and reads every
part defensively: a backend that reports less just shows fewer rows.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Mapping

from pdllm.errors import PdllmError

TOKEN_ENV = "PDLLM_AUTH_TOKEN"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the live cluster: actors, GPUs, chunk stores, index, queues")
    p.add_argument("--server", default="localhost:50051", help="address of `pdllm serve` (host:port)")
    p.add_argument("--auth-token", default=None, help=f"shared secret (default: ${TOKEN_ENV})")
    p.add_argument("--tls-ca", default=None, help="PEM CA file: connect with TLS")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.set_defaults(func=run)


def fetch_status(server: str, auth_token: str | None, tls_ca: str | None = None, timeout_s: float = 10.0) -> dict:
    """{"server", "serving", "model", **Health detail} from the live server."""
    from pdllm.client import Client

    with Client(server, auth_token=auth_token, tls_ca=tls_ca, timeout_s=timeout_s, retries=1) as client:
        health = client.health(timeout_s=timeout_s)
        model = client.model_info(timeout_s=timeout_s)
    return {"server": server, "model": model, **health}


def run(args: argparse.Namespace) -> int:
    token = args.auth_token or os.environ.get(TOKEN_ENV)
    try:
        status = fetch_status(args.server, token, args.tls_ca, args.timeout)
    except Exception as exc:  # connection refused, bad token, deadline: one line naming the server
        raise PdllmError(f"cannot get status from {args.server}: {exc}") from None
    print(json.dumps(status, indent=2, sort_keys=True, default=str) if args.json else render_status(status))
    return 0 if status.get("serving") else 1


# -- rendering ---------------------------------------------------------------------------------------------------
def _first(d: Mapping, *keys: str, default=None):
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def table(headers: list[str], rows: Iterable[list]) -> str:
    """Left-aligned columns separated by two spaces."""
    rows = [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _actors(backend: Mapping) -> list[dict]:
    """The backend's actors as a list of dicts with a name (it may report a list or a {name: info} mapping)."""
    actors = _first(backend, "actors", default=[])
    if isinstance(actors, Mapping):
        return [
            {"name": name, **(info if isinstance(info, Mapping) else {"state": info})} for name, info in actors.items()
        ]
    return [a for a in actors if isinstance(a, Mapping)]


def _store_cell(a: Mapping) -> str:
    store = a.get("store") if isinstance(a.get("store"), Mapping) else a
    used = _first(store, "used_bytes", "store_used_bytes", "bytes")
    cap = _first(store, "capacity_bytes", "store_capacity_bytes", "capacity")
    if used is None:
        return "-"
    if not cap:
        return human_bytes(used)
    return f"{human_bytes(used)} / {human_bytes(cap)} ({100.0 * float(used) / float(cap):.0f}%)"


def _state(a: Mapping) -> str:
    ok = _first(a, "healthy", "alive", "ok")
    if ok is None:
        return str(_first(a, "state", default="?"))
    if ok:
        return "up"
    state = a.get("state")
    return state.upper() if isinstance(state, str) and state not in ("", "up") else "DOWN"


def _fault(a: Mapping) -> str:
    """The actor's restarts and its last death or silence with the time since (`2 restarts; out of memory, 41 s
    ago`)."""
    restarts = a.get("restarts")
    parts = [f"{_num(restarts)} restart{'' if restarts == 1 else 's'}"] if restarts else []
    fault = a.get("fault")
    if isinstance(fault, Mapping) and fault.get("cause"):
        since = fault.get("since_s")
        parts.append(f"{fault['cause']}, {since:.0f} s ago" if isinstance(since, (int, float)) else str(fault["cause"]))
    return "; ".join(parts) or "-"


def _gpus(a: Mapping) -> str:
    gpus = _first(a, "gpu_ids", "gpus", "gpu")
    if isinstance(gpus, (list, tuple)):
        return ",".join(str(int(g)) if isinstance(g, float) and g.is_integer() else str(g) for g in gpus) or "-"
    return "-" if gpus is None else str(gpus)


def _num(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))  # protobuf Struct carries every number as a double
    return str(v)


def render_status(status: Mapping) -> str:
    """The status dict of `fetch_status` (or a backend's own status dict) as a human-readable report."""
    backend = status.get("backend") if isinstance(status.get("backend"), Mapping) else status
    model = status.get("model") if isinstance(status.get("model"), Mapping) else {}
    out: list[str] = []
    serving = "serving" if status.get("serving", backend.get("serving")) else "NOT SERVING"
    head = f"{status.get('server', 'server')}: {serving}"
    if model:
        head += f"  model {model.get('name', '?')} ({model.get('family', '?')})"
    kind = _first(backend, "backend", "kind")
    if kind:
        head += f"  backend {kind}"
    out.append(head)

    actors = _actors(backend)
    if actors:
        rows = [
            [
                a.get("name"),
                _first(a, "role", "kind"),
                _first(a, "node", "node_ip", "host"),
                _gpus(a),
                _state(a),
                _store_cell(a),
                _num(_first(a, "chunks", "num_chunks", default="-")),
                _num(_first(a, "queue", "queue_depth", "pending", default="-")),
                _num(_first(a, "running", "active", default="-")),
                _fault(a),
            ]
            for a in sorted(actors, key=lambda a: (str(_first(a, "role", "kind", default="")), str(a.get("name"))))
        ]
        headers = ["ACTOR", "ROLE", "NODE", "GPU", "STATE", "CHUNK STORE", "CHUNKS", "QUEUE", "RUNNING", "FAULTS"]
        out += ["", table(headers, rows)]
        up = sum(1 for a in actors if _state(a) == "up")
        out.append(f"{up}/{len(actors)} actors up")

    index = backend.get("index")
    if isinstance(index, Mapping):
        chunks = _num(_first(index, "chunks", "entries", "size", default="-"))
        out += ["", f"chunk index: {chunks} chunks, {human_bytes(_first(index, 'bytes', 'kv_bytes'))} of KV indexed"]
    elif index is not None:
        out += ["", f"chunk index: {_num(index)} chunks"]

    queues: dict[str, object] = {}
    if isinstance(backend.get("queues"), Mapping):
        queues.update(backend["queues"])
    admission = status.get("admission")
    if isinstance(admission, Mapping):
        queues.update({f"api_{k}": v for k, v in admission.items()})
    batches = status.get("batches")
    if isinstance(batches, Mapping):
        queues.update({f"batch_{k}": v for k, v in batches.items() if k != "redis"})
    if queues:
        out += ["", table(["QUEUE", "DEPTH"], [[k, _num(v)] for k, v in sorted(queues.items())])]
    if isinstance(batches, Mapping) and "redis" in batches:
        out.append(f"batch store redis: {'up' if batches['redis'] else 'DOWN'}")

    requests = status.get("requests")
    if isinstance(requests, Mapping) and requests:
        out += ["", "requests: " + ", ".join(f"{k} {_num(v)}" for k, v in sorted(requests.items()))]
    return "\n".join(out)
