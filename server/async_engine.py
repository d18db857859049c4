"""AsyncEngine: the engine runs in its own thread; asyncio code talks to it via messages.

    API (event loop)                      engine thread
    generate() --inbox: _Add(...) ----->  engine.add_request / step() / abort
               <-- per-request asyncio.Queue fed with loop.call_soon_threadsafe --

The event loop never waits on the model. Engine state is touched only by the engine
thread; the API reads `stats`, a snapshot the thread publishes after every step.
A client that goes away (its generate() is closed or cancelled) aborts its request,
whether it is still in the inbox, waiting in the scheduler or running.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable, TypeVar

from model.parallel import RankLostError
from model.sampling import SamplingParams
from server.engine import LLMEngine, StepOutput
from server.engine.limits import RequestLimits
from server.engine.stats import EngineStats

__all__ = ["AsyncEngine", "EngineDeadError", "EngineStats", "QueueFullError", "ShutdownError", "SlowReaderError"]

log = logging.getLogger("workmem.async_engine")
T = TypeVar("T")

IDLE_WAIT_S = 0.5  # how long the idle engine thread blocks on its inbox before re-checking
DEFAULT_MAX_PENDING_OUTPUTS = 8192  # undelivered step outputs per request before it is cut off
SESSION_EXPIRY_INTERVAL_S = 0.5  # how often the engine thread looks for expired sessions


class QueueFullError(RuntimeError):
    """More requests are waiting than `max_queue_len` allows."""


class EngineDeadError(RuntimeError):
    """The engine thread is not running."""


class ShutdownError(RuntimeError):
    """The server stopped this request because it is shutting down."""


class SlowReaderError(RuntimeError):
    """The request's reader fell more than `max_pending` outputs behind; it was aborted."""


@dataclass
class _Request:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    num_seqs: int
    finished: int = 0
    arrival: float = field(default_factory=time.monotonic)


# Inbox messages (event loop -> engine thread).
@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    request: _Request
    session_id: str | None
    new_messages: list[dict] | None
    cache_salt: str | None
    grammar: object | None  # params.structured compiled (llguidance.LLMatcher), or None


@dataclass(frozen=True)
class _Call:
    fn: Callable[[LLMEngine], object]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _FailAll:
    reason: str


@dataclass(frozen=True)
class _RankLost:
    """A tensor-parallel rank is gone (posted by the monitor thread): the engine stops."""

    reason: str


@dataclass(frozen=True)
class _Sweep:
    """The store's sessions expired by `now`, read by the sweep worker: the engine thread
    deletes those it holds no copy of."""

    now: float
    expired: list[str]


@dataclass(frozen=True)
class _Wake:
    """Only wakes the thread (shutdown)."""


_Message = _Add | _Call | _Abort | _FailAll | _RankLost | _Sweep | _Wake


