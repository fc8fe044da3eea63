"""OpenAI's chat and completion request bodies as one pdllm request, and pdllm answers in OpenAI's shapes.

Mapping (the same for every client of the HTTP API):
- chat: system (and developer) messages are the instruction; the earlier user and assistant messages are the
  context (user text as is, assistant text as "Answer: ...", joined by blank lines, so a conversation's earlier turns
  keep their chunks); the last message, from the user, is the question. A conversation of one user message is
  split like a completion prompt.
- completions: `prompt` is context plus question: the `question` field (extra_body) splits them explicitly, else the
  prompt's last non-empty line is the question.
Responses carry pdllm's generation statistics (chunks prefilled and reused, steps, timings) under the extra key
"pdllm" (unary, and the usage chunk of a stream). The instruction travels as the `instruction` parameter: kept
whole before the context, never chunked or dropped by selection.
`max_tokens` (`max_completion_tokens`) is the answer length; when it is given without `block_length` and `steps`,
the block is the largest divisor of it not above the default block and one token is unmasked per step (the default
schedule, scaled). The dLLM knobs (steps, block_length, threshold, top_k, chunk_size, chunking, keep_ratio, mode,
remasking, scoring, selected_kv, preset, keep_question_kv) are accepted as extra fields. Every other field is either
one of OpenAI's with a neutral value, or a 400 naming it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pdllm.cluster.api.params import DEFAULT_PARAMS

from pdllm.errors import InvalidRequest

DLLM_FIELDS = (
    "steps", "block_length", "threshold", "top_k", "chunk_size", "chunking", "keep_ratio", "mode", "remasking",
    "scoring", "selected_kv", "preset", "keep_question_kv",
)  # fmt: skip
# OpenAI fields accepted only with the value that asks for nothing this server would not do.
NEUTRAL = {
    "n": (None, 1),
    "top_p": (None, 1, 1.0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, False, True),
    "response_format": (None, {"type": "text"}),
}
COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "temperature", "seed", "stop", "user"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"} | set(DLLM_FIELDS) | set(NEUTRAL)
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "question"} | set(DLLM_FIELDS) | set(NEUTRAL)
MAX_STOPS = 4
ASSISTANT_PREFIX = "Answer: "


@dataclass(frozen=True)
class OpenAIRequest:
    """One chat or completion request in pdllm's terms."""

    model: str
    context: str
    question: str
    params: dict  # pdllm API params (cluster/api/params.py keys) the client set or implied
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    length_field: str | None  # "max_tokens" / "max_completion_tokens" when the client set the answer length


