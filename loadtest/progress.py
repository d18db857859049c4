"""Live progress while a run is in flight: requests completed/failed and the current
output rate. A `rich` progress bar on a terminal (the `bench` extra); otherwise one plain
line to stderr every PLAIN_INTERVAL_S."""
from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from loadtest.client import LiveStats

REFRESH_S = 0.25  # rich bar refresh period
PLAIN_INTERVAL_S = 5.0  # plain-text progress line period
RATE_WINDOW_S = 2.0  # "current" output rate = chunks over this trailing window


class RateMeter:
    """Chunks/s over the trailing RATE_WINDOW_S, from periodic samples of a counter."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque()

    def rate(self, count: int, now: float) -> float:
        self.samples.append((now, count))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW_S:
            self.samples.popleft()
        t0, c0 = self.samples[0]
        return (count - c0) / (now - t0) if now > t0 else 0.0


def _rich_display(label: str, total: int | None) -> tuple[Callable[[LiveStats, float], None], Callable[[], None]] | None:
    """(update, stop) of a rich progress bar on stderr, or None without rich or a terminal."""
    if not sys.stderr.isatty():
        return None
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )
    except ImportError:
        return None
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("failed {task.fields[failed]}"), TextColumn("{task.fields[rate]:.1f} out tok/s"),
                   TimeElapsedColumn(), console=Console(stderr=True))
    task = bar.add_task(label, total=total, failed=0, rate=0.0)
    bar.start()

    def update(live: LiveStats, rate: float) -> None:
        bar.update(task, completed=live.completed + live.failed, failed=live.failed, rate=rate)

    return update, bar.stop


def _plain_display(label: str) -> tuple[Callable[[LiveStats, float], None], Callable[[], None]]:
    last = [time.perf_counter()]

    def update(live: LiveStats, rate: float) -> None:
        if time.perf_counter() - last[0] >= PLAIN_INTERVAL_S:
            last[0] = time.perf_counter()
            of = f"/{live.total}" if live.total else ""
            print(f"[{label}] {live.completed}{of} done, {live.failed} failed, {rate:.1f} out tok/s",
                  file=sys.stderr, flush=True)

    return update, lambda: None


@contextlib.asynccontextmanager
async def live_progress(live: LiveStats, label: str, enabled: bool = True) -> AsyncIterator[None]:
    """Show `live` while the body runs (nothing when not `enabled`)."""
    if not enabled:
        yield
        return
    update, stop = _rich_display(label, live.total) or _plain_display(label)
    meter = RateMeter()

    async def refresh() -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            update(live, meter.rate(live.chunks, time.perf_counter()))

    task = asyncio.create_task(refresh())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        update(live, meter.rate(live.chunks, time.perf_counter()))
        stop()
