"""The HTTP side: Starlette routes over an ``Engine``.

Every error is OpenAI's JSON body (``protocol.error_body``), 404 and 405 included, and an
unexpected exception is a 500 with its one-line message, never a traceback. Requests are
checked and tokenized here, on the event loop's threads (the chat template renders in a
child process, in a worker thread), so the decode loop only ever sees token ids.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from . import protocol
from .engine import Busy, Params
from .protocol import ApiError

log = logging.getLogger("hybrid.serve")


class EventStream(StreamingResponse):
    """Server-sent events that stop as soon as the client leaves, whatever ASGI spec version the
    server reports: the body generator is cancelled, and its ``finally`` cancels the job."""

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as tg:
            async def stream():
                try:
                    await self.stream_response(send)
                except OSError:  # the connection went while we wrote
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(engine, model_id: str, *, api_key: str | None = None) -> Starlette:
    """The ASGI app serving ``engine`` (its model named ``model_id``); ``api_key``: every route
    but ``/health`` needs ``Authorization: Bearer <api_key>``."""
    tok, n_ctx, n_vocab = engine.tok, engine.tr.n_ctx, engine.tr.cfg.n_vocab
    created = int(time.time())

    def authorize(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> dict:
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > protocol.MAX_BODY_BYTES:
                raise ApiError(413, f"the request body is larger than {protocol.MAX_BODY_BYTES:,} bytes",
                               code="request_too_large")
        return protocol.parse_json(bytes(raw))

    def encode(text: str, chat: bool) -> list[int]:
        # A template that writes the BOS token itself must not get a second one (as `run --chat`).
        bos = tok.tokens[tok.bos] if tok.bos is not None else None
        try:
            return tok.encode(text, add_bos=False if chat and bos and text.startswith(bos) else None)
        except ValueError as e:
            raise protocol.bad("messages" if chat else "prompt", str(e)) from None

    async def health(request):
        return JSONResponse({"status": "ok", "model": model_id, "busy": engine.busy, "queued": engine.queued,
                             **engine.counts})

    def model_card():
        return {"id": model_id, "object": "model", "created": created, "owned_by": "hybrid-moe",
                "meta": {"n_ctx": n_ctx, "n_vocab": n_vocab}}

    async def models(request):
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request):
        authorize(request)
        if request.path_params["name"] != model_id:
            raise ApiError(404, f"the model {request.path_params['name']!r} does not exist (this server "
                           f"serves {model_id!r})", param="model", code="model_not_found")
        return JSONResponse(model_card())

    async def chat(request):
        authorize(request)
        req = protocol.parse_chat(await read_body(request))
        try:
            # control-token text inside a message stays text: specials only in the template's own text
            _, ids = await anyio.to_thread.run_sync(tok.encode_messages, req.messages)
        except (TypeError, ValueError) as e:  # no template, or the template failed on these messages
            raise protocol.bad("messages", str(e)) from None
        return await run(request, "chat", req, ids)

    async def completions(request):
        authorize(request)
        req = protocol.parse_completion(await read_body(request))
        if isinstance(req.prompt, str):  # (off the event loop: a long text takes a while)
            ids = await anyio.to_thread.run_sync(encode, req.prompt, False)
        else:
            ids = req.prompt
            bad = [t for t in ids if not 0 <= t < n_vocab]
            if bad:
                raise protocol.bad("prompt", f"token id {bad[0]} is outside the vocabulary [0, {n_vocab})")
        return await run(request, "text", req, ids)

    async def run(request, kind, req, ids):
        if not ids:
            raise protocol.bad("prompt", "the prompt is empty: no tokens to run")
        n = protocol.check_context(req, len(ids), n_ctx)
        params = Params(list(ids), n, req.temperature, req.top_p, req.seed, req.stop)
        try:
            job = engine.submit(params, asyncio.get_running_loop())
        except Busy as e:
            raise ApiError(503, f"the server is busy: {e}; retry later", type="server_error",
                           code="server_busy") from None
        rid = protocol.new_id(kind)
        if req.stream:
            return EventStream(stream(kind, rid, job, req), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await whole(request, kind, rid, job)

    async def whole(request, kind, rid, job):
        """Collect the job's text; a client that leaves first cancels it."""
        parts, end = [], None

        async def collect():
            nonlocal end
            while end is None:
                ev, value = await job.events.get()
                if ev == "delta":
                    parts.append(value)
                else:
                    end = (ev, value)
            tg.cancel_scope.cancel()

        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancel()
            tg.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(collect)
                tg.start_soon(watch)
        finally:
            if end is None:
                job.cancel()
        if end is None:  # the client left: nobody reads this
            return JSONResponse(protocol.error_body("client disconnected"), status_code=499)
        ev, value = end
        if ev == "error":
            raise ApiError(500, value, type="server_error")
        use = protocol.usage(value.prompt_tokens, value.completion_tokens, value.cached_tokens)
        return JSONResponse(protocol.response(kind, rid, model_id, "".join(parts), value.finish_reason, use))

    async def stream(kind, rid, job, req):
        created = int(time.time())
        try:
            if kind == "chat":
                yield protocol.sse(protocol.chunk(kind, rid, model_id, created, role=True))
            while True:
                ev, value = await job.events.get()
                if ev == "delta":
                    yield protocol.sse(protocol.chunk(kind, rid, model_id, created, value))
                elif ev == "error":
                    yield protocol.sse(protocol.error_body(value, "server_error"))
                    break
                else:
                    use = protocol.usage(value.prompt_tokens, value.completion_tokens, value.cached_tokens)
                    yield protocol.sse(protocol.chunk(kind, rid, model_id, created, finish_reason=value.finish_reason,
                                                      use=use))
                    if req.include_usage:
                        yield protocol.sse(protocol.chunk(kind, rid, model_id, created, use=use, no_choices=True))
                    break
            yield protocol.sse("[DONE]")
        finally:  # done, or the client left (the generator is cancelled): the worker stops at its next step
            job.cancel()

    async def api_error(request, e: ApiError):
        return error_response(e)

    async def http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, e.detail)
        return JSONResponse(protocol.error_body(msg, code=code), status_code=e.status_code, headers=e.headers)

    async def server_error(request, e: Exception):
        log.error("%s %s: %s: %s", request.method, request.url.path, type(e).__name__, e)
        return JSONResponse(protocol.error_body(f"internal error: {type(e).__name__}: {e}", "server_error"),
                            status_code=500)

    routes = [Route("/health", health, methods=["GET"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{name:path}", model, methods=["GET"]),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error,
                                                        Exception: server_error})
