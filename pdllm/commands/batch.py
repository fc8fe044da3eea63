"""`pdllm batch submit|status|results|cancel|list`: batch jobs on a running server.

A jobs file is JSONL, one job a line: {"id", "question", "params"?, "instruction"? (kept before the context; the
same as params.instruction), and one of "context" (text), "context_file"
(a path, relative to the jobs file; each distinct file is sent once and shared) or "document_ref" (the sha256 of a
document the server already holds)}. The batch id defaults to a hash of the file, so submitting the same file
twice is a no-op. `--wait` shows progress on stderr (a bar on a terminal, periodic lines otherwise; `--quiet`
silences it) until the batch finishes, and exits with code 1 when any job failed or was cancelled. `--id-only`
prints the batch id alone, for scripts: `ID=$(pdllm batch submit jobs.jsonl --id-only)`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
from pathlib import Path

from pdllm.errors import InvalidRequest

FINISHED = ("done", "cancelled")


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=os.environ.get("PDLLM_SERVER", "127.0.0.1:50051"), help="host:port")
    p.add_argument("--auth-token", default=None, help="shared secret of the server (default: $PDLLM_AUTH_TOKEN)")
    p.add_argument("--tls-ca", default=None, help="PEM CA file: connect with TLS")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="submit and follow batch jobs on a server")
    bsub = p.add_subparsers(dest="batch_command", required=True)
    s = bsub.add_parser("submit", help="submit a JSONL file of jobs")
    s.add_argument("jobs_file", help="JSONL, one job a line")
    s.add_argument("--batch-id", default=None, help="default: a hash of the file (resubmitting is a no-op)")
    s.add_argument(
        "--wait", action="store_true", help="follow progress until the batch finishes; exit 1 if a job failed"
    )
    s.add_argument("--id-only", action="store_true", help="print only the batch id (for scripts)")
    s.set_defaults(func=submit)
    st = bsub.add_parser("status", help="a batch's counters")
    st.add_argument("batch_id", help="the id `batch submit` printed")
    st.add_argument(
        "--wait", action="store_true", help="follow progress until the batch finishes; exit 1 if a job failed"
    )
    st.set_defaults(func=status)
    r = bsub.add_parser("results", help="results as JSONL, in submission order")
    r.add_argument("batch_id", help="the id `batch submit` printed")
    r.add_argument("-o", "--output", default=None, help="file to write (default: stdout)")
    r.set_defaults(func=results)
    c = bsub.add_parser("cancel", help="cancel the pending jobs of a batch")
    c.add_argument("batch_id", help="the id `batch submit` printed")
    c.set_defaults(func=cancel)
    ls = bsub.add_parser("list", help="recent batches")
    ls.add_argument("--limit", type=int, default=20, help="batches listed, newest first")
    ls.set_defaults(func=list_batches)
    for sp in (s, st, r, c, ls):
        add_server_args(sp)


def client_from_args(args: argparse.Namespace):
    from pdllm import progress
    from pdllm.client import Client

    progress.configure(quiet=args.quiet)
    token = args.auth_token or os.environ.get("PDLLM_AUTH_TOKEN")
    return Client(args.server, auth_token=token, tls_ca=args.tls_ca, timeout_s=args.timeout)


def read_jobs(path: Path) -> tuple[list[dict], dict[str, str]]:
    """Jobs and the shared documents they reference ({sha256: text})."""
    from pdllm.client import document_ref

    if not path.is_file():
        raise InvalidRequest(f"jobs file {path} does not exist")
    jobs, documents, by_file = [], {}, {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{path}:{n}: not JSON: {exc}") from None
        if not isinstance(job, dict) or "question" not in job:
            raise InvalidRequest(f"{path}:{n}: a job is an object with at least a question")
        job.setdefault("id", f"line-{n}")
        if "instruction" in job:
            job["params"] = {**(job.get("params") or {}), "instruction": job.pop("instruction")}
        if "context_file" in job:
            file = (path.parent / job.pop("context_file")).resolve()
            if file not in by_file:
                try:
                    text = file.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    raise InvalidRequest(f"{path}:{n}: cannot read context file {file}: {exc}") from None
                by_file[file] = document_ref(text)
                documents[by_file[file]] = text
            job["document_ref"] = by_file[file]
        jobs.append(job)
    if not jobs:
        raise InvalidRequest(f"{path} holds no jobs")
    return jobs, documents


def emit(args: argparse.Namespace, obj, text: str) -> None:
    print(json.dumps(obj) if args.json else text)


def describe(s: dict) -> str:
    return (
        f"{s['batch_id']}: {s['state']}  total={s['total']} done={s['done']} failed={s['failed']} "
        f"running={s['running']} pending={s['pending']} cancelled={s['cancelled']}"
    )


def follow(client, batch_id: str, poll_s: float = 0.5) -> dict:
    """Poll until the batch finishes, with its progress on stderr."""
    from pdllm.progress import Bar

    s = client.get_batch(batch_id)
    pause = threading.Event()
    with Bar(f"batch {batch_id}", s["total"], "jobs") as bar:
        while True:
            finished = s["done"] + s["failed"] + s["cancelled"]
            bar.update_to(finished, s["total"], f"failed {s['failed']}, running {s['running']}")
            if s["state"] in FINISHED and not (s["state"] == "cancelled" and s["running"]):
                return s
            pause.wait(poll_s)
            s = client.get_batch(batch_id)


def outcome(s: dict) -> int:
    """Exit code after waiting: 0 when every job is done, 1 when any failed or was cancelled."""
    return 0 if s["done"] == s["total"] else 1


def submit(args: argparse.Namespace) -> int:
    path = Path(args.jobs_file)
    jobs, documents = read_jobs(path)
    batch_id = args.batch_id or "b-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    with client_from_args(args) as client:
        out = client.submit_batch(batch_id, jobs, documents)
        verb = "submitted" if out["created"] else "already submitted"
        if args.wait:
            from pdllm import progress

            progress.note(f"{verb} {batch_id} ({len(jobs)} jobs)")
            out["batch"] = follow(client, batch_id)
    if args.id_only:
        print(batch_id)
    else:
        emit(args, out, f"{verb}: {describe(out['batch'])}")
    return outcome(out["batch"]) if args.wait else 0


def status(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        s = follow(client, args.batch_id) if args.wait else client.get_batch(args.batch_id)
    emit(args, s, describe(s))
    return outcome(s) if args.wait else 0


def results(args: argparse.Namespace) -> int:
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    n = 0
    try:
        with client_from_args(args) as client:
            for row in client.batch_results(args.batch_id):
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
    finally:
        if args.output:
            out.close()
    if args.output:
        print(f"wrote {n} results to {args.output}", file=sys.stderr)
    return 0


def cancel(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        s = client.cancel_batch(args.batch_id)
    emit(args, s, describe(s))
    return 0


def list_batches(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        batches = client.list_batches(args.limit)
    emit(args, batches, "\n".join(describe(s) for s in batches) or "no batches")
    return 0
