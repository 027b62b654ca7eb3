"""The HTTP side: FastAPI routes, limits, auth and the audit log; the engine does the model work.

Every refusal is an OpenAI error body `{"error": {"message", "type", "param", "code"}}` with a 4xx
status (docs/serving.md lists them); a 500 only means a failure inside generation.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from harc.chat import ChatFormat
from harc.errors import HarcError
from harc.serve import protocol as P
from harc.serve.config import ServeConfig
from harc.serve.engine import Engine, EngineClosed, Outcome, run_generate
from harc.serve.policy import Target, build_targets

log = logging.getLogger("harc.serve")
PROMPT_CHARS = 200  # prompt characters kept in an audit record; the hash identifies the rest


class AuditLog:
    """JSON lines, one per blocked request: time, model, layer, prompt hash, truncated prompt."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._lock = threading.Lock()

    def write(self, model: str, layer: str, prompt: str, request_id: str) -> None:
        rec = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
               "id": request_id, "model": model, "layer": layer,
               "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
               "prompt": prompt[:PROMPT_CHARS] + ("…" if len(prompt) > PROMPT_CHARS else "")}
        with self._lock:
            self._file.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._file.close()


class Renderer:
    """Chat-template rendering on its own thread and tokenizer copy: the event loop stays free,
    and a fast tokenizer is never used from two threads at once (the engine owns the original)."""

    def __init__(self, tokenizer):
        self.tok = copy.deepcopy(tokenizer)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="harc-serve-render")

    def _render(self, messages: list[dict]) -> tuple[str, int]:
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises many types (e.g. "roles must alternate")
            raise P.APIError(400, f"the model's chat template rejects these messages: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                             param="messages", code="invalid_messages") from None
        return text, len(self.tok(text, add_special_tokens=False)["input_ids"])

    async def render(self, messages: list[dict]) -> tuple[str, int]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._render, messages)


def create_app(cfg: ServeConfig, model, tokenizer, *, api_key: str | None = None,
               generate_fn=run_generate) -> FastAPI:
    """The app for an already loaded model (adapters loaded under their served names)."""
    if not getattr(tokenizer, "chat_template", None):
        raise HarcError("this tokenizer has no chat template; the server renders OpenAI messages "
                        "with it, so serve a chat model")
    limits = cfg.limits
    engine = Engine(model, tokenizer, {}, max_batch_size=cfg.batching.max_batch_size,
                    wait_ms=cfg.batching.wait_ms, generate_fn=generate_fn)
    chat = ChatFormat(tokenizer, max_prompt_tokens=limits.max_prompt_tokens)
    engine.targets = build_targets(cfg, model, chat, engine.active)
    renderer = Renderer(tokenizer)
    audit = AuditLog(cfg.audit_log) if cfg.audit_log else None
    created = int(time.time())
    state = {"active": 0, "draining": False}

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            # uvicorn has already waited for in-flight requests (drain_timeout_s); close() lets the
            # worker finish anything still queued.
            state["draining"] = True
            await asyncio.to_thread(engine.close, cfg.drain_timeout_s)
            renderer.pool.shutdown(wait=False)
            if audit:
                audit.close()

    app = FastAPI(title="harc serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(P.APIError)
    async def _api_error(_req, e: P.APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_req, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return JSONResponse(P.error_body(str(e.detail), "invalid_request_error", None, code),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_req, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(P.error_body("internal server error", "server_error", None,
                                         "internal_error"), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                  api_key.encode()):
            raise P.APIError(401, "missing or invalid API key (Authorization: Bearer KEY)",
                             type="authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if state["draining"]:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "active_requests": state["active"], "batches": engine.batches}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        data = []
        for name in cfg.served_names():
            parent = cfg.policies[name].base if name in cfg.policies else (
                cfg.base_name if name in cfg.adapters else None)
            data.append({"id": name, "object": "model", "created": created, "owned_by": "harc",
                         "root": cfg.model, "parent": parent})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        if state["active"] >= limits.max_concurrent_requests:
            raise P.APIError(429, f"more than {limits.max_concurrent_requests} concurrent "
                             "requests; retry later", type="rate_limit_error",
                             code="too_many_requests")
        state["active"] += 1
        handed_off = False
        try:
            req = P.parse_chat_request(await _read_body(request, limits.max_body_bytes))
            target = engine.targets.get(req.model)
            if target is None:
                raise P.APIError(404, f"model {req.model!r} is not served; GET /v1/models lists "
                                 "the served names", param="model", code="model_not_found")
            max_tokens = req.max_tokens or limits.default_max_tokens
            if max_tokens > limits.max_tokens:
                raise P.APIError(400, f"max_tokens {max_tokens} exceeds this server's limit of "
                                 f"{limits.max_tokens}", param="max_tokens", code="invalid_value")
            prompt, n_prompt = await renderer.render(req.messages)
            if n_prompt > limits.max_prompt_tokens:
                raise P.APIError(400, f"the conversation is {n_prompt} tokens long; this server "
                                 f"accepts at most {limits.max_prompt_tokens}",
                                 param="messages", code="context_length_exceeded")
            check = "\n\n".join(m["content"] for m in req.messages if m["role"] != "assistant")
            try:
                fut = engine.enqueue(target, prompt, check, max_tokens, req.stop)
            except EngineClosed:
                raise P.APIError(503, "the server is shutting down", type="server_error",
                                 code="shutting_down") from None
            cid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            if req.stream:
                handed_off = True
                return StreamingResponse(_stream(fut, req, target, check, cid, now, n_prompt),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            out = await fut
            _audit(out, target, check, cid)
            return P.completion(cid, now, req.model, out.text, out.finish_reason, n_prompt,
                                out.completion_tokens, out.blocked_by)
        finally:
            if not handed_off:
                state["active"] -= 1

    def _audit(out: Outcome, target: Target, check: str, cid: str) -> None:
        if out.blocked_by and audit:
            audit.write(target.name, out.blocked_by, check, cid)

    async def _stream(fut, req: P.ChatRequest, target: Target, check: str, cid: str, now: int,
                      n_prompt: int):
        # generate() returns whole completions, so the text arrives as one delta once done; the
        # role delta goes out at once so clients see the stream open.
        try:
            yield P.sse(P.chunk(cid, now, req.model, {"role": "assistant", "content": ""}))
            try:
                out = await fut
            except Exception:
                yield P.sse(P.error_body("generation failed", "server_error", None,
                                         "internal_error"))
                return
            _audit(out, target, check, cid)
            if out.text:
                yield P.sse(P.chunk(cid, now, req.model, {"content": out.text}))
            extra = {"harc": {"blocked_by": out.blocked_by}} if out.blocked_by else {}
            yield P.sse(P.chunk(cid, now, req.model, {}, out.finish_reason, **extra))
            if req.include_usage:
                yield P.sse({"id": cid, "object": "chat.completion.chunk", "created": now,
                             "model": req.model, "choices": [],
                             "usage": P.usage(n_prompt, out.completion_tokens)})
            yield P.sse("[DONE]")
        finally:
            state["active"] -= 1

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = P.APIError(413, f"the request body exceeds {limit} bytes",
                           code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        parts.append(part)
    return b"".join(parts)
