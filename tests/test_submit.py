"""The submit path against a real local head (`ray start --head` on loopback), with Ray's token
authentication on and off: our submit command and the plain `ray job submit` CLI. The head runs
under `--block` in its own process group; the test stops exactly that cluster and nothing else."""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from cerbero_ray.config import REPO_DIR
from cerbero_ray.submit import job_spec, submit

pytestmark = pytest.mark.integration


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["token", "disabled"])
def head(request, tmp_path_factory):
    env = {**os.environ, "RAY_AUTH_MODE": request.param}
    if request.param == "token":
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    else:
        env.pop("RAY_AUTH_TOKEN", None)
    temp = tmp_path_factory.mktemp("ray")
    port, dash = free_port(), free_port()
    cmd = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", f"--temp-dir={temp}",
           "--include-dashboard=true", "--disable-usage-stats",
           # its own ports throughout: another cluster on this machine (the embedded one of the
           # other tests) already holds the defaults, and a job agent that cannot bind never comes up
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
           f"--ray-client-server-port={free_port()}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401 with token auth: up, and refusing us as it should
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not start: {proc.stdout.read().decode()[-2000:]}")
            time.sleep(1)
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def check_output(out):
    m = json.load(open(os.path.join(out, "data", "chat_sample", "manifest.json")))
    assert m["documents"] == 107 and m["rows"] >= 1
    assert all(os.path.exists(s["path"]) for s in m["shards"])


def test_submit_both_ways(head, tmp_path, monkeypatch):
    address, env = head
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(k, raising=False)
        if k in env:
            monkeypatch.setenv(k, env[k])
    # 1. our command: composes and checks the config here, runs the stage there (it also waits
    #    for the just-started head's job agent, which comes up after the dashboard)
    out1 = tmp_path / "ours"
    r = subprocess.run([sys.executable, "-m", "cerbero_ray.submit", "--address", address, "--wait", "--timeout", "400",
                        "prepare_data", f"paths.output_dir={out1}", "data.seq_len=2048"],
                       env={**os.environ}, capture_output=True, text=True, timeout=500, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED" in r.stdout
    check_output(out1)
    # 2. the plain CLI, as the README shows it
    out2 = tmp_path / "cli"
    r = subprocess.run(["ray", "job", "submit", "--address", address, "--working-dir", REPO_DIR, "--",
                        "python", "jobs/prepare_data.py", f"paths.output_dir={out2}", "data.seq_len=2048"],
                       env={**os.environ}, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0 and "succeeded" in r.stdout.lower(), r.stdout[-3000:] + r.stderr[-3000:]
    check_output(out2)


def test_bad_config_fails_before_submitting():
    with pytest.raises(Exception, match="seq_lenn"):
        job_spec("prepare_data", ["data.seq_lenn=1"])
    with pytest.raises(ValueError, match="unknown stage"):
        submit("http://127.0.0.1:1", "trian", [])


def test_spec_excludes_outputs_and_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = job_spec("prepare_data", ["paths.output_dir=rel/out", "data=mix_sample"])
    assert spec["runtime_env"]["env_vars"]["CERBERO_OUTPUT_DIR"] == str(tmp_path / "rel" / "out")
    assert "outputs/" in spec["runtime_env"]["excludes"] and spec["runtime_env"]["working_dir"] == REPO_DIR
    # the relative path reaches the job only as the absolute env var
    assert spec["entrypoint"] == "python jobs/prepare_data.py data=mix_sample"


def test_submit_retries_until_the_job_agent_is_up():
    from cerbero_ray.submit import _submit_when_ready

    class Client:
        calls = 0

        def submit_job(self, **kw):
            Client.calls += 1
            if Client.calls < 3:
                raise RuntimeError("Request failed with status code 500: No available agent to submit job")
            return "raysubmit_1"

    assert _submit_when_ready(Client(), {"entrypoint": "x"}, None, wait_s=30) == "raysubmit_1" and Client.calls == 3

    class Broken:
        def submit_job(self, **kw):
            raise RuntimeError("Request failed with status code 400: bad runtime_env")

    with pytest.raises(RuntimeError, match="bad runtime_env"):
        _submit_when_ready(Broken(), {"entrypoint": "x"}, None)
