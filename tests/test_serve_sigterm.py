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


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_hf, tmp_path):
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
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
            time.sleep(1)
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
