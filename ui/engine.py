"""One model instance shared by every user of the app and the API: retrieval in the caller, generation in a queue.

A turn is *planned* in the caller's thread (retrieval + the one prompt builder, so the context is known at
once) and then *queued*: a single worker thread owns the model and runs one generation at a time, first come
first served. The caller reads the job's events (queue position, text pieces, the finished reply) from a
private queue, so conversations never share state. A caller that goes away cancels its job: a queued job is
skipped, a running one stops at the next token (a stopping criterion), so the model is never left busy for
nobody. Model/adapter switches and the cross-attention load run as jobs too, so they wait for the current
generation instead of pulling the model out from under it.

What is served (the store and its retrievers, the loaded model) lives in ui.loading.

A server may serve several personas (`Personas`, one `Engine` each, the first the default). Each has its
own persona.json, index and adapter rule; personas whose (model, adapter) resolve alike share one loaded
model and its queue, and a persona needing another adapter gets a model of its own (its memory again:
about 0.4 GB for the bundled 0.5B Q4 on llama.cpp, ~1 GB in bf16 on transformers).
"""

from __future__ import annotations

import collections
import functools
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from rag_persona.chat import TurnPlan, default_persona, plan_turn
from rag_persona.errors import RagPersonaError
from rag_persona.evaluation.evaluate import resolve_adapter
from rag_persona.generation import GenerationSettings, Reply, ReplyStream
from rag_persona.prompts import MAX_HISTORY_TURNS, Persona, check_user_turn
from rag_persona.retrieval.reranker import shipped_reranker_available
from rag_persona.settings import KNOWLEDGE_ROOT, get_settings

from .loading import Knowledge, Loader, ModelSlot, SearchAt

RETRIEVAL_MODES = ("dense", "hybrid", "rerank") if shipped_reranker_available() else ("dense", "hybrid")
CONTEXT_MODES = ("prompt", "xattn")
DEFAULT_MAX_WAITING = 32


class EngineBusy(RagPersonaError):
    """The generation queue is full; the caller should retry later."""


class Cancelled(RagPersonaError):
    """The job was cancelled before it finished."""


# -- generation that can be stopped ------------------------------------------------------------------
def _stop_when(event: threading.Event):
    from transformers import StoppingCriteria

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full(
                (input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device
            )

    return _Stop()


@dataclass
class _CancellableSettings(GenerationSettings):
    cancel: threading.Event | None = None

    def to_generate_kwargs(self) -> dict:
        kwargs = super().to_generate_kwargs()
        if self.cancel is not None:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_stop_when(self.cancel)])
        return kwargs


@dataclass
class _Hit:
    fact_id: str
    text: str
    score: float


class _Retrieved:
    """Hands already-retrieved facts to a library turn (so a job's facts are never retrieved twice)."""

    def __init__(self, facts):
        self.hits = [_Hit(f.id, f.text, f.score) for f in facts]

    def search(self, query: str) -> list[_Hit]:
        return list(self.hits)


# -- jobs -----------------------------------------------------------------------------------------------
@dataclass
class TurnOptions:
    """Per-turn settings: retrieval (None = the index's defaults), context mode, decoding."""

    mode: str | None = None
    threshold: float | None = None
    k: int | None = None
    context_mode: str = "prompt"
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in RETRIEVAL_MODES:
            raise RagPersonaError(f"retrieval mode {self.mode!r} is not one of {', '.join(RETRIEVAL_MODES)}")
        if self.context_mode not in CONTEXT_MODES:
            raise RagPersonaError(
                f"context mode {self.context_mode!r} is not one of {', '.join(CONTEXT_MODES)}"
            )
        if self.k is not None and not 1 <= int(self.k) <= 50:
            raise RagPersonaError(f"k must be between 1 and 50, got {self.k}")


def options_from(
    mode: str | None = None,
    threshold: float | None = None,
    k: int | None = None,
    context_mode: str = "prompt",
    **generation,
) -> TurnOptions:
    base = GenerationSettings()
    gen = replace(base, **{k_: v for k_, v in generation.items() if v is not None})
    return TurnOptions(mode=mode, threshold=threshold, k=k, context_mode=context_mode, generation=gen)


