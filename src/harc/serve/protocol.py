"""The OpenAI chat-completions wire format: request parsing, error bodies, responses, stream chunks.

Decoding is greedy (harc.generation), so sampling fields (temperature, top_p, seed, penalties,
logit_bias, user) are accepted and ignored; fields that would change what comes back and that the
server cannot honour (n > 1, logprobs, tools, JSON response formats) are refused with a 400.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ROLES = {"system", "developer", "user", "assistant"}


class APIError(Exception):
    """A request the server refuses; rendered as an OpenAI error body with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[_TextPart] | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    # Clients send many optional OpenAI fields; unknown ones are ignored, as the OpenAI API does.
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[_Message]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = 1
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]  # roles checked, content as plain text
    max_tokens: int | None
    stream: bool
    include_usage: bool
    stop: list[str]


def _param(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("str", "list[_TextPart]"))


def parse_chat_request(body: bytes) -> ChatRequest:
    """Validate a request body; every problem is an APIError(400) naming the parameter."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid UTF-8", code="invalid_encoding") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON ({e.msg} at character {e.pos})",
                       code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body nests too deeply", code="invalid_json") from None
    try:  # "\ud800" escapes decode to lone surrogates, which no tokenizer or UTF-8 writer takes
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the request holds an unpaired UTF-16 surrogate escape",
                       code="invalid_encoding") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        req = _Request.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        missing = err["type"] == "missing"
        raise APIError(400, f"{_param(err['loc'])}: {err['msg']}", param=_param(err["loc"]),
                       code="missing_required_parameter" if missing else "invalid_value") from None
    if req.n != 1:
        raise APIError(400, "only n=1 is supported (decoding is greedy)", param="n",
                       code="unsupported_value")
    if req.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_value")
    if req.tools:
        raise APIError(400, "tools are not supported", param="tools", code="unsupported_value")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {'type': 'text'} is supported",
                       param="response_format", code="unsupported_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop takes at most 4 non-empty strings", param="stop",
                       code="invalid_value")
    return ChatRequest(req.model, _messages(req.messages),
                       req.max_completion_tokens or req.max_tokens, req.stream,
                       bool(req.stream_options and req.stream_options.include_usage), stop)


def _messages(messages: list[_Message]) -> list[dict[str, str]]:
    if not messages:
        raise APIError(400, "messages must hold at least one message", param="messages",
                       code="empty_messages")
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise APIError(400, f"messages.{i}.role {m.role!r} is not supported; use one of "
                           f"{sorted(ROLES)}", param=f"messages.{i}.role", code="invalid_role")
        if isinstance(m.content, list):
            if any(p.type != "text" or p.text is None for p in m.content):
                raise APIError(400, f"messages.{i}.content: only text parts are supported",
                               param=f"messages.{i}.content", code="unsupported_content")
            content = "".join(p.text or "" for p in m.content)
        else:
            content = m.content or ""
        # "developer" is the newer name of the system role; chat templates know "system"
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise APIError(400, "the last message must be a non-empty user message",
                       param=f"messages.{len(out) - 1}", code="invalid_value")
    return out


def completion(cid: str, created: int, model: str, text: str, finish_reason: str,
               prompt_tokens: int, completion_tokens: int, blocked_by: str | None) -> dict:
    body = {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}
    if blocked_by:
        body["harc"] = {"blocked_by": blocked_by}
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk(cid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
          **extra: Any) -> dict:
    choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, **extra}


def sse(obj: dict | Literal["[DONE]"]) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
