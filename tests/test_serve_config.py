"""The shipped Serve config file (deploy/serve.yaml) through Ray Serve's own CLI, as an operator runs
it: `serve run <file>` starts Ray, builds the app with cerbero_ray.serve.app:build_app from the file's
args, and answers on the file's port. Only the checkpoint, the port and the resources are changed."""

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest
import yaml

from cerbero_ray.config import REPO_DIR
from conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a whole `serve run` CLI start: about a minute


def test_serve_run_with_the_shipped_config_file(tmp_path, tiny_hf):
    cfg = yaml.safe_load(open(os.path.join(REPO_DIR, "deploy", "serve.yaml")))
    port = free_port()
    cfg["http_options"] = {"host": "127.0.0.1", "port": port}
    (app,) = cfg["applications"]
    assert app["import_path"] == "cerbero_ray.serve.app:build_app"
    app["args"].update(checkpoint=tiny_hf, gpus_per_replica=0, cpus_per_replica=0.5, max_replicas=1)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as on a laptop
    proc = subprocess.Popen(
        ["serve", "run", str(path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, ready = time.monotonic() + 180, False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            try:
                with urllib.request.urlopen(f"{url}/ready", timeout=5) as r:
                    ready = r.status == 200
            except OSError:
                time.sleep(1)
        assert ready, f"not ready; serve run exited {proc.poll()}"
        req = urllib.request.Request(
            f"{url}/v1/chat/completions",
            method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"messages": [{"role": "user", "content": "Ciao!"}], "max_tokens": 6}).encode(),
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            body = json.loads(r.read())
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= 6
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == ["cerbero"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: serve run shuts the app and its Ray down
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