def _text(value, where: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{where}[{i}]: only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequest(f"{where} must be a string or a list of text parts")


def split_last_line(text: str, field: str) -> tuple[str, str]:
    """(context, question): the last non-empty line is the question, everything before it the context."""
    lines = text.rstrip().split("\n")
    question = lines[-1].strip()
    context = "\n".join(lines[:-1]).rstrip()
    if not question:
        raise InvalidRequest(f"{field} is empty")
    if not context.strip():
        raise InvalidRequest(
            f"{field} has a single line: put the document before the question's line (or give the question "
            "in the `question` field)"
        )
    return context, question


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        known = ", ".join(DLLM_FIELDS)
        raise InvalidRequest(f"unknown parameter(s): {', '.join(unknown)} (dLLM parameters: {known})")
    for key, neutral in NEUTRAL.items():
        if key in body and body[key] not in neutral:
            raise InvalidRequest(f"{key}={body[key]!r} is not supported by this server")


def _stops(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise InvalidRequest(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them")
    return tuple(stops)


def _params(body: dict, length_keys: tuple[str, ...], defaults: dict) -> tuple[dict, str | None]:
    params = {k: body[k] for k in (*DLLM_FIELDS, "temperature", "seed") if body.get(k) is not None}
    given = [k for k in length_keys if body.get(k) is not None]
    if len(given) > 1:
        raise InvalidRequest(f"give one of {' and '.join(given)}, not both")
    if not given:
        return params, None
    length = body[given[0]]
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise InvalidRequest(f"{given[0]} must be a positive integer, got {length!r}")
    params["gen_length"] = length
    scaled_schedule(params, {**DEFAULT_PARAMS, **defaults})
    return params, given[0]


def scaled_schedule(params: dict, defaults: dict) -> None:
    """A block length and step count that fit `params["gen_length"]`, where the client set neither: the largest
    divisor of the length not above the default block, and (fixed-step rule) one token unmasked per step."""
    length = params["gen_length"]
    if "block_length" not in params:
        block = next(d for d in range(min(length, int(defaults["block_length"])), 0, -1) if length % d == 0)
        steps = params.get("steps")
        if steps is None or steps % (length // block) == 0:
            params["block_length"] = block
    if "steps" not in params:
        params["steps"] = length


def _common(body: dict, allowed: set[str]) -> tuple[str, bool, bool, tuple[str, ...]]:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    _check_fields(body, allowed)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required (GET /v1/models lists it)")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise InvalidRequest("stream must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise InvalidRequest("stream_options may hold only include_usage")
    return model, stream, bool(options.get("include_usage")), _stops(body.get("stop"))


def parse_chat(body: dict, defaults: dict) -> OpenAIRequest:
    """A /v1/chat/completions body; InvalidRequest names the field that is wrong."""
    model, stream, usage, stop = _common(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    instruction, turns = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise InvalidRequest(f"messages[{i}] must be an object with a role and content")
        role, text = msg["role"], _text(msg.get("content"), f"messages[{i}].content")
        if role in ("system", "developer"):
            instruction.append(text)
        elif role in ("user", "assistant"):
            turns.append((role, text))
        else:
            raise InvalidRequest(f"messages[{i}].role {role!r} is not supported (system, developer, user, assistant)")
    if not turns or turns[-1][0] != "user":
        raise InvalidRequest("messages: the last user or assistant message must be from the user (the question)")
    if len(turns) == 1:
        context, question = split_last_line(turns[0][1], f"messages[{len(messages) - 1}].content")
    else:
        rendered = [text if role == "user" else ASSISTANT_PREFIX + text for role, text in turns[:-1]]
        context, question = "\n\n".join(rendered), turns[-1][1]
    params, length_field = _params(body, ("max_tokens", "max_completion_tokens"), defaults)
    if instruction:  # kept whole before the context, never chunked or dropped by selection
        params["instruction"] = "\n\n".join(instruction)
    return OpenAIRequest(model, context, question, params, stream, usage, stop, length_field)


def parse_completion(body: dict, defaults: dict) -> OpenAIRequest:
    """A /v1/completions body; InvalidRequest names the field that is wrong."""
    model, stream, usage, stop = _common(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt must be one string (token arrays and several prompts are not supported)")
    question = body.get("question")
    if question is None:
        context, question = split_last_line(prompt, "prompt")
    elif not isinstance(question, str):
        raise InvalidRequest("question must be a string")
    else:
        context = prompt
    params, length_field = _params(body, ("max_tokens",), defaults)
    return OpenAIRequest(model, context, question, params, stream, usage, stop, length_field)


# -- answers ---------------------------------------------------------------------------------------------------
def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the first stop sequence, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def finish_reason(stats: dict, gen_length: int, stopped: bool) -> str:
    """ "stop" when an end token or a stop sequence ended the answer, "length" when it filled `gen_length`."""
    return "stop" if stopped or int(stats.get("generated_tokens", 0)) < gen_length else "length"


def usage(stats: dict) -> dict:
    prompt = int(stats.get("context_tokens", 0)) + int(stats.get("question_tokens", 0))
    completion = int(stats.get("generated_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def now() -> int:
    return int(time.time())


def _response(obj: str, rid: str, model: str, created: int, choice: dict, stats: dict) -> dict:
    body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    return {**body, "usage": usage(stats), "pdllm": stats}


def chat_response(rid: str, model: str, created: int, text: str, reason: str, stats: dict) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None}
    return _response("chat.completion", rid, model, created, choice, stats)


def completion_response(rid: str, model: str, created: int, text: str, reason: str, stats: dict) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
    return _response("text_completion", rid, model, created, choice, stats)


def chat_chunk(rid: str, model: str, created: int, delta: dict, reason: str | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def completion_chunk(rid: str, model: str, created: int, text: str, reason: str | None = None) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, created: int, obj: str, stats: dict) -> dict:
    body = {"id": rid, "object": obj, "created": created, "model": model, "choices": []}
    return {**body, "usage": usage(stats), "pdllm": stats}


def model_card(info: dict, created: int) -> dict:
    return {
        "id": info.get("name", ""),
        "object": "model",
        "created": created,
        "owned_by": "pdllm",
        "root": info.get("model_id", ""),
        "max_model_len": info.get("max_length"),
    }


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
