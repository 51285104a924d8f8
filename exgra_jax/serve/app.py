"""The ASGI application: ``POST /v1/chat/completions`` (streaming or not), ``GET /v1/models``,
``GET /health`` and the chat page at ``/``. Errors are OpenAI-style JSON bodies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from exgra_jax.serve.engine import Completion, Engine
from exgra_jax.serve.page import PAGE
from exgra_jax.serve.protocol import ApiError, ChatRequest, parse_chat_request, parse_json

DRAIN_FACTOR = 4


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 ApiError. An oversized body is still read (and dropped) up to
    DRAIN_FACTOR x the limit so that a client sending all of it first gets the answer."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > DRAIN_FACTOR * limit:
        raise ApiError(413, f"the request body is too large: {declared} > {limit} bytes",
                       code="request_too_large")
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            body += chunk
        elif size > DRAIN_FACTOR * limit:
            break
    if size > limit:
        raise ApiError(413, f"the request body is too large: over {limit} bytes",
                       code="request_too_large")
    return bytes(body)


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class _Events:
    """Carries the engine's events from its thread into this request's event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def next(self):
        kind, value = await self.queue.get()
        if kind == "error":
            raise ApiError(500, f"generation failed: {value}", type="server_error")
        return kind, value


def _usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, model_name: str, max_body_bytes: int = 32 * 2**20) -> Starlette:
    created = int(time.time())

    async def chat_completions(request: Request):
        body = parse_json(await _read_body(request, max_body_bytes))
        chat = parse_chat_request(body, model_name)
        events = _Events()
        job = await run_in_threadpool(engine.prepare, chat, events)
        engine.submit(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model_name}
        if chat.stream:
            return StreamingResponse(_stream(head, chat, events),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        while True:
            kind, value = await events.next()
            if kind == "done":
                break
        return JSONResponse({
            **head, "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": value.finish_reason,
                         "message": {"role": "assistant", "content": value.text}}],
            "usage": _usage(value)})

    async def _stream(head: dict, chat: ChatRequest, events: _Events):
        def chunk(delta: dict, finish: str | None = None) -> str:
            return _sse({**head, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        yield chunk({"role": "assistant", "content": ""})
        try:
            while True:
                kind, value = await events.next()
                if kind == "delta":
                    yield chunk({"content": value})
                    continue
                yield chunk({}, value.finish_reason)
                if chat.include_usage:
                    yield _sse({**head, "object": "chat.completion.chunk", "choices": [],
                                "usage": _usage(value)})
                break
        except ApiError as e:  # the status line is sent already: report in the stream
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    async def models(_request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "exgra-jax"}]})

    async def health(_request: Request):
        return JSONResponse({"status": "ok", "model": model_name,
                             "queued": engine.queue.qsize(), "batches": engine.batches})

    async def page(_request: Request):
        return HTMLResponse(PAGE)

    async def api_error(_request: Request, error: ApiError):
        return _error_response(error)

    async def http_error(_request: Request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return _error_response(ApiError(error.status_code, str(error.detail), type=kind))

    return Starlette(
        routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/health", health, methods=["GET"]),
                Route("/", page, methods=["GET"])],
        exception_handlers={ApiError: api_error, HTTPException: http_error},
        lifespan=_closing(engine))


def _closing(engine: Engine):
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await run_in_threadpool(engine.close)  # let queued requests finish

    return lifespan
