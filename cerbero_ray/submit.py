"""Submit a stage to a running Ray cluster: compose and check the config here, run it there.

    cerbero-submit --address http://127.0.0.1:8265 data data=mix_sample --wait
    python -m cerbero_ray.submit --address http://head:8265 recipe paths.output_dir=s3://bucket/run1

The config is composed and checked locally first (the stage's ``check_<stage>``), so a misspelled
key or a bad value fails before anything is sent. The job
runs ``python jobs/<stage>.py <overrides>`` with this checkout as its ``working_dir`` (data and
outputs excluded), attached to the cluster. Local output and data folders are made absolute, since
the job's working directory is a copy; use object-store URIs for clusters that do not share this
machine's disk. Token authentication: set ``RAY_AUTH_MODE=token`` and the token as for ``ray`` CLI.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from omegaconf import OmegaConf

from cerbero_ray import storage
from cerbero_ray.config import REPO_DIR, compose
from cerbero_ray.config.stages import STAGES

EXCLUDES = [
    "outputs/",
    "multirun/",
    ".git/",
    "**/__pycache__/",
    "*.parquet",
    ".bench/",
    ".whl/",
    "*.egg-info/",
    "bench/results/",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# an experiment tracker's settings in the environment (train.tracker, evaluate.tracker): shipped with
# the job, which reads them as this machine would (MLflow's URI among them: without it the job's own
# config check would fail there); its credentials only with --env, as any other
TRACKER_SETTINGS = {
    "mlflow": ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"),
    "wandb": ("WANDB_MODE", "WANDB_BASE_URL", "WANDB_ENTITY"),
}
TRACKER_SECRETS = {
    "mlflow": ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
    "wandb": ("WANDB_API_KEY",),
}


def job_spec(stage: str, overrides: list[str], pass_env: list[str] = ()) -> dict:
    """Entrypoint and runtime_env for ``stage``; composes and checks the config to fail early.
    Credentials are not shipped unless named in ``pass_env`` (then in the runtime env's variables,
    never in the working dir); a cluster should rather have its own (an instance role)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(STAGES)}")
    cfg = compose(stage, overrides, checked=True)
    env = {}
    for key, var in (("output_dir", "CERBERO_OUTPUT_DIR"), ("data_dir", "CERBERO_DATA_DIR")):
        value = str(cfg.paths[key])
        env[var] = value if storage.is_uri(value) else os.path.abspath(value)
    kinds = {
        str(OmegaConf.select(cfg, f"{stage_}.tracker.kind", default="none")) for stage_ in ("train", "evaluate")
    } - {"none"}
    for kind in sorted(kinds):
        env.update({v: os.environ[v] for v in TRACKER_SETTINGS[kind] if v in os.environ})
    for var in pass_env:
        if var not in os.environ:
            raise ValueError(f"--env {var}: not set in this environment")
        env[var] = os.environ[var]
    # the job's cwd is a copy of the checkout: paths it gets must not be relative to it
    overrides = [o for o in overrides if not o.startswith(("paths.output_dir=", "paths.data_dir="))]
    entrypoint = " ".join(["python", f"jobs/{stage}.py", *(shlex.quote(o) for o in overrides)])
    unsent = [v for k in sorted(kinds) for v in TRACKER_SECRETS[k] if v in os.environ and v not in pass_env]
    spec = {"entrypoint": entrypoint, "runtime_env": {"working_dir": REPO_DIR, "excludes": EXCLUDES, "env_vars": env}}
    if unsent:  # said, not sent: the cluster may have its own
        spec["notes"] = [
            f"{', '.join(unsent)} set here but not shipped: add {' '.join('--env ' + v for v in unsent)} "
            "unless the cluster's nodes have their own"
        ]
    return spec


def submit(
    address: str,
    stage: str,
    overrides: list[str],
    wait: bool = False,
    timeout_s: float = 3600,
    submission_id: str | None = None,
    pass_env: list[str] = (),
) -> tuple[str, str | None]:
    """Submit; returns (submission id, final status or None when not waiting)."""
    from ray.job_submission import JobSubmissionClient

    spec = job_spec(stage, overrides, pass_env)
    for note in spec.pop("notes", []):
        print(f"note: {note}", file=sys.stderr, flush=True)
    client = JobSubmissionClient(address)
    job_id = _submit_when_ready(client, spec, submission_id)
    print(f"submitted {job_id}: {spec['entrypoint']}", flush=True)
    if not wait:
        return job_id, None
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s} s")
        time.sleep(1)
    print(client.get_job_logs(job_id)[-4000:], flush=True)
    print(f"job {job_id}: {status}", flush=True)
    return job_id, status


def _submit_when_ready(client, spec: dict, submission_id: str | None, wait_s: float = 120) -> str:
    """Submit, retrying while a just-started head has no job agent yet (Ray answers 500 then)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(submission_id=submission_id, **spec)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def parser() -> argparse.ArgumentParser:
    """The CLI's arguments; its stages are the stage table's."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS", os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265")),
        help="the cluster's job server (dashboard) address",
    )
    p.add_argument("--wait", action="store_true", help="wait for the job and print its logs")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--submission-id", default=None)
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass this variable of your environment to the job (e.g. AWS_ACCESS_KEY_ID for a bucket); "
        "repeatable. Nothing else of your environment is shipped",
    )
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for jobs/<stage>.py")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    _, status = submit(a.address, a.stage, a.overrides, a.wait, a.timeout, a.submission_id, a.env)
    return 0 if status in (None, "SUCCEEDED") else 1


if __name__ == "__main__":
    sys.exit(main())
