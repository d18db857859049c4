"""A failed start is loud: a real `python -m server serve` whose model cannot load logs the
reason and exits with EXIT_LOAD_FAILED (as vLLM and llama.cpp exit), unless
--stay-up-on-load-failure keeps it up answering /health 503 with the reason."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.cli import EXIT_LOAD_FAILED
from tests.server_fixtures import free_port

REPO = Path(__file__).resolve().parents[1]
EXIT_TIMEOUT_S = 120  # start-up (imports) plus the failed load, on a loaded 2-core machine


def _serve(model_dir: Path, log_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKMEM_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "server", "serve", "--model", str(model_dir), "--dtype", "float32",
           "--device", "cpu", "--port", str(port), "--max-model-len", "256", *extra]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture
def unsupported_dir(tiny_checkpoint, tmp_path) -> Path:
    """A checkpoint whose config names an architecture workmem does not run."""
    model = tmp_path / "mamba"
    shutil.copytree(tiny_checkpoint("llama"), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    return model


@pytest.mark.parametrize("case", ["unsupported architecture", "missing file", "KV pool too small"])
def test_serve_logs_the_reason_and_exits_nonzero(case, unsupported_dir, tiny_checkpoint, tmp_path):
    model, extra, reason = {
        "unsupported architecture": (unsupported_dir, (), "unsupported model_type 'mamba'"),
        "missing file": (tmp_path / "nowhere.gguf", (), "nowhere.gguf"),
        "KV pool too small": (tiny_checkpoint("llama"), ("--num-kv-blocks", "2"), "cannot hold one sequence"),
    }[case]
    proc, _ = _serve(model, tmp_path / "server.log", *extra)
    try:
        code = proc.wait(EXIT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert code == EXIT_LOAD_FAILED, log
    assert "model failed to load" in log and reason in log


def test_stay_up_flag_keeps_health_503_with_the_reason(unsupported_dir, tmp_path):
    proc, url = _serve(unsupported_dir, tmp_path / "server.log", "--stay-up-on-load-failure")
    try:
        deadline, body = time.monotonic() + EXIT_TIMEOUT_S, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                r = httpx.get(url + "/health", timeout=2)
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            assert r.status_code == 503
            if "failed to load" in r.json()["error"]["message"]:
                body = r.json()
                break
            time.sleep(0.1)
        assert body is not None, (tmp_path / "server.log").read_text(errors="replace")
        assert "unsupported model_type 'mamba'" in body["error"]["message"]
        assert proc.poll() is None  # still up for the orchestrator to read
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(EXIT_TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
