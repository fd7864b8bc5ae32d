"""OpenAI-compatible chat completions for the persona, served on the same FastAPI app as the Gradio page.

``POST /v1/chat/completions`` takes the usual ``{"model", "messages", "stream", "max_tokens", ...}``. The
server keeps no conversation state: every request carries its own history, so conversations are isolated
by construction; the engine queues generations on the one shared model. The persona's own instruction
replaces any ``system`` message (it is what the model was trained with); the history is cut to the last
``MAX_HISTORY_TURNS`` exchanges exactly as in the app, and the response says so.

Each response carries an extra ``rag_persona`` object: the facts retrieved for the turn with their scores
(what the model saw) and how much history was used. A request may set retrieval and context mode through
an optional ``rag_persona`` object in the body (``{"mode", "threshold", "k", "context_mode"}``).

Errors are OpenAI-shaped ``{"error": {"message", "type", "param", "code"}}`` with 400 for bad requests,
401 for missing credentials, 503 when the queue is full; a streaming request that fails after it started
gets one ``data: {"error": ...}`` event before ``data: [DONE]``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rag_persona.errors import RagPersonaError
from rag_persona.prompts import MAX_HISTORY_TURNS, MAX_USER_CHARS, check_user_turn

from .engine import CONTEXT_MODES, RETRIEVAL_MODES, Engine, EngineBusy, TurnOptions, options_from

MAX_MESSAGES = 200
MAX_SYSTEM_CHARS = 20_000
MAX_NEW_TOKENS = 512


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code=None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_kind(status: int) -> str:
    return {401: "authentication_error", 503: "server_busy"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )


# -- request models ---------------------------------------------------------------------------------------
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self, where: str) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for i, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise ApiError(400, f"{where}.content[{i}]: only text parts are supported, got {part.type!r}")
            texts.append(part.text)
        return "".join(texts)


class PersonaOptions(BaseModel):
    """Optional retrieval/context settings; anything left out uses the index's tuned defaults."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal[RETRIEVAL_MODES] | None = None  # type: ignore[valid-type]
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)  # calibrated scores lie in (0, 1)
    k: int | None = Field(default=None, ge=1, le=50)
    context_mode: Literal[CONTEXT_MODES] = "prompt"  # type: ignore[valid-type]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send presence_penalty, logit_bias, user, ...
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None
    rag_persona: PersonaOptions | None = None

    @field_validator("stop")
    @classmethod
    def _no_stop(cls, value):
        if value:
            raise ValueError("custom stop sequences are not supported (replies end at the model's EOS)")
        return value


# -- turning a request into a turn -------------------------------------------------------------------------
def split_request(req: ChatCompletionRequest) -> tuple[list[dict], str, int]:
    """(history, user turn, exchanges dropped) or ApiError with the offending field named."""
    last = req.messages[-1]
    if last.role != "user":
        raise ApiError(
            400, f"messages[{len(req.messages) - 1}]: the last message must have role 'user'", "messages"
        )
    history = []
    for i, m in enumerate(req.messages[:-1]):
        text = m.text(f"messages[{i}]")
        if m.role in ("system", "developer"):
            if len(text) > MAX_SYSTEM_CHARS:
                raise ApiError(
                    400, f"messages[{i}].content: {len(text)} characters, the limit is {MAX_SYSTEM_CHARS}"
                )
            continue  # the persona's own instruction is used instead
        if m.role == "tool":
            raise ApiError(400, f"messages[{i}].role: tool messages are not supported", "messages")
        if len(text) > MAX_USER_CHARS:
            raise ApiError(
                400,
                f"messages[{i}].content: {len(text)} characters, the limit is {MAX_USER_CHARS}",
                "messages",
            )
        history.append({"role": m.role, "content": text})
    try:
        user_turn = check_user_turn(last.text(f"messages[{len(req.messages) - 1}]"))
    except RagPersonaError as exc:  # "message: empty; ..." → "messages[i].content: empty; ..."
        problem = str(exc).removeprefix("message: ")
        raise ApiError(400, f"messages[{len(req.messages) - 1}].content: {problem}", "messages") from None
    exchanges = sum(1 for m in history if m["role"] == "user")
    return history, user_turn, max(0, exchanges - MAX_HISTORY_TURNS)


