"""Two real `workmem serve` replicas behind a real nginx running deploy/nginx.conf (its host
names and ports pointed at loopback): sessions are spread at creation and their turns
reach the replica their id names; after one replica is killed with -9, every session's next
turns continue on the other, from the shared --session-dir, with exactly the tokens that
sessions never touched by the kill produce."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.server_fixtures import free_port
from tests.test_live_server import MODEL, _start, _stop

REPO = Path(__file__).resolve().parents[1]
NGINX_CONF = REPO / "deploy" / "nginx.conf"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
REPLICAS = ("workmem-0", "workmem-1")  # the host names and replica ids deploy/nginx.conf routes
NUM_SESSIONS = 4  # per kind (under test / reference), spread over both replicas
TURNS = ["Hello there.", "Tell me about memory.", "And about caches?", "Thanks, bye."]
KILL_AFTER = 2  # turns each session takes before the kill
PARAMS = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
NGINX_START_S = 10

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed: `apt-get install -y nginx` (.ci/run does it when root)")


def render_conf(ports: dict[str, int], listen: int, work: Path) -> str:
    """deploy/nginx.conf on loopback: replica host names -> ports, own temp/log paths, one worker."""
    text = NGINX_CONF.read_text()
    for host, port in ports.items():
        assert f"{host}:8000" in text
        text = text.replace(f"{host}:8000", f"127.0.0.1:{port}")
    paths = "".join(f"    {kind}_temp_path {work / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    for old, new in (("listen 8000;", f"listen 127.0.0.1:{listen};"), ("worker_processes auto;", "worker_processes 1;"),
                     ("http {\n", f"http {{\n{paths}    access_log {work / 'access.log'};\n")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def nginx_cmd(conf: Path, work: Path) -> list[str]:
    user = "user root;" if os.geteuid() == 0 else ""  # workers must reach the temp dirs under tmp_path
    return [NGINX, "-c", str(conf), "-e", str(work / "error.log"), "-g", f"pid {work / 'nginx.pid'}; daemon off; {user}"]


def start_nginx(conf: Path, work: Path, url: str) -> subprocess.Popen:
    check = subprocess.run([*nginx_cmd(conf, work), "-t"], capture_output=True, text=True)
    assert check.returncode == 0, f"nginx -t rejected deploy/nginx.conf:\n{check.stderr}"
    proc = subprocess.Popen(nginx_cmd(conf, work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + NGINX_START_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, (work / "error.log").read_text()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.terminate()
    pytest.fail(f"nginx not answering after {NGINX_START_S} s:\n{(work / 'error.log').read_text()}")


def create(url: str, i: int) -> str:
    r = httpx.post(f"{url}/v1/sessions", json={"messages": [{"role": "system", "content": f"You are helper {i}."}]})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def turn(url: str, sid: str, i: int, k: int) -> str:
    text = f"{TURNS[k]} (from {i})"
    r = httpx.post(f"{url}/v1/sessions/{sid}/chat/completions",
                   json={"messages": [{"role": "user", "content": text}], **PARAMS}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def served_by(srv, sid: str) -> int:
    """How many turns of session `sid` this replica's access log shows."""
    return len(re.findall(rf"POST /v1/sessions/{re.escape(sid)}/chat/completions", srv.log()))


def test_sessions_fail_over_to_the_other_replica_with_identical_tokens(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama")
    shared = tmp_path / "sessions"
    work = tmp_path / "nginx"
    work.mkdir()
    with ThreadPoolExecutor(len(REPLICAS)) as pool:
        servers = dict(zip(REPLICAS, pool.map(lambda r: _start(model, tmp_path / f"{r}.log", (
            "--session-dir", str(shared), "--replica-id", r)), REPLICAS)))
    listen = free_port()
    url = f"http://127.0.0.1:{listen}"
    conf = work / "nginx.conf"
    conf.write_text(render_conf({r: int(s.url.rsplit(":", 1)[1]) for r, s in servers.items()}, listen, work))
    nginx = start_nginx(conf, work, url)
    try:
        check_fail_over(url, servers)
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(10)
        for srv in servers.values():
            _stop(srv)


def check_fail_over(url: str, servers: dict) -> None:
    reference = {i: create(url, i) for i in range(NUM_SESSIONS)}
    tested = {i: create(url, i) for i in range(NUM_SESSIONS)}
    replica_of = {sid: sid.split(".")[0].removeprefix("sess_") for sid in [*reference.values(), *tested.values()]}
    assert set(replica_of.values()) == set(REPLICAS)  # creation spread by least connections
    expected = {i: [turn(url, sid, i, k) for k in range(len(TURNS))] for i, sid in reference.items()}
    got = {i: [turn(url, sid, i, k) for k in range(KILL_AFTER)] for i, sid in tested.items()}
    for sid, replica in replica_of.items():  # every turn reached the replica its id names
        assert served_by(servers[replica], sid) == (len(TURNS) if sid in reference.values() else KILL_AFTER)

    victim, survivor = servers[REPLICAS[0]], servers[REPLICAS[1]]
    victim.proc.kill()  # kill -9: nothing saved beyond the completed turns
    victim.proc.wait()
    for i, sid in tested.items():
        got[i] += [turn(url, sid, i, k) for k in range(KILL_AFTER, len(TURNS))]
    assert got == expected
    moved = [sid for sid in tested.values() if replica_of[sid] == REPLICAS[0]]
    assert moved and all(served_by(survivor, sid) == len(TURNS) - KILL_AFTER for sid in moved)

    listed = httpx.get(f"{url}/v1/sessions", params={"limit": 100}).json()["data"]
    assert {s["id"] for s in listed} == set(replica_of)  # the shared directory, every replica's sessions
    assert httpx.delete(f"{url}/v1/sessions/{moved[0]}").status_code == 200
    assert httpx.get(f"{url}/v1/sessions/{moved[0]}").status_code == 404
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60) as oai:
        chunks = list(oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                  stream=True, max_tokens=8, extra_body={"ignore_eos": True}))
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed through nginx
