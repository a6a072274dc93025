"""OpenAI's wire format: request bodies checked field by field, responses and stream chunks built.

Nothing here touches the model: a bad field is an ``ApiError`` (status 400, OpenAI's
error body naming the field) before a request is queued. Fields that change what a
response means and that we do not implement (``n`` > 1, ``logprobs``, ``echo``,
``tools``, penalties) are refused rather than ignored; fields that only describe the
client (``user``, ``metadata``, ...) are ignored, as llama-server does.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

MAX_BODY_BYTES = 8 << 20  # a request body larger than this is refused before it is parsed
MAX_STOP = 4  # OpenAI's limit on stop sequences
ROLES = ("system", "developer", "user", "assistant", "tool")
# Accepted at their neutral value only: anything else would be silently wrong output.
NEUTRAL = {"n": 1, "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False),
           "best_of": (None, 1), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
           "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []),
           "functions": (None, []), "response_format": (None, {"type": "text"})}


class ApiError(Exception):
    """An error response: HTTP ``status`` and OpenAI's body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message, type="invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class Sampling:
    """What both endpoints share: the generation bound and the sampler."""
    max_tokens: int | None = None  # None: up to the context
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


@dataclass
class ChatRequest(Sampling):
    messages: list = field(default_factory=list)  # [{"role", "content"}], content a string


@dataclass
class CompletionRequest(Sampling):
    prompt: str | list | None = None  # text, or token ids


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
        raise bad(None, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body, name, default, lo, hi, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < lo or v > hi or (lo_open and v == lo):
        raise bad(name, f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    return float(v)


def _sampling(body, req: Sampling, max_names=("max_tokens",)):
    for name, ok in NEUTRAL.items():
        if name in body and body[name] not in (ok if isinstance(ok, tuple) else (ok,)):
            raise bad(name, f"{name} = {json.dumps(body[name])[:80]} is not supported by this server")
    if "model" in body and not isinstance(body["model"], str):
        raise bad("model", "model must be a string")
    for name in max_names:
        v = body.get(name)
        if v is not None:
            if not _is_int(v) or v < 1:
                raise bad(name, f"{name} must be an integer >= 1, got {v!r}")
            req.max_tokens = v
    req.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    req.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -1 <= seed < 2**63):
        raise bad("seed", f"seed must be an integer in [0, 2^63) (or -1: random), got {seed!r}")
    req.seed = None if seed in (None, -1) else seed
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise bad("stop", f"stop must be a non-empty string or a list of at most {MAX_STOP} of them")
    req.stop = tuple(dict.fromkeys(stops))
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad("stream", f"stream must be true or false, got {stream!r}")
    req.stream = bool(stream)
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
            raise bad("stream_options", "stream_options must be an object like {\"include_usage\": true}")
        req.include_usage = opts.get("include_usage", False)
    return req


def _content(i, m) -> str:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    c = m.get("content")
    if c is None and m.get("role") == "assistant":
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts "
              "(images, audio and files are not supported)")


def parse_chat(body: dict) -> ChatRequest:
    req = _sampling(body, ChatRequest(), ("max_tokens", "max_completion_tokens"))
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "messages must be a non-empty list of {\"role\", \"content\"} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object")
        if m.get("role") not in ROLES:
            raise bad(f"messages[{i}].role", f"messages[{i}].role must be one of {', '.join(ROLES)}, "
                      f"got {json.dumps(m.get('role'))[:40]}")
        req.messages.append({"role": m["role"], "content": _content(i, m)})
    return req


def parse_completion(body: dict) -> CompletionRequest:
    req = _sampling(body, CompletionRequest())
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        req.prompt = p
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        req.prompt = list(p)
    else:
        raise bad("prompt", "prompt must be a string or a non-empty list of token ids (one prompt per request)")
    return req


def check_context(req: Sampling, n_prompt: int, n_ctx: int) -> int:
    """The number of tokens to generate at most, or a 400 when prompt and ``max_tokens`` do not
    fit the context (OpenAI's ``context_length_exceeded``)."""
    room = n_ctx - n_prompt
    if req.max_tokens is None and room >= 1:
        return room
    if req.max_tokens is None or req.max_tokens > room:
        asked = "" if req.max_tokens is None else f" + {req.max_tokens} to generate"
        raise bad("messages" if isinstance(req, ChatRequest) else "prompt",
                  f"this model's context is {n_ctx} tokens; the request has {n_prompt} prompt tokens{asked}",
                  code="context_length_exceeded")
    return req.max_tokens


# ------------------------------------------------------------------ responses

def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def response(kind: str, rid: str, model: str, text: str, finish_reason: str, use: dict) -> dict:
    """A whole (non-streamed) ``chat.completion`` or ``text_completion``."""
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
               "finish_reason": finish_reason} if kind == "chat" else
              {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason})
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], "usage": use}


def chunk(kind: str, rid: str, model: str, created: int, text: str | None = None, finish_reason=None,
          use: dict | None = None, role: bool = False, no_choices: bool = False) -> dict:
    """One streamed chunk: a text delta, the first (``role``), the last (``finish_reason`` and
    ``usage``), or with ``no_choices`` the usage-only chunk ``stream_options.include_usage`` asks for."""
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    out = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
           "created": created, "model": model, "choices": [] if no_choices else [choice]}
    if use is not None:
        out["usage"] = use
    return out


def sse(obj) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line (``obj`` a string: as it is)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
