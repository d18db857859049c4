"""AsyncEmbedder: an Embedder on its own thread, fed from asyncio.

Requests queue their inputs; each step the thread takes every queued request (so many
requests share one forward) and answers each with its rows. It stands where AsyncEngine
stands in `app.state.workmem.engine` and offers the part of its surface the app reads
(tokenizer, max_model_len, is_alive, stats, kernels, shutdown, fail_all); `task` tells the
routes which endpoints it serves.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass

import torch

from server.async_engine import QueueFullError, ShutdownError
from server.engine.embedder import Embedder
from server.engine.stats import EngineStats

log = logging.getLogger("workmem.embedder")


@dataclass
class _Job:
    inputs: list[list[int]]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class AsyncEmbedder:
    """Runs `embedder` on a worker thread; `await embed(inputs)` from the event loop.
    At most `max_queue_len` requests wait (QueueFullError beyond; None: no limit)."""

    task = "embed"
    rank_lost = False
    kernels = {"backend": "torch", "variant": None}

    def __init__(self, embedder: Embedder, max_queue_len: int | None = None) -> None:
        self.embedder = embedder
        self.max_queue_len = max_queue_len
        self.stats = EngineStats()
        self.error: BaseException | None = None
        self._inbox: queue.Queue[_Job | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def tokenizer(self):
        return self.embedder.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.embedder.max_model_len

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="workmem-embedder", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        self.fail_all("the server is shutting down")

    def close(self) -> None:
        """Nothing to stop beyond the thread (no tensor-parallel followers)."""

    def fail_all(self, reason: str) -> None:
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                _settle(job, None, ShutdownError(reason))

    async def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        """[len(inputs), dim] float32 for valid token id lists (the route checks them)."""
        if not self.is_alive:
            raise ShutdownError("the embedder is not running")
        if self.max_queue_len is not None and self._inbox.qsize() >= self.max_queue_len:
            raise QueueFullError(f"{self._inbox.qsize()} requests are already waiting")
        loop = asyncio.get_running_loop()
        job = _Job(inputs, loop.create_future(), loop)
        self._inbox.put(job)
        return await job.future

    def _run(self) -> None:
        while not self._stop.is_set():
            first = self._inbox.get()
            jobs = [first] if first is not None else []
            while True:  # everything queued now rides in this step
                try:
                    job = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    jobs.append(job)
            if jobs:
                self._step(jobs)

    def _step(self, jobs: list[_Job]) -> None:
        try:
            rows = self.embedder.embed([ids for job in jobs for ids in job.inputs])
        except Exception as exc:  # a failed forward fails its requests, never the thread
            log.exception("embedding step failed")
            for job in jobs:
                _settle(job, None, exc)
            return
        start = 0
        for job in jobs:
            _settle(job, rows[start:start + len(job.inputs)], None)
            start += len(job.inputs)


def _settle(job: _Job, result, error: BaseException | None) -> None:
    def done() -> None:
        if not job.future.done():
            job.future.set_exception(error) if error is not None else job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(done)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass
