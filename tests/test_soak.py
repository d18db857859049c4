"""The short soak (issue 10): mixed traffic against a real server whose KV pool is far
smaller than the demand, a third of streamed clients hanging up mid-stream."""
from __future__ import annotations

import asyncio
import subprocess
import sys

from loadtest.soak import run_soak
from tests.server_fixtures import free_port
from tests.test_shutdown import _wait_healthy


def test_short_soak_keeps_every_promise(tiny_checkpoint):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server", "serve", "--model", str(tiny_checkpoint("llama")), "--dtype", "float32",
           "--port", str(port), "--num-kv-blocks", "40", "--block-size", "8", "--max-model-len", "256",
           "--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_healthy(url, proc)
        report = asyncio.run(run_soak(url, requests=120, concurrency=16, seed=1, max_seconds=240, words=(2, 10)))
        print(report)
        assert report.failures == []  # no 5xx, nothing short, preemptions > 0, used == pinned at the end
        assert report.kept_ok > 40 and report.vanished > 0 and report.sessions_created > 0
        assert sum(report.client_errors.values()) < report.started // 4, report.client_error_samples
        assert len(report.rss_mib) == 3 and all(r > 0 for r in report.rss_mib)
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