class Job:
    """One queued unit of work; its events are private to the caller that submitted it.

    `fn` runs on the model's worker thread; a "turn" job reports its result as a `done` event.
    """

    _ids = itertools.count(1)

    def __init__(self, kind: str, plan: TurnPlan | None = None, options: TurnOptions | None = None, fn=None):
        self.id = next(self._ids)
        self.history: list[dict] = []
        self.user_turn = ""
        self.kind = kind
        self.plan = plan
        self.options = options
        self.fn = fn
        self.cancel_event = threading.Event()
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None
        self._events: queue.Queue = queue.Queue()

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def put(self, kind: str, value=None) -> None:
        self._events.put((kind, value))

    def next_event(self, timeout: float | None = None):
        """(kind, value) or None on timeout; kinds: queued (position), start, piece, done (Reply), error."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def events(self, timeout: float = 600.0) -> Iterator[tuple[str, object]]:
        """Every event until done/error; cancels the job if the consumer stops early."""
        deadline = time.monotonic() + timeout
        finished = False
        try:
            while True:
                ev = self.next_event(timeout=0.5)
                if ev is None:
                    if time.monotonic() > deadline:
                        raise RagPersonaError(f"generation: no result within {timeout:.0f}s")
                    continue
                yield ev
                if ev[0] in ("done", "error"):
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel()

    def wait(self, timeout: float = 600.0):
        """Block until the job ends; return its result or raise its error."""
        if not self.done.wait(timeout):
            self.cancel()
            raise RagPersonaError(f"job: no result within {timeout:.0f}s")
        if self.error is not None:
            raise self.error
        return self.result


# -- the queue -------------------------------------------------------------------------------------------
class JobQueue:
    """First come, first served on one worker thread, the only thread that touches the model."""

    def __init__(self, max_waiting: int = DEFAULT_MAX_WAITING):
        self.max_waiting = max_waiting
        self._cv = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._served = 0
        self._worker = threading.Thread(target=self._work, name="rag-persona-model", daemon=True)
        self._worker.start()

    def stats(self) -> dict:
        with self._cv:
            waiting, busy = len(self._pending), self._running is not None
        return {"waiting": waiting, "busy": busy, "served": self._served, "limit": self.max_waiting}

    def put(self, job: Job) -> Job:
        """Queue a job, or refuse it with EngineBusy when max_waiting jobs already wait."""
        with self._cv:
            if len(self._pending) >= self.max_waiting:
                raise EngineBusy(
                    f"busy: {len(self._pending)} requests are already waiting for the model "
                    f"(limit {self.max_waiting}); try again shortly"
                )
            self._pending.append(job)
            job.put("queued", len(self._pending) - 1 + (self._running is not None))
            self._cv.notify_all()
        return job

    def run_exclusive(self, fn: Callable[[], object], timeout: float = 1800.0):
        """Run fn on the worker (nothing generates meanwhile) and return its result."""
        job = Job("call", fn=fn)
        with self._cv:  # control jobs are never refused for a full queue
            self._pending.append(job)
            self._cv.notify_all()
        return job.wait(timeout)

    def close(self) -> None:
        with self._cv:
            for job in self._pending:
                job.cancel()

    def _next(self) -> Job:
        with self._cv:
            while not self._pending:
                self._cv.wait()
            job = self._pending.popleft()
            self._running = job
            for i, waiting in enumerate(self._pending):
                waiting.put("queued", i + 1)
        return job

    def _work(self) -> None:
        while True:
            job = self._next()
            try:
                if job.cancelled:
                    raise Cancelled("cancelled while waiting")
                job.result = job.fn()
                if job.kind == "turn":
                    job.put("done", job.result)
            except BaseException as exc:  # noqa: BLE001 - every failure is reported to the job's owner
                what = "generation" if job.kind == "turn" else "model"
                job.error = exc if isinstance(exc, RagPersonaError) else RagPersonaError(f"{what}: {exc}")
                job.put("error", job.error)
            finally:
                with self._cv:
                    self._running = None
                    self._served += job.kind == "turn"
                job.done.set()


# -- the engine ----------------------------------------------------------------------------------------
def persona_ref(persona: Persona | str | None) -> str | None:
    """What names a persona to the settings (its index key, its default adapter): an id under knowledge/,
    a folder path, or None for the settings' persona."""
    if not isinstance(persona, Persona):
        return persona
    if persona.folder is None:
        return persona.id
    folder = Path(persona.folder).absolute()
    return folder.name if folder.parent == KNOWLEDGE_ROOT else str(folder)


