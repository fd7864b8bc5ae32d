"""OpenAI-compatible chat completions for the persona, served on the same FastAPI app as the Gradio page.

``POST /v1/chat/completions`` takes the usual ``{"model", "messages", "stream", "max_tokens", ...}``; the
``model`` is the id of a served persona (``GET /v1/models`` lists them; left out or empty: the server's first
persona), so one server answers as several personas, each with its own instruction, index and adapter. The
server keeps no conversation state: every request carries its own history, so conversations are isolated
by construction; the engine queues generations on the one shared model. The persona's own instruction
replaces any ``system`` message (it is what the model was trained with); the history is cut to the last
``MAX_HISTORY_TURNS`` exchanges exactly as in the app, and the response says so.

Decoding is greedy unless ``temperature`` > 0 (the persona's tuned default; OpenAI's default would be 1), so
``top_p`` and ``seed`` take effect only with a positive temperature. Asked-for features the persona cannot
give are refused with a 400 rather than answered in plain text: a forced tool call (``tool_choice`` other
than "auto"/"none"), a JSON ``response_format``, ``logprobs``, custom ``stop`` strings, ``n`` > 1.

Each response carries an extra ``rag_persona`` object: the facts retrieved for the turn with their scores
(what the model saw) and how much history was used. A request may set retrieval and context mode through
an optional ``rag_persona`` object in the body (``{"mode", "threshold", "k", "context_mode"}``).

Errors are OpenAI-shaped ``{"error": {"message", "type", "param", "code"}}`` for everything under /v1:
400 for bad requests (the field named), 401 for missing credentials, 404 for an unknown endpoint or
``model`` (with the list), 405 for a wrong method, 413 for a body over ``MAX_BODY_BYTES``, 503 when the
queue is full, and 500 only for our own faults, with an id that is also in the server log. A streaming
request that fails after it started gets one ``data: {"error": ...}`` event before ``data: [DONE]``. A client
that disconnects cancels its generation, streaming or not.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rag_persona.errors import RagPersonaError

from .api_requests import (
    ApiError,
    ChatCompletionRequest,
    context_payload,
    options_for,
    split_request,
    validation_message,
)
from .engine import Engine, EngineBusy, Personas

# The whole body: the kept exchanges at MAX_USER_CHARS (3 bytes a character) and a long system prompt fit
# with room to spare; a very long chat of long messages meets this limit (413) before MAX_MESSAGES.
MAX_BODY_BYTES = 1 << 20
log = logging.getLogger("rag_persona.api")


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code=None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_kind(status: int) -> str:
    return {401: "authentication_error", 404: "not_found_error", 503: "server_busy"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )


def internal_error(exc: BaseException | str, code: str = "internal_error") -> ApiError:
    """A 500 for our own fault: the details go to the log under an id the client also gets."""
    error_id = f"err_{uuid.uuid4().hex[:12]}"
    if isinstance(exc, BaseException):
        log.error("%s: %s", error_id, exc, exc_info=exc)
    else:
        log.error("%s: %s", error_id, exc)
    return ApiError(
        500, f"internal server error (id {error_id}; the details are in the server log)", code=code
    )


class _AsciiJSON(JSONResponse):
    """Error bodies may quote what the client sent; escaped ASCII JSON encodes even a lone surrogate."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


# -- auth ----------------------------------------------------------------------------------------------------
def make_auth(credentials: tuple[str, str] | None):
    """A dependency accepting `Authorization: Bearer user:pass` (an OpenAI api_key) or HTTP Basic."""
    expected = f"{credentials[0]}:{credentials[1]}" if credentials else None

    def check(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        given = None
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip()).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                given = None
        if given is None or not hmac.compare_digest(
            given.encode("utf-8", "replace"), expected.encode("utf-8", "replace")
        ):
            raise ApiError(
                401, "authentication: send 'Authorization: Bearer USER:PASS' (the api_key) as given to --auth"
            )

    return check


