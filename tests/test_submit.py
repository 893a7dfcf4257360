"""The submit path against a real local head (`ray start --head` on loopback), with Ray's token
authentication on and off: our submit command and the plain `ray job submit` CLI. The head runs
under `--block` in its own process group; the test stops exactly that cluster and nothing else."""

import json
import os
import secrets
import subprocess
import sys

import pytest

from cerbero_ray.config import REPO_DIR
from cerbero_ray.submit import job_spec, submit
from conftest import start_head, stop_node

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["token", pytest.param("disabled", marks=pytest.mark.slow)])
def head(request):
    """One `ray start --head` per auth mode, shared by this module's tests (each submits its own jobs
    into its own output folder); the head without auth is the slow tier's."""
    env = {**os.environ, "RAY_AUTH_MODE": request.param}
    if request.param == "token":
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    else:
        env.pop("RAY_AUTH_TOKEN", None)
    node = start_head(env, num_cpus=2)
    yield node["dashboard"], env
    stop_node(node)


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
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cerbero_ray.submit",
            "--address",
            address,
            "--wait",
            "--timeout",
            "400",
            "data",
            f"paths.output_dir={out1}",
            "data.seq_len=2048",
        ],
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=500,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED" in r.stdout
    check_output(out1)


@pytest.mark.slow  # one more job (~15 s); our command above submits the same job by default
def test_the_plain_cli_submits_the_same_job(head, tmp_path):
    address, env = head
    # the plain CLI, as the README shows it
    out2 = tmp_path / "cli"
    r = subprocess.run(
        [
            "ray",
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            REPO_DIR,
            "--",
            "python",
            "jobs/data.py",
            f"paths.output_dir={out2}",
            "data.seq_len=2048",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert r.returncode == 0 and "succeeded" in r.stdout.lower(), r.stdout[-3000:] + r.stderr[-3000:]
    check_output(out2)


def test_submit_with_a_bucket_as_the_output(head, bucket):
    """A cluster with no disk shared with this machine: the output is a bucket. The head has the
    bucket's credentials of its own (here: its environment); nothing of ours is shipped."""
    address, env = head
    if env["RAY_AUTH_MODE"] != "token":
        pytest.skip("once is enough: with token auth, as a shared cluster runs")
    # through the CLI, in a process of its own: an in-process Ray client keeps the token of the first
    # cluster it met (the embedded one of earlier tests)
    r = subprocess.run(
        [sys.executable, "-m", "cerbero_ray.submit", "--address", address, "--wait", "--timeout", "400", "data"]
        + [f"paths.output_dir={bucket}/run", "data.seq_len=2048"],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    from cerbero_ray import storage

    m = storage.read_json(f"{bucket}/run/data/chat_sample/manifest.json")
    assert m["documents"] == 107 and all(storage.is_file(s["path"]) for s in m["shards"])
    assert all(s["path"].startswith(f"{bucket}/run/") for s in m["shards"])


def test_credentials_are_shipped_only_when_asked(monkeypatch):
    from conftest import S3_SECRET

    spec = job_spec("data", ["paths.output_dir=s3://b/run"])
    assert S3_SECRET not in json.dumps(spec) and "AWS_SECRET_ACCESS_KEY" not in spec["runtime_env"]["env_vars"]
    spec = job_spec("data", ["paths.output_dir=s3://b/run"], pass_env=["AWS_SECRET_ACCESS_KEY"])
    assert spec["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == S3_SECRET
    with pytest.raises(ValueError, match="--env NOT_THERE"):
        job_spec("data", [], pass_env=["NOT_THERE"])


def test_a_tracker_s_settings_go_with_the_job_and_its_key_only_when_asked(monkeypatch, tmp_path):
    """MLflow's URI from this environment is shipped (the job checks the config again there, and
    needs it); W&B's key is named in a note, shipped with --env only; nothing without a tracker."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-1234")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example")
    base = [f"paths.output_dir={tmp_path}"]
    plain = job_spec("train", base)
    shipped = set(plain["runtime_env"]["env_vars"])
    assert not {"MLFLOW_TRACKING_URI", "WANDB_BASE_URL"} & shipped and "notes" not in plain
    spec = job_spec("train", [*base, "train.tracker.kind=mlflow"])
    assert spec["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and "notes" not in spec
    spec = job_spec("recipe", [*base, "evaluate.tracker.kind=wandb"])
    assert spec["runtime_env"]["env_vars"]["WANDB_BASE_URL"] == "https://wandb.example"
    assert "secret-key-1234" not in json.dumps(spec) and "--env WANDB_API_KEY" in spec["notes"][0]
    spec = job_spec("train", [*base, "train.tracker.kind=wandb"], pass_env=["WANDB_API_KEY"])
    assert spec["runtime_env"]["env_vars"]["WANDB_API_KEY"] == "secret-key-1234" and "notes" not in spec


def test_bad_config_fails_before_submitting():
    with pytest.raises(Exception, match="seq_lenn"):
        job_spec("data", ["data.seq_lenn=1"])
    with pytest.raises(ValueError, match="unknown stage"):
        submit("http://127.0.0.1:1", "trian", [])


def test_spec_excludes_outputs_and_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = job_spec("data", ["paths.output_dir=rel/out", "data=mix_sample"])
    assert spec["runtime_env"]["env_vars"]["CERBERO_OUTPUT_DIR"] == str(tmp_path / "rel" / "out")
    assert "outputs/" in spec["runtime_env"]["excludes"] and spec["runtime_env"]["working_dir"] == REPO_DIR
    # the relative path reaches the job only as the absolute env var
    assert spec["entrypoint"] == "python jobs/data.py data=mix_sample"


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


@pytest.mark.slow  # two more jobs (~40 s); the data job goes through both ways above, by default
def test_label_and_generate_through_the_cli(head, tmp_path, tiny_hf):
    address, env = head
    if env["RAY_AUTH_MODE"] == "token":
        pytest.skip("auth is covered above; one mode is enough for these two jobs")
    for job, extra in (("label", ["label/task=irony"]), ("generate", ["generate.sampling.max_new_tokens=4"])):
        r = subprocess.run(
            [
                "ray",
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                REPO_DIR,
                "--",
                "python",
                f"jobs/{job}.py",
                f"paths.output_dir={tmp_path}",
                f"{job}.checkpoint={tiny_hf}",
                *extra,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=500,
        )
        assert r.returncode == 0 and "succeeded" in r.stdout.lower(), r.stdout[-3000:] + r.stderr[-3000:]
    assert len(os.listdir(tmp_path / "label" / "irony" / "parts")) == 1
    assert json.load(open(tmp_path / "generate" / "prompts" / "summary.json"))["counts"]