class Engine:
    """The persona, its index, and one model behind a FIFO generation queue (the model and queue possibly
    shared with other personas' engines: `shares_model_with`)."""

    def __init__(
        self,
        model: str | None = None,
        adapter: str | None = None,
        *,
        store=None,
        index: str | Path | None = None,
        persona: Persona | str | None = None,
        loader: Loader | None = None,
        xattn_weights: str | Path | None = None,
        max_waiting: int = DEFAULT_MAX_WAITING,
        progress: Callable[[str], None] = print,
        shares_model_with: Engine | None = None,
    ):
        """`persona`: a Persona, an id under knowledge/ or a folder (None: the settings'); it picks the index
        (unless `store` or `index` is given) and the default adapter. With `shares_model_with`, this engine
        generates on that engine's loaded model and queue (`model`, `adapter`, `loader` are not used)."""
        self.progress = progress
        self.persona = persona if isinstance(persona, Persona) else default_persona(persona)
        self.persona_ref = persona_ref(persona)
        self.knowledge = Knowledge(store, index, progress=progress, persona=self.persona_ref)
        if shares_model_with is not None:
            self.slot, self.jobs = shares_model_with.slot, shares_model_with.jobs
            return
        self.slot = ModelSlot(
            model,
            adapter,
            loader=loader,
            xattn_weights=xattn_weights,
            progress=progress,
            persona=self.persona_ref,
        )
        self.jobs = JobQueue(max_waiting)

    # -- what is served --------------------------------------------------------------------------------
    @property
    def store(self):
        return self.knowledge.store

    @property
    def loaded(self):
        return self.slot.loaded

    @property
    def model_name(self) -> str | None:
        return self.slot.name

    @property
    def adapter(self) -> str | None:
        return self.slot.adapter

    @property
    def max_waiting(self) -> int:
        return self.jobs.max_waiting

    @max_waiting.setter
    def max_waiting(self, value: int) -> None:
        self.jobs.max_waiting = value

    @property
    def xattn_available(self) -> bool:
        return self.slot.xattn_available

    @property
    def xattn_reason(self) -> str:
        return self.slot.xattn_reason

    def model_label(self) -> str:
        return self.slot.label()

    def info(self) -> dict:
        loaded = self.loaded
        return {
            "persona": self.persona.name,
            "persona_id": self.persona.id,
            "model": self.model_name or getattr(loaded, "source", None),
            "source": getattr(loaded, "source", None),
            "adapter": getattr(loaded, "adapter", None) or self.adapter,
            "engine": getattr(loaded, "engine", "transformers"),
            "device": getattr(loaded, "device", None),
            "dtype": getattr(loaded, "dtype", None),
            "index": str(getattr(self.store, "path", None)),
            "facts": len(self.store.facts),
            "warnings": [w for w in [getattr(self.store, "warning", None)] if w],
            "xattn": {"available": self.xattn_available, "reason": self.xattn_reason},
            "queue": self.jobs.stats(),
            "max_history_turns": MAX_HISTORY_TURNS,
        }

    # -- retrieval and knowledge (ui.loading.Knowledge, under its lock) ----------------------------------
    def retriever(
        self, mode: str | None = None, threshold: float | None = None, k: int | None = None
    ) -> SearchAt:
        return self.knowledge.retriever(mode, threshold, k)

    def defaults(self, mode: str | None = None) -> dict:
        return self.knowledge.defaults(mode)

    def rankings(self, queries: Sequence[str], mode: str | None = None, depth: int = 50) -> list:
        return self.knowledge.rankings(queries, mode, depth)

    def search(self, query: str, mode=None, threshold=None, k=None) -> list:
        return self.knowledge.search(query, mode, threshold, k)

    def edit_store(self, action: str, payload) -> None:
        self.knowledge.edit(action, payload)

    def set_threshold(self, mode: str, value: float, info: dict | None = None) -> None:
        self.knowledge.set_threshold(mode, value, info)

    def plan(self, history: Sequence[dict], user_turn: str, options: TurnOptions | None = None) -> TurnPlan:
        """Retrieval and the prompt for one turn, exactly as the model will get them."""
        options = options or TurnOptions()
        user_turn = check_user_turn(user_turn)
        with self.knowledge.lock:
            retriever = self.retriever(options.mode, options.threshold, options.k)
            return plan_turn(
                self.persona,
                retriever,
                history,
                user_turn,
                include_context=options.context_mode != "xattn",
            )

    # -- generation ----------------------------------------------------------------------------------------
    def submit(self, history: Sequence[dict], user_turn: str, options: TurnOptions | None = None) -> Job:
        """Plan now (so the context is known at once), generate when the model is free."""
        options = options or TurnOptions()
        if options.context_mode == "xattn" and not self.xattn_available:
            raise RagPersonaError(f"cross-attention mode is unavailable: {self.xattn_reason}")
        plan = self.plan(history, user_turn, options)
        job = Job("turn", plan=plan, options=options)
        job.fn = functools.partial(self._generate, job)
        job.history, job.user_turn = list(history), check_user_turn(user_turn)
        return self.jobs.put(job)

    def run_exclusive(self, fn: Callable[[], object], timeout: float = 1800.0):
        """Run fn on the model worker (nothing generates meanwhile) and return its result."""
        return self.jobs.run_exclusive(fn, timeout)

    def respond(self, history: Sequence[dict], user_turn: str, options: TurnOptions | None = None):
        """(plan, Reply) for one turn, blocking."""
        job = self.submit(history, user_turn, options)
        for kind, value in job.events():
            if kind == "error":
                raise value
        return job.plan, job.result

    def _generate(self, job: Job) -> Reply:
        opts = job.options
        settings = _CancellableSettings(**vars(opts.generation), cancel=job.cancel_event)
        if opts.context_mode == "xattn":
            # the library's cross-attention turn, fed the facts already retrieved for this job
            xchat = self.slot.xattn_chat(self.store, self.persona)
            xchat.retriever, xchat.settings = _Retrieved(job.plan.context), settings
            plan, stream = xchat.stream(job.history, job.user_turn)
            if plan.messages != job.plan.messages:  # pragma: no cover - the builder is deterministic
                raise RagPersonaError("cross-attention: the prompt differs from the planned one")
        else:
            stream = ReplyStream(
                self.loaded,
                job.plan.messages,
                opts.generation,
                cancel=job.cancel_event,
                retrieval_ms=job.plan.retrieval_ms,
            )
        job.put("start")
        for piece in stream:
            if piece:
                job.put("piece", piece)
        if job.cancelled:
            raise Cancelled("cancelled while generating")
        return stream.reply

    def switch_model(
        self, model: str | None, adapter: str | None = None, *, offered_only: bool = True
    ) -> dict:
        """Load another model/adapter for everyone; the old one serves until the new one is ready.

        Only what the server offers (ModelSlot.offered_models / offered_adapters; None: this persona's
        default) unless offered_only=False, for library callers that chose the model themselves. Every
        persona sharing this engine's model gets the new one.
        """
        if offered_only:
            self.slot.check_offered(model, adapter)
        adapter = resolve_adapter(model, adapter, self.persona_ref)

        def load():
            self.slot.switch(model, adapter)
            return self.info()

        return self.run_exclusive(load)

    def close(self) -> None:
        self.jobs.close()


