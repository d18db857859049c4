"""Helpers to run the real app over a tiny checkpoint: in-process (ASGI) or as a real
uvicorn server on a loopback port."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator

import httpx
import uvicorn

from server.api.app import create_app
from server.api.state import ServerSettings
from server.async_engine import AsyncEngine
from server.engine import EngineConfig, LLMEngine

MODEL_NAME = "tiny-llama"


def start_engine(model_dir, max_queue_len: int | None = None, **engine_kwargs) -> AsyncEngine:
    config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", **engine_kwargs)
    engine = AsyncEngine(LLMEngine(config), max_queue_len=max_queue_len)
    engine.start()
    return engine


@contextlib.contextmanager
def running_engine(model_dir, **engine_kwargs) -> Iterator[AsyncEngine]:
    """`start_engine`, shut down on exit (module-scoped fixtures yield from it)."""
    engine = start_engine(model_dir, **engine_kwargs)
    try:
        yield engine
    finally:
        engine.shutdown()


def make_app(engine: AsyncEngine, **settings):
    return create_app(ServerSettings(served_model_name=MODEL_NAME, **settings), engine=engine)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health").status_code == 200:
                break
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def metric(text: str, name: str) -> float:
    """Value of an unlabelled sample in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)