def options_for(req: ChatCompletionRequest) -> TurnOptions:
    extra = req.rag_persona or PersonaOptions()
    gen: dict = {}
    limit = req.max_completion_tokens or req.max_tokens
    if limit is not None:
        gen["max_new_tokens"] = limit
    if req.temperature is not None:
        gen["do_sample"] = req.temperature > 0
        if req.temperature > 0:
            gen["temperature"] = req.temperature
    if req.top_p is not None:
        gen["top_p"] = req.top_p
    if req.seed is not None:
        gen["seed"] = req.seed
    try:
        return options_from(extra.mode, extra.threshold, extra.k, extra.context_mode, **gen)
    except RagPersonaError as exc:
        raise ApiError(400, str(exc), "rag_persona") from None


def context_payload(plan, dropped: int) -> dict:
    return {
        "context": [{"id": f.id, "text": f.text, "score": round(float(f.score), 4)} for f in plan.context],
        "history_trimmed_exchanges": dropped,
        "max_history_turns": MAX_HISTORY_TURNS,
    }


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
        if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
            raise ApiError(
                401, "authentication: send 'Authorization: Bearer USER:PASS' (the api_key) as given to --auth"
            )

    return check


# -- routes ----------------------------------------------------------------------------------------------------
async def _next_event(job, poll: float = 0.25):
    """The job's next event without holding a worker thread for the whole generation."""
    while True:
        ev = job.next_event(timeout=0)
        if ev is not None:
            return ev
        ev = await anyio.to_thread.run_sync(job.next_event, poll)
        if ev is not None:
            return ev


def add_api_routes(app: FastAPI, engine: Engine, *, auth: tuple[str, str] | None = None) -> APIRouter:
    """Add /v1/models, /v1/chat/completions and /v1/health to app (before the Gradio app is mounted)."""
    router = APIRouter(prefix="/v1", dependencies=[Depends(make_auth(auth))])
    model_id = engine.persona.id

    @router.get("/models")
    def list_models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "rag-persona"}],
        }

    @router.get("/health")
    def health() -> dict:
        return {"status": "ok", **engine.info()}

    @router.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        return await complete(engine, req)

    app.include_router(router)
    add_error_handlers(app)
    return router


async def _submit(engine: Engine, req: ChatCompletionRequest):
    """(queued job, exchanges dropped from the history) or the ApiError the client gets."""
    history, user_turn, dropped = split_request(req)
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
    return job, dropped


async def _reply(job):
    """The finished Reply; a client that goes away (or an error) cancels the job."""
    try:
        while True:
            kind, value = await _next_event(job)
            if kind == "error":
                raise ApiError(500, str(value), code="generation_failed")
            if kind == "done":
                return value
    finally:
        if not job.done.is_set():
            job.cancel()


async def complete(engine: Engine, req: ChatCompletionRequest):
    """One chat completion: a JSON body, or an SSE stream when the request asks for one."""
    job, dropped = await _submit(engine, req)
    completion = Completion(
        id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
        created=int(time.time()),
        model=engine.model_label(),
        extra=context_payload(job.plan, dropped),
    )
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _sse(job, completion, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    reply = await _reply(job)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": reply.text},
        "finish_reason": "stop" if reply.ended_by_eos else "length",
    }
    extra = {**completion.extra, "timings": reply.timings}
    return completion.body("chat.completion", [choice], usage=_usage(reply), rag_persona=extra)


def validation_message(errors: list) -> tuple[str, str]:
    """FastAPI's validation errors as one line naming the first bad field (`messages[0].role: ...`)."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ""
    for p in loc:
        where += f"[{p}]" if p.isdigit() else (f".{p}" if where else p)
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        message = f"request body: not valid JSON ({first.get('ctx', {}).get('error', msg)})"
        where = ""
    elif first.get("type") == "missing":
        message = f"{where or 'request body'}: missing"
    else:
        message = f"{where or 'request body'}: {msg}"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return message + more, where


def add_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped error bodies for ApiError and for requests that fail validation."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(
            error_body(exc.message, _error_kind(exc.status), exc.param, exc.code),
            status_code=exc.status,
            headers={"Retry-After": "5"} if exc.status == 503 else None,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, where = validation_message(exc.errors())
        return JSONResponse(error_body(message, param=where or None), status_code=400)


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
                yield f"data: {json.dumps(error_body(str(value), 'server_error'), ensure_ascii=False)}\n\n"
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