# -- several personas on one server ------------------------------------------------------------------------
class Personas:
    """The engines a server serves, by persona id (persona.json's `id`); the first is the default."""

    def __init__(self, engines: Sequence[Engine]):
        if not engines:
            raise RagPersonaError("personas: serve at least one")
        self.engines: dict[str, Engine] = {}
        for engine in engines:
            if engine.persona.id in self.engines:
                raise RagPersonaError(f"personas: two personas have the id {engine.persona.id!r}")
            self.engines[engine.persona.id] = engine
        self.default = engines[0]

    @classmethod
    def of(cls, served: Engine | Personas) -> Personas:
        """One engine as a registry of one (what `create_app(engine)` has always taken), or the registry."""
        return served if isinstance(served, Personas) else cls([served])

    @property
    def ids(self) -> list[str]:
        return list(self.engines)

    def __len__(self) -> int:
        return len(self.engines)

    def __iter__(self) -> Iterator[Engine]:
        return iter(self.engines.values())

    def get(self, persona_id: str | None) -> Engine:
        """The persona's engine; None or "" is the default, an unknown id a RagPersonaError naming the ids."""
        if not persona_id:
            return self.default
        engine = self.engines.get(persona_id)
        if engine is None:
            raise RagPersonaError(f"persona {persona_id!r}: not served here; the personas are {self.ids}")
        return engine

    def models(self) -> list[ModelSlot]:
        """The loaded models, each once however many personas share it."""
        return list({id(engine.slot): engine.slot for engine in self}.values())

    def close(self) -> None:
        for engine in self:
            engine.close()


