"""uvicorn, hardened: a drain that ends in exit status 0, and a deadline for request heads.

On the first SIGTERM/SIGINT: the app starts answering new requests 503 + Retry-After
(`AppState.draining`), uvicorn stops accepting connections, and in-flight streams get up
to `shutdown_timeout_s` to finish. Then the streams still running are failed (each gets a
final SSE error event and its blocks are freed), the engine stops and saves what
`--session-dir` asks for, and `serve()` returns normally. uvicorn itself would re-raise the
signal after a clean drain (status 143, which process managers record as a crash); this
server does not. A second signal stops at once (status 1).

uvicorn times out idle keep-alive connections but not one that opens and never finishes
sending a request head; `HeadTimeoutH11Protocol` closes those after `--timeout-request-head`
seconds (the app's middleware bounds the body the same way).
"""
from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.api.state import AppState

log = logging.getLogger("workmem.server")
ABORT_GRACE_S = 2.0  # after failing the late streams, how long their final events get to go out


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose first signal drains (see module doc) and second one forces."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state
        self.forced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:  # a second signal, whichever
            self.force_exit = self.forced = True
        self.should_exit = True
        self.state.draining = True  # not appended to _captured_signals: nothing is re-raised

    async def shutdown(self, sockets=None) -> None:
        self.state.draining = True
        timeout = self.state.settings.shutdown_timeout_s
        watchdog = asyncio.ensure_future(self._fail_late_streams(timeout))
        try:
            await super().shutdown(sockets)
        finally:
            watchdog.cancel()

    async def _fail_late_streams(self, timeout: float) -> None:
        await asyncio.sleep(timeout)
        engine = self.state.engine
        if engine is not None:
            log.warning("shutdown timeout (%.0f s) passed: failing the requests still running", timeout)
            engine.fail_all("the server is shutting down")


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol; a request head must arrive whole within `head_timeout` s
    of the connection opening or of the next request's first byte."""

    head_timeout: float = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self._head_timer is None:  # the next request on a kept-alive connection
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)
        super().data_received(data)
        if self._head_timer is not None and self.cycle is not None and not self.cycle.response_complete:
            self._head_timer.cancel()  # a whole head arrived: the app's body timeout takes over
            self._head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def serve(app, state: AppState, head_timeout: float, **uvicorn_kwargs) -> int:
    """Run `app` until a signal drains it; 0 after a drain, 1 after a forced stop."""
    settings = state.settings
    protocol = type("HeadTimeoutH11", (HeadTimeoutH11Protocol,), {"head_timeout": head_timeout})
    config = uvicorn.Config(app, http=protocol, timeout_graceful_shutdown=int(settings.shutdown_timeout_s + ABORT_GRACE_S),
                            **uvicorn_kwargs)
    server = GracefulServer(config, state)
    server.run()
    return 1 if server.forced else 0
