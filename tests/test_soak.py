"""The short soak (issues 10 and 24): every kind of request against a real server whose KV
pool is far smaller than the demand, a third of streamed clients hanging up mid-stream,
malformed requests, and the server killed with -9 and restarted on its --session-dir
halfway. `loadtest.soak.failures` holds the promises: no 5xx on a valid request, the pool
back to what live sessions pin, no kept session lost, resident memory within
RSS_GROWTH_BOUND_MIB of its warm baseline, no fds or threads leaked."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

from loadtest.soak import failures, run_soak
from tests.server_fixtures import free_port
from tests.test_shutdown import _wait_healthy

# The bound this short run states: its warm baseline comes soon after the restart, in a fresh
# process still paying first-use costs (measured 119 MiB from warm to end here, 2026-12-04), so
# it is looser than DEFAULT_MAX_RSS_GROWTH_MIB (64, for long runs); a leak of ~1.5 MiB per
# request after warm-up exceeds it.
RSS_GROWTH_BOUND_MIB = 192.0
KINDS = {"session turn", "structured", "tool call", "responses", "messages", "malformed"}


def test_short_soak_keeps_every_promise(tiny_checkpoint, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server", "serve", "--model", str(tiny_checkpoint("llama")), "--dtype", "float32",
           "--port", str(port), "--num-kv-blocks", "40", "--block-size", "8", "--max-model-len", "256",
           "--session-dir", str(tmp_path / "sessions"), "--log-level", "warning", "--no-access-log"]
    log_path = tmp_path / "server.log"

    def start() -> subprocess.Popen:
        with log_path.open("ab") as log:  # a file, not a pipe nobody reads (a full pipe blocks the server)
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    procs = [start()]

    async def restart() -> None:
        procs[-1].send_signal(signal.SIGKILL)
        await asyncio.to_thread(procs[-1].wait)
        procs.append(start())

    try:
        _wait_healthy(url, procs[0])
        report = asyncio.run(run_soak(url, requests=160, concurrency=16, seed=1, max_seconds=300, words=(2, 10),
                                      restart=restart))
        print(report)
        assert failures(report, RSS_GROWTH_BOUND_MIB) == [], log_path.read_text(errors="replace")[-4000:]
        assert report.restarts == 1 and KINDS <= report.by_kind.keys()
        assert report.kept_ok > 40 and report.vanished > 0 and report.sessions_created > 0 and report.malformed_ok > 0
        assert sum(report.client_errors.values()) < report.started // 4, report.client_error_samples
        assert all(report.rss_mib[p] > 0 for p in ("start", "warm", "end")) and report.threads["end"] > 0
    finally:
        procs[-1].terminate()
        assert procs[-1].wait(timeout=60) == 0
