"""What the routes share, kept on `app.state.workmem` (no module globals)."""
from __future__ import annotations

import logging
import threading
import time
import re
from dataclasses import dataclass, field
from typing import Callable

from server.async_engine import AsyncEngine, EngineStats
from server.engine.config import DEFAULT_SESSION_TTL_S
from server.metrics import Metrics
from server.sampling_defaults import OPENAI_DEFAULTS, SamplingDefaults

DEFAULT_MAX_REQUEST_BYTES = 4 << 20
DEFAULT_QUEUE_RETRY_AFTER_S = 1  # Retry-After sent with 429 queue-full and 503 draining answers
DEFAULT_MAX_TOKENS = 2048  # chat/session turns that give no max_tokens (capped by the context)
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0  # how long SIGTERM lets in-flight streams finish
DEFAULT_BODY_TIMEOUT_S = 10.0
DEFAULT_MAX_STORED_RESPONSES = 512  # responses kept (they are sessions: below --max-sessions' default)
log = logging.getLogger("workmem.server")
REPLICA_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")  # what a proxy's rule can find in a session id


@dataclass(frozen=True)
class ServerSettings:
    """HTTP-side settings (the engine has its own EngineConfig). With `api_keys`, every
    route but /health (and /metrics when `metrics_public`) needs one of them, and sessions
    belong to the key that created them."""

    served_model_name: str
    api_keys: tuple[str, ...] = ()
    metrics_public: bool = False
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_queue_len: int | None = None
    retry_after_s: int = DEFAULT_QUEUE_RETRY_AFTER_S
    session_ttl_s: float = DEFAULT_SESSION_TTL_S
    max_tokens_default: int = DEFAULT_MAX_TOKENS
    max_tokens_limit: int | None = None  # None: the context length is the only cap
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # a request body must arrive whole within it
    cors_origins: tuple[str, ...] = ()  # browsers' origins allowed to call the API; none: no CORS headers
    sampling_defaults: SamplingDefaults = OPENAI_DEFAULTS  # what absent sampling fields become
    web_ui: bool = True  # GET / serves the chat page (server/web/); --no-ui turns it off
    reasoning_parser: str = "auto"  # server/api/reasoning.py REASONING_PARSERS: <think> if the template has it
    hosted_tools: str = "reject"  # Responses tools of a type other than function: 400 ("reject") or left out ("drop")
    tool_call_parser: str = "auto"  # server/api/tools.py TOOL_CALL_PARSERS: the template's format, else generic
    max_stored_responses: int = DEFAULT_MAX_STORED_RESPONSES  # store: true beyond it drops the soonest to expire
    replica_id: str = ""  # names this replica in the ids of sessions it creates ("sess_<id>.<random>"); "": none

    def __post_init__(self) -> None:
        if self.max_stored_responses < 1:
            raise ValueError(f"max_stored_responses must be at least 1, got {self.max_stored_responses}")
        if self.replica_id and not REPLICA_ID.fullmatch(self.replica_id):
            raise ValueError(f"replica id {self.replica_id!r}: use 1-40 of a-z, 0-9 and '-', starting with "
                             "a letter or digit")


@dataclass
class AppState:
    """The engine (once loaded), metrics and settings of one app."""

    settings: ServerSettings
    engine: AsyncEngine | None = None
    load_error: str | None = None
    draining: bool = False  # set at SIGTERM: new requests get 503, in-flight ones finish
    started: float = field(default_factory=time.time)
    metrics: Metrics = field(init=False)
    responses: dict = field(default_factory=dict)  # response id -> responses.Running, while it generates

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.engine.stats if self.engine else EngineStats())

    def load_in_background(self, load: Callable[[], AsyncEngine],
                           on_failure: Callable[[str], None] | None = None) -> threading.Thread:
        """Build the engine off the event loop; /health answers 503 until it is ready. A load
        that fails is logged with its reason, which /health and every generation route then
        report; `on_failure(reason)` runs next (`workmem serve` exits unless told to stay up)."""

        def run() -> None:
            try:
                self.engine = load()
            except Exception as exc:
                self.load_error = f"{type(exc).__name__}: {exc}"
                log.error("model failed to load: %s", self.load_error, exc_info=exc)
                if on_failure is not None:
                    on_failure(self.load_error)

        thread = threading.Thread(target=run, name="workmem-load", daemon=True)
        thread.start()
        return thread
