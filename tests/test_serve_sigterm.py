"""``jobs/serve.py`` as systemd, Kubernetes and ``ray job stop`` end it: SIGTERM while requests are
in flight. Every in-flight request finishes, then Serve and Ray stop and the process exits 0."""

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from cerbero_ray.config import REPO_DIR
from conftest import free_port

pytestmark = pytest.mark.integration


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, json.loads(r.read())


def _start(tiny_hf, tmp_path, **popen):
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO_DIR, "jobs", "serve.py"),
            f"serve.checkpoint={tiny_hf}",
            f"serve.port={port}",
            "cluster.num_cpus=2",
            "serve.max_batch_size=4",
            "serve.shutdown_grace_s=60",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the server did not come up")
        time.sleep(1)


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_hf, tmp_path):
    proc, url = _start(tiny_hf, tmp_path)
    try:
        body = {
            "messages": [{"role": "user", "content": "Raccontami una storia."}],
            "max_tokens": 48,
            "temperature": 0.8,
            "seed": 1,
        }
        with cf.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(_post, f"{url}/v1/chat/completions", body) for _ in range(6)]
            time.sleep(1.5)  # the requests are in flight
            proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        assert [s for s, _ in results] == [200] * 6
        assert all(r["choices"][0]["finish_reason"] in ("stop", "length") for _, r in results)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
        assert "[serve] stopped" in out and "core dumped" not in out.lower()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_to_the_whole_process_group_exits_at_once_and_says_why(tiny_hf, tmp_path):
    """systemd's default KillMode, `timeout` and `kill -- -PGID` signal Ray's own processes too: no
    drain is possible then. The job says so and exits 143 in seconds, not after a minute's wait
    for a GCS that is gone."""
    proc, url = _start(tiny_hf, tmp_path, start_new_session=True)
    try:
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
        assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
        assert "KillMode=mixed" in out and "Failed to connect to GCS" not in out
        assert took < 30, took
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