class AsyncEngine:
    """Thread-owned LLMEngine with an asyncio `generate()`; see module doc."""

    def __init__(self, engine: LLMEngine, max_queue_len: int | None = None,
                 max_pending: int = DEFAULT_MAX_PENDING_OUTPUTS) -> None:
        self.engine = engine
        self.max_queue_len = max_queue_len
        self.max_pending = max_pending  # a reader this far behind is cut off (SlowReaderError)
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[str, _Request] = {}  # engine thread's table of live requests
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sweeper: threading.Thread | None = None  # reads the store for the periodic sweep
        self.error: BaseException | None = None
        self.step_listeners: list = []  # callables(list[StepOutput]) run on the engine thread
        self._step_seconds = 0.0  # engine thread only; published in `stats`
        self._idle_seconds = 0.0
        engine.on_rank_lost(lambda reason: self._inbox.put(_RankLost(reason)))  # state changes on our thread

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="workmem-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(_Wake())
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():  # the engine is ours again: keep sessions' KV
                saved = self.engine.save_sessions()
                if saved:
                    log.info("saved the KV of %d resident sessions", saved)

    @property
    def tokenizer(self):
        """The model's tokenizer (thread-safe: the API tokenizes in worker threads)."""
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_encoder_decoder(self) -> bool:
        return self.engine.model_config.is_encoder_decoder

    @property
    def kernels(self) -> dict[str, str | None]:
        """The CPU kernels in use: backend (native | torch) and the native ISA variant."""
        return {"backend": self.engine.kernel_backend, "variant": self.engine.kernel_variant}

    @property
    def limits(self) -> RequestLimits:
        """The engine's request rules (immutable: safe to ask from the event loop)."""
        return self.engine.limits

    @property
    def rank_lost(self) -> bool:
        return self.engine.rank_lost

    def on_rank_lost(self, callback: Callable[[str], None]) -> None:
        """See LLMEngine.on_rank_lost. The callback runs on the thread that notices (the
        monitor's): it may signal, never touch the engine. The engine thread itself learns of
        the loss through its inbox: it fails every request and stops (`is_alive` False)."""
        self.engine.on_rank_lost(callback)

    def close(self) -> None:
        """After shutdown(): stop the tensor-parallel followers, if any. If the engine thread
        outlived shutdown's join (a step still running), no STOP is sent beside that step's
        collectives: the followers are killed instead."""
        self.engine.close(between_steps=self._thread is None or not self._thread.is_alive())

    @property
    def is_alive(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and self.error is None
                and not self.engine.rank_lost)

    # -- the asyncio side -------------------------------------------------------------
    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread (between steps) and return its result."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(_Call(fn, loop, future))
        return await future

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        session_id: str | None = None, new_messages: list[dict] | None = None, cache_salt: str | None = None,
    ) -> AsyncIterator[StepOutput]:
        """Yield the request's StepOutputs until all its sequences finish. Raises
        ValueError for a request the engine rejects, QueueFullError, EngineDeadError.
        Requests share prefix-cache blocks only with requests of the same `cache_salt`."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        if self.max_queue_len is not None and self.stats.num_waiting + self._inbox.qsize() >= self.max_queue_len:
            raise QueueFullError(f"{self.max_queue_len} requests are already waiting")
        grammar = None
        if params.structured is not None:  # compiled in a worker: the request joins when it is ready
            grammar = await asyncio.to_thread(self.engine.compile_grammar, params.structured)
        req = _Request(asyncio.get_running_loop(), _BoundedQueue(self.max_pending), params.n)
        self._inbox.put(_Add(request_id, list(prompt_token_ids), params, req, session_id, new_messages, cache_salt,
                             grammar))
        done = False
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    done = not isinstance(item, SlowReaderError)  # a cut-off request still runs
                    raise item
                yield item
                if item.finished:
                    req.finished += 1
                    if req.finished == req.num_seqs:
                        done = True
                        return
        finally:
            if not done:
                self.abort(request_id)

    async def list_sessions(self, owner: str | None, limit: int, after: str | None = None):
        """SessionTable.listing, with the store's files read and parsed in a worker thread
        first (a directory of transcripts on the engine thread would stall every stream);
        the engine thread only merges them with the copies it holds."""
        files = await asyncio.to_thread(self.engine.read_session_files)
        return await self.call(lambda e: e.sessions.listing(owner, limit, after, files))

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def fail_all(self, reason: str) -> None:
        """Abort every live request; each one's stream raises ShutdownError(reason)."""
        self._inbox.put(_FailAll(reason))

    # -- the engine thread ------------------------------------------------------------
    def _run(self) -> None:
        next_expiry = 0.0
        try:
            self._publish_stats()  # /metrics is right from the first scrape, not after IDLE_WAIT_S
            while not self._stop.is_set():
                block = not self.engine.has_unfinished()
                self._drain_inbox(block)
                if self.engine.has_unfinished():
                    self._step()
                if time.monotonic() >= next_expiry:
                    self.engine.expire_sessions(sweep=False)
                    self._begin_sweep()
                    next_expiry = time.monotonic() + SESSION_EXPIRY_INTERVAL_S
                self._publish_stats()
        except RankLostError as exc:  # the group is broken for good: stop serving
            log.error("engine stopped: tensor parallel rank lost: %s", exc)
            self._die(exc)
        except BaseException as exc:  # the engine is broken: fail everyone, report unhealthy
            log.exception("engine thread died")
            self._die(exc)

    def _begin_sweep(self) -> None:
        """When the store's sweep is due: a worker lists the directory and reads each file's
        first bytes (a shared directory read here would stall every stream), then posts the
        expired ones back (_Sweep); this thread deletes those it still holds no copy of."""
        now = time.time()
        if (self._sweeper is not None and self._sweeper.is_alive()) or not self.engine.sessions.sweep_due(now):
            return

        def read() -> None:
            try:
                self._inbox.put(_Sweep(now, self.engine.read_expired_sessions(now)))
            except Exception:  # noqa: BLE001 - this sweep is skipped; the next one reads again
                log.exception("reading the session store for its sweep failed")

        self._sweeper = threading.Thread(target=read, name="workmem-sweep", daemon=True)
        self._sweeper.start()

    def _die(self, exc: BaseException) -> None:
        self.error = exc
        for req in self._requests.values():
            _send(req, EngineDeadError(f"engine failed: {exc}"))
        self._requests.clear()

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a step failed: fail what was in flight, keep serving
            if isinstance(exc, RankLostError) or self.engine.rank_lost:
                raise  # not this step's fault: the engine is broken for good (see _run)
            log.exception("engine step failed; aborting %d in-flight requests", len(self._requests))
            for request_id, req in list(self._requests.items()):
                self.engine.abort(request_id)
                _send(req, RuntimeError(f"engine step failed: {exc}"))
            self._requests.clear()
            return
        finally:
            self._step_seconds += time.perf_counter() - start
        self._deliver(outputs)
        for listener in self.step_listeners:
            listener(outputs)

    def _drain_inbox(self, block: bool) -> None:
        start = time.perf_counter()
        try:
            message = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        finally:
            if block:
                self._idle_seconds += time.perf_counter() - start
        while True:
            self._handle(message)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, message: _Message) -> None:
        if isinstance(message, _Add):
            try:
                self.engine.add_request(message.request_id, message.prompt, message.params, message.session_id,
                                        message.new_messages, message.cache_salt, message.grammar)
            except ValueError as exc:
                _send(message.request, exc)
                return
            except Exception as exc:  # noqa: BLE001 - this request fails; the engine serves on
                log.exception("request %s could not be added", message.request_id)
                _send(message.request, RuntimeError(f"the request could not be added: {exc}"))
                return
            self._requests[message.request_id] = message.request
        elif isinstance(message, _Call):
            try:
                result, error = message.fn(self.engine), None
            except Exception as exc:  # handed to the caller
                result, error = None, exc
            try:
                message.loop.call_soon_threadsafe(_settle, message.future, result, error)
            except RuntimeError:
                pass  # the caller's loop is gone
        elif isinstance(message, _Abort):
            self._deliver(self.engine.abort(message.request_id))
            self._requests.pop(message.request_id, None)
        elif isinstance(message, _Sweep):
            self.engine.sweep_sessions(message.now, message.expired)
        elif isinstance(message, _RankLost):
            raise RankLostError(message.reason)
        elif isinstance(message, _FailAll):
            for request_id, req in list(self._requests.items()):
                self.engine.abort(request_id)
                _send(req, ShutdownError(message.reason))
            self._requests.clear()

    def _deliver(self, outputs: list[StepOutput]) -> None:
        """Hand a step's outputs over with ONE wake-up per event loop: every
        call_soon_threadsafe writes the loop's self-pipe and hands it the GIL."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepOutput]]] = {}
        for out in outputs:
            req = self._requests.get(out.request_id)
            if req is not None:
                batches.setdefault(req.loop, []).append((req.queue, out))
        for loop, items in batches.items():
            _post(loop, items)
        for out in outputs:  # forget finished requests only after every sibling's output went out
            if out.finished and not self.engine.has_request(out.request_id):
                self._requests.pop(out.request_id, None)

    def _publish_stats(self) -> None:
        self.stats = replace(self.engine.stats(), step_seconds=self._step_seconds, idle_seconds=self._idle_seconds)


def _send(req: _Request, item: StepOutput | BaseException) -> None:
    """Hand an item to the request's event loop (a closed loop just drops it)."""
    _post(req.loop, [(req.queue, item)])


def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, StepOutput | BaseException]]) -> None:
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:
        pass  # the loop is closed


def _put_all(items: list[tuple[asyncio.Queue, StepOutput | BaseException]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class _BoundedQueue(asyncio.Queue):
    """A request's outputs on their way to its reader. Past `limit` undelivered items the
    backlog is dropped for a SlowReaderError: the reader gets it next and its generate()
    aborts the request, so a client that stops reading cannot make the server hoard."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.cut = limit, False

    def put_nowait(self, item) -> None:
        if self.cut:
            return
        if self.qsize() >= self.limit:
            while not self.empty():
                self.get_nowait()
            self.cut = True
            item = SlowReaderError(f"the reader fell more than {self.limit} outputs behind")
        super().put_nowait(item)


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