# -- body size ---------------------------------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: a /v1 request body over max_bytes gets 413 before any of it is parsed.

    The body is read here (declared length or not, chunked included) and replayed to the app, so a
    client cannot make the server buffer or parse 10 MB of JSON; the page's own routes pass untouched.
    """

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES, prefix: str = "/v1"):
        self.app, self.max_bytes, self.prefix = app, max_bytes, prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks = None  # disconnected before the body ended: let the app see it
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(send)
            if not message.get("more_body", False):
                break
        if chunks is None:
            return await self.app(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect when the client goes away

        return await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        body = json.dumps(
            error_body(
                f"request body: larger than the limit of {self.max_bytes} bytes", code="body_too_large"
            )
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# -- routes ----------------------------------------------------------------------------------------------------
class ClientGone(Exception):
    """The client closed the connection while its request waited for the model."""


DISCONNECT_POLL_S = 0.25


async def _next_event(job, poll: float = DISCONNECT_POLL_S, gone=None):
    """The job's next event without holding a worker thread for the whole generation; `gone` (an async
    callable) is asked between polls and raises ClientGone when the client has disconnected."""
    while True:
        ev = job.next_event(timeout=0)
        if ev is not None:
            return ev
        ev = await anyio.to_thread.run_sync(job.next_event, poll)
        if ev is not None:
            return ev
        if gone is not None and await gone():
            raise ClientGone


def create_api(engine: Engine | Personas, *, auth: tuple[str, str] | None = None) -> FastAPI:
    """The FastAPI app serving /v1 (routes, error handlers, docs) for one engine or several personas; the
    Gradio page is mounted on it later.

    The OpenAPI schema and docs page sit under /v1 behind the same credentials as the API.
    """
    app = FastAPI(title="rag-persona", docs_url=None, openapi_url=None, redoc_url=None)
    app.add_middleware(BodyLimit)
    add_api_routes(app, engine, auth=auth)
    return app


_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def add_api_routes(
    app: FastAPI, engine: Engine | Personas, *, auth: tuple[str, str] | None = None
) -> APIRouter:
    """Add /v1/models, /v1/chat/completions, /v1/health and the docs to app (before the page is mounted);
    any other /v1 path or method gets an OpenAI-shaped 404/405 here instead of falling through to the page.

    The models are the served personas' ids; a request's `model` picks the persona (none: the default).
    """
    router = APIRouter(prefix="/v1", dependencies=[Depends(make_auth(auth))])
    personas = Personas.of(engine)
    model_ids = personas.ids

    def model_card(m: str) -> dict:
        return {"id": m, "object": "model", "created": 0, "owned_by": "rag-persona"}

    def check_model(model: str | None) -> None:
        if model and model not in model_ids:
            raise ApiError(
                404,
                f"model: no model {model!r} here; the models are {model_ids} (GET /v1/models)",
                "model",
                "model_not_found",
            )

    @router.get("/models")
    def list_models() -> dict:
        return {"object": "list", "data": [model_card(m) for m in model_ids]}

    @router.get("/models/{model:path}")
    def retrieve_model(model: str) -> dict:
        check_model(model)
        return model_card(model)

    @router.get("/health")
    def health() -> dict:
        """The default persona's engine at the top level (as with one persona), then every persona."""
        return {
            "status": "ok",
            **personas.default.info(),
            "default_persona": personas.default.persona.id,
            "models_loaded": len(personas.models()),
            "personas": [{"id": pid, **e.info()} for pid, e in personas.engines.items()],
        }

    @router.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        return await complete(personas.get(req.model), req, request)

    @router.get("/openapi.json", include_in_schema=False)
    def openapi() -> dict:
        return app.openapi()

    @router.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url="/v1/openapi.json", title="rag-persona API")

    routes = {r.path: r.methods for r in router.routes}  # type: ignore[attr-defined]

    @router.api_route("/{rest:path}", methods=_METHODS, include_in_schema=False)
    def not_here(rest: str, request: Request):
        allowed = routes.get(f"/v1/{rest}")
        if allowed:
            raise ApiError(
                405,
                f"{request.method} /v1/{rest}: method not allowed (use {', '.join(sorted(allowed))})",
                code="method_not_allowed",
            )
        raise ApiError(
            404, f"/v1/{rest}: no such endpoint (there are {', '.join(sorted(routes))})", code="not_found"
        )

    app.include_router(router)
    add_error_handlers(app)
    return router


async def _submit(engine: Engine, req: ChatCompletionRequest):
    """(queued job, what was trimmed from the history) or the ApiError the client gets."""
    history, user_turn, trimmed = split_request(req)
    options = options_for(req)
    if options.context_mode == "xattn" and not engine.xattn_available:
        raise ApiError(
            400, f"rag_persona.context_mode: cross-attention is unavailable: {engine.xattn_reason}"
        )
    try:
        job = await anyio.to_thread.run_sync(engine.submit, history, user_turn, options)
    except EngineBusy as exc:
        raise ApiError(503, str(exc)) from None
    except RagPersonaError as exc:
        raise ApiError(400, str(exc)) from None
    return job, trimmed