def check_personas(personas: Sequence[str], index: str | Path | None = None) -> None:
    """Each --persona names a folder holding persona.json, none twice, and --index comes with one persona
    at most; one error line for the first problem (before any model or index loads)."""
    if index is not None and len(personas) > 1:
        raise RagPersonaError(
            "--index: only with a single --persona (each persona is served from its own index)"
        )
    settings = get_settings()
    seen: dict[Path, str] = {}
    for ref in personas:
        folder = settings.persona_dir(ref)
        if not (folder / "persona.json").is_file():
            what = "no such folder" if not folder.is_dir() else "no persona.json in it"
            raise RagPersonaError(
                f"--persona {ref}: {folder}: {what} (give an id under knowledge/ or a persona folder)"
            )
        if folder in seen:
            raise RagPersonaError(f"--persona {ref}: the same persona as --persona {seen[folder]}")
        seen[folder] = ref


def serve_personas(
    personas: Sequence[str] | None,
    model: str | None = None,
    adapter: str | None = None,
    *,
    index: str | Path | None = None,
    loader: Loader | None = None,
    xattn_weights: str | Path | None = None,
    progress: Callable[[str], None] = print,
) -> Personas:
    """An engine per persona (ids or folders; none: the settings' persona), the first the default.

    Each gets its own persona.json, index (`index` only when one persona is served) and adapter rule
    (`resolve_adapter(model, adapter, persona)`); personas whose (model, adapter) resolve alike share one
    loaded model and queue.
    """
    check_personas(list(personas or []), index)
    refs: list[str | None] = list(personas or []) or [None]
    loaded: dict[str, tuple[str | None, Persona]] = {}
    for ref in refs:  # every persona.json read (and ids checked) before any model loads
        persona = default_persona(ref)
        if persona.id in loaded:
            raise RagPersonaError(
                f"--persona {ref}: its id {persona.id!r} is already served by --persona {loaded[persona.id][0]}; "
                "each persona needs its own id"
            )
        loaded[persona.id] = (ref, persona)
    engines: list[Engine] = []
    by_model: dict[tuple, Engine] = {}
    for _, persona in loaded.values():
        key = (model, resolve_adapter(model, adapter, persona_ref(persona)))
        engine = Engine(
            model,
            adapter,
            index=index,
            persona=persona,
            loader=loader,
            xattn_weights=xattn_weights,
            progress=progress,
            shares_model_with=by_model.get(key),
        )
        by_model.setdefault(key, engine)
        engines.append(engine)
    return Personas(engines)
