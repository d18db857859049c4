"""What one benchmark run is: a frozen `BenchConfig`, its named defaults, and the small
parsers for `--slo` and `--compare` targets."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_NUM_REQUESTS = 64
DEFAULT_INPUT_LEN = 128  # words of the generated prompt, each ~1 token in common BPE vocabularies
DEFAULT_OUTPUT_LEN = 128  # max_tokens per request (exact with --ignore-eos)
DEFAULT_RANGE_RATIO = 0.0  # lengths uniform in [len * (1 - r), len * (1 + r)]
DEFAULT_SHARED_PREFIX_LEN = 256  # words every shared-prefix request starts with
DEFAULT_NUM_SESSIONS = 4
DEFAULT_TURNS = 4
DEFAULT_WARMUP = 2  # requests sent (and not measured) before the run
DEFAULT_BURSTINESS = 1.0  # gamma shape of inter-arrival times; 1 = Poisson
DEFAULT_TIMEOUT_S = 600.0  # per request
DEFAULT_SCRAPE_INTERVAL_S = 0.5  # /metrics polling period during the run
DEFAULT_SEED = 0

Endpoint = Literal["completions", "chat"]
WORKLOADS = ("random", "shared-prefix", "sessions", "sharegpt-like", "copy")
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")


@dataclass(frozen=True)
class BenchConfig:
    """Everything that defines a run against one server. `request_rate` is requests (for
    `sessions`: conversations) per second, `inf` = all at once; `concurrency` caps the
    requests in flight (None = no cap); `duration_s` stops issuing new requests after that
    many seconds; `num_requests` None = until `duration_s`."""

    url: str = DEFAULT_URL
    model: str | None = None
    api_key: str | None = None
    endpoint: Endpoint = "completions"
    workload: str = "random"
    concurrency: int | None = None
    request_rate: float = math.inf
    burstiness: float = DEFAULT_BURSTINESS
    num_requests: int | None = DEFAULT_NUM_REQUESTS
    duration_s: float | None = None
    input_len: int = DEFAULT_INPUT_LEN
    output_len: int = DEFAULT_OUTPUT_LEN
    range_ratio: float = DEFAULT_RANGE_RATIO
    shared_prefix_len: int = DEFAULT_SHARED_PREFIX_LEN
    num_sessions: int = DEFAULT_NUM_SESSIONS
    turns: int = DEFAULT_TURNS
    keep_sessions: bool = False
    use_session_api: bool = True  # sessions: False resends the history even where /v1/sessions exists
    ignore_eos: bool = True
    warmup: int = DEFAULT_WARMUP
    slo: dict[str, float] = field(default_factory=dict)
    seed: int = DEFAULT_SEED
    timeout_s: float = DEFAULT_TIMEOUT_S
    scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S
    progress: bool = True

    def parameters(self) -> dict:
        """The run's parameters for the result JSON (no API key; inf as None)."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("api_key", "progress")}
        out["request_rate"] = None if math.isinf(self.request_rate) else self.request_rate
        return out


def parse_slo(text: str | None) -> dict[str, float]:
    """`"ttft_ms=500,tpot_ms=50"` -> {"ttft_ms": 500.0, "tpot_ms": 50.0}; keys in SLO_KEYS."""
    slo: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in SLO_KEYS:
            raise ValueError(f"--slo: expected KEY=MS with KEY in {', '.join(SLO_KEYS)}, got {part!r}")
        slo[key.strip()] = float(value)
    return slo


def parse_rates(text: str) -> list[float]:
    """`"1,2,4,inf"` -> [1.0, 2.0, 4.0, inf] (requests per second)."""
    rates = [float(r) for r in text.split(",") if r.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"--sweep-rate: expected positive rates, got {text!r}")
    return rates


@dataclass(frozen=True)
class Target:
    """One server of a `--compare` run."""

    url: str
    name: str


def parse_target(text: str, index: int) -> Target:
    """`URL[=name]` -> Target; the name defaults to the URL's host:port."""
    url, sep, name = text.partition("=")
    url = url.rstrip("/")
    return Target(url, name if sep and name else url.split("://", 1)[-1] or f"server{index}")
