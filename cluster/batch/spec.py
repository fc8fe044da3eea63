"""A submitted batch checked and turned into plain job specs before anything reaches Redis.

A job spec is {"id", "question", "params", and "context" or "document_ref"}; params are complete (defaults filled)
so a job runs the same way whichever worker picks it up, whenever. Every problem names the job it is in.
"""

from __future__ import annotations

import hashlib
import json
import re

from pdllm.cluster.api import convert as conv
from pdllm.cluster.api.params import ApiLimits, complete_params, decode_text

from pdllm.errors import InvalidRequest

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def check_id(kind: str, value: str) -> str:
    if not ID_PATTERN.match(value or ""):
        raise InvalidRequest(f"{kind} {value!r} must be 1-128 characters of letters, digits, '.', '_', ':' or '-'")
    return value


def fingerprint(jobs: list[dict]) -> str:
    """Identity of a batch's content: the same jobs give the same fingerprint (resubmission is a no-op)."""
    return hashlib.sha256(json.dumps(jobs, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def jobs_from_request(request, modes: tuple[str, ...], limits: ApiLimits) -> tuple[str, list[dict], dict[str, str]]:
    """(batch_id, job specs, {document ref: text}) from a SubmitBatchRequest; InvalidRequest on any bad field."""
    batch_id = check_id("batch_id", request.batch_id)
    if not request.jobs:
        raise InvalidRequest("a batch needs at least one job")
    if len(request.jobs) > limits.max_batch_jobs:
        raise InvalidRequest(f"{len(request.jobs)} jobs, more than the limit of {limits.max_batch_jobs} per batch")
    documents: dict[str, str] = {}
    for doc in request.documents:
        text = decode_text(f"document {doc.ref[:16]}", doc.content, limits.max_context_bytes)
        if hashlib.sha256(bytes(doc.content)).hexdigest() != doc.ref:
            raise InvalidRequest(f"document ref {doc.ref!r} is not the sha256 of its content")
        documents[doc.ref] = text
    defaults = conv.params_to_dict(request.default_params)
    jobs, seen = [], set()
    for msg in request.jobs:
        job_id = check_id("job id", msg.id)
        if job_id in seen:
            raise InvalidRequest(f"job id {job_id!r} appears twice in batch {batch_id!r}")
        seen.add(job_id)
        try:
            spec = {
                "id": job_id,
                "question": decode_text("question", msg.question, limits.max_question_bytes),
                "params": complete_params({**defaults, **conv.params_to_dict(msg.params)}, modes, limits),
                "checked": True,  # against the server's limits: the worker runs them without a second check
            }
            if msg.WhichOneof("source") == "document_ref":
                spec["document_ref"] = msg.document_ref
            else:
                spec["context"] = decode_text("context", msg.context, limits.max_context_bytes)
        except InvalidRequest as exc:
            raise InvalidRequest(f"job {job_id!r}: {exc}") from None
        jobs.append(spec)
    return batch_id, jobs, documents