async def _reply(job, request: Request | None = None):
    """The finished Reply; a client that goes away (or an error) cancels the job."""
    gone = request.is_disconnected if request is not None else None
    checked = time.monotonic()
    try:
        while True:
            kind, value = await _next_event(job, gone=gone)
            if gone is not None and time.monotonic() - checked > DISCONNECT_POLL_S:
                checked = time.monotonic()  # pieces arrive back to back: ask between them too
                if await gone():
                    raise ClientGone
            if kind == "error":
                raise internal_error(f"generation failed: {value}", code="generation_failed")
            if kind == "done":
                return value
    except ClientGone:
        raise ApiError(499, "client closed the request; its generation was cancelled") from None
    finally:
        if not job.done.is_set():
            job.cancel()


async def complete(engine: Engine, req: ChatCompletionRequest, request: Request | None = None):
    """One chat completion: a JSON body, or an SSE stream when the request asks for one."""
    job, trimmed = await _submit(engine, req)
    completion = Completion(
        id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
        created=int(time.time()),
        model=engine.persona.id,  # the id the client asked for (GET /v1/models); the weights are in /v1/health
        extra=context_payload(job.plan, trimmed),
    )
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _sse(job, completion, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    reply = await _reply(job, request)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": reply.text},
        "finish_reason": "stop" if reply.ended_by_eos else "length",
    }
    extra = {**completion.extra, "timings": reply.timings}
    return completion.body("chat.completion", [choice], usage=_usage(reply), rag_persona=extra)


def add_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped error bodies for ApiError and for requests that fail validation."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        headers = {}
        if exc.status == 503:
            headers["Retry-After"] = "5"
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="rag-persona"'  # lets a browser open /v1/docs
        return _AsciiJSON(
            error_body(exc.message, _error_kind(exc.status), exc.param, exc.code),
            status_code=exc.status,
            headers=headers or None,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        try:
            message, where = validation_message(exc.errors())
        except Exception:  # an error list that does not render (e.g. a nesting-depth failure)
            message, where = "request body: invalid", ""
        kind = request.headers.get("content-type", "")
        if not where and "json" not in kind:  # curl -d without -H: a form body FastAPI did not parse
            message = f"request body: send JSON with Content-Type: application/json (got {kind or 'none'!r})"
        return _AsciiJSON(error_body(message, param=where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 400:  # FastAPI's body parser (e.g. JSON nested past the parser's depth)
            message = f"request body: {message[:1].lower()}{message[1:]} (malformed or nested too deeply)"
        return await _api_error(request, ApiError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return await _api_error(request, internal_error(exc))


def _usage(reply) -> dict:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.new_tokens,
        "total_tokens": reply.prompt_tokens + reply.new_tokens,
    }


@dataclass
class Completion:
    """What every response of one completion carries: its id, creation time, model label and context."""

    id: str
    created: int
    model: str
    extra: dict  # the `rag_persona` object: the facts the model saw, history trimming

    def body(self, obj: str, choices: list, **more) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **more,
        }

    def chunk(self, delta: dict, finish=None, **more) -> str:
        body = self.body(
            "chat.completion.chunk", [{"index": 0, "delta": delta, "finish_reason": finish}], **more
        )
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(job, completion: Completion, include_usage: bool):
    """SSE: a role chunk carrying the context, text deltas, a finish chunk, optional usage, [DONE]."""
    finished = False
    try:
        yield completion.chunk({"role": "assistant", "content": ""}, rag_persona=completion.extra)
        while True:
            kind, value = await _next_event(job)
            if kind == "piece":
                yield completion.chunk({"content": value})
            elif kind == "error":
                err = internal_error(f"generation failed: {value}", code="generation_failed")
                body = error_body(err.message, "server_error", code=err.code)
                yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
                break
            elif kind == "done":
                finish = "stop" if value.ended_by_eos else "length"
                yield completion.chunk({}, finish, rag_persona={**completion.extra, "timings": value.timings})
                if include_usage:
                    body = completion.body("chat.completion.chunk", [], usage=_usage(value))
                    yield f"data: {json.dumps(body)}\n\n"
                break
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:
            job.cancel()  # the client went away: free the model
