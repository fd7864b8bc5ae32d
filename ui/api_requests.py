"""What a chat completion request may hold and how it becomes a persona turn: the request models, the
history the prompt keeps, decoding options, and validation errors as one line naming the field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rag_persona.errors import RagPersonaError
from rag_persona.prompts import MAX_HISTORY_TURNS, MAX_USER_CHARS, check_user_turn, kept_history
from rag_persona.utils.text import unicode_problem

from .engine import CONTEXT_MODES, RETRIEVAL_MODES, TurnOptions, options_from

# Long chats are sent whole by clients that trim by tokens (SillyTavern); only the last exchanges are read.
MAX_MESSAGES = 4096
MAX_NEW_TOKENS = 512
MAX_SEED = 2**32 - 1  # llama.cpp seeds are 32-bit; -1 means "random", as SillyTavern sends it


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


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
            if part.type != "text":
                raise ApiError(400, f"{where}.content[{i}]: only text parts are supported, got {part.type!r}")
            if part.text is None:
                raise ApiError(400, f"{where}.content[{i}].text: missing", "messages")
            texts.append(part.text)
        return "\n".join(texts)  # as vLLM joins them

    def checked_text(self, where: str) -> str:
        """The text, refused (400) when it cannot be encoded (a lone surrogate breaks the tokenisers)."""
        text = self.text(where)
        problem = unicode_problem(text)
        if problem:
            raise ApiError(400, f"{where}.content: {problem}", "messages")
        return text


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
    stream: bool | None = False  # null, as clients that send every field write it: the default
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=-1, le=MAX_SEED)
    n: int | None = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None
    # Asked-for features the persona cannot give are refused rather than silently answered in plain text:
    # a forced tool call, a JSON/schema reply, log-probabilities. "auto"/"none" tool choice is a no-op.
    tool_choice: str | dict | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    rag_persona: PersonaOptions | None = None

    @field_validator("stop")
    @classmethod
    def _no_stop(cls, value):
        if value:
            raise ValueError("custom stop sequences are not supported (replies end at the model's EOS)")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_forced_tool(cls, value):
        if value not in (None, "auto", "none"):
            raise ValueError("tool calls are not supported (only 'auto' or 'none', which answer in text)")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value and value.get("type", "text") != "text":
            raise ValueError(f"only text replies are supported, not {value.get('type')!r}")
        return value

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value:
            raise ValueError("log-probabilities are not returned")
        return value


# -- turning a request into a turn -------------------------------------------------------------------------
def split_request(req: ChatCompletionRequest) -> tuple[list[dict], str, dict]:
    """(the history the prompt keeps, the user turn, what was trimmed) or ApiError naming the field.

    Only what reaches the model is read and checked. System and developer messages are skipped wherever they
    stand (the persona's own instruction replaces them), also after the last user message, where
    SillyTavern puts impersonation and post-history instructions; so are the messages before the kept
    exchanges, so a long chat whose opening greeting is over the length limit keeps working."""
    for i, m in enumerate(req.messages):
        if m.role == "tool":
            raise ApiError(400, f"messages[{i}].role: tool messages are not supported", "messages")
    chat = [(i, m) for i, m in enumerate(req.messages) if m.role in ("user", "assistant")]
    if not chat:
        raise ApiError(400, "messages: no user message (system messages are replaced by the persona's)")
    *earlier, (last_i, last) = chat
    if last.role != "user":
        raise ApiError(
            400,
            f"messages[{last_i}]: the last message (system messages aside) must have role 'user'",
            "messages",
        )
    n_kept = len(kept_history([{"role": m.role} for _, m in earlier]))
    dropped, kept = earlier[: len(earlier) - n_kept], earlier[len(earlier) - n_kept :]
    history = []
    for i, m in kept:
        text = m.checked_text(f"messages[{i}]")
        if len(text) > MAX_USER_CHARS:
            raise ApiError(
                400,
                f"messages[{i}].content: {len(text)} characters, the limit is {MAX_USER_CHARS}",
                "messages",
            )
        history.append({"role": m.role, "content": text})
    try:
        user_turn = check_user_turn(last.text(f"messages[{last_i}]"))
    except RagPersonaError as exc:  # "message: empty; ..." → "messages[i].content: empty; ..."
        problem = str(exc).removeprefix("message: ")
        raise ApiError(400, f"messages[{last_i}].content: {problem}", "messages") from None
    trimmed = {
        "history_trimmed_exchanges": sum(1 for _, m in dropped if m.role == "user"),
        "history_trimmed_messages": len(dropped),
    }
    return history, user_turn, trimmed


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
    if req.seed is not None and req.seed >= 0:
        gen["seed"] = req.seed
    try:
        return options_from(extra.mode, extra.threshold, extra.k, extra.context_mode, **gen)
    except RagPersonaError as exc:
        raise ApiError(400, str(exc), "rag_persona") from None


def context_payload(plan, trimmed: dict) -> dict:
    return {
        "context": [{"id": f.id, "text": f.text, "score": round(float(f.score), 4)} for f in plan.context],
        **trimmed,
        "max_history_turns": MAX_HISTORY_TURNS,
    }


def _where(error: dict) -> str:
    """An error's field as the client wrote it (`messages[0].content`), without pydantic's union branch
    names (`content.str`, `stop.list[str]`) that no client sent."""
    where = ""
    for p in map(str, error.get("loc", ())):
        if p == "body" or p in ("str", "int", "float", "bool", "dict", "list") or "[" in p:
            continue
        where += f"[{p}]" if p.isdigit() else (f".{p}" if where else p)
    return where


def validation_message(errors: list) -> tuple[str, str]:
    """FastAPI's validation errors as one line naming the first bad field (`messages[0].role: ...`)."""
    first = errors[0] if errors else {}
    where = _where(first)
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":  # one parse failure, whatever else pydantic adds to it
        return f"request body: not valid JSON ({first.get('ctx', {}).get('error', msg)})", ""
    if first.get("type") == "missing":
        message = f"{where or 'request body'}: missing"
    else:
        message = f"{where or 'request body'}: {msg}"
    others = len({_where(e) for e in errors} - {where})  # a union's branches are one problem
    more = f" (and {others} more problems)" if others else ""
    return message + more, where
