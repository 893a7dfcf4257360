"""The main job on a two-node Ray cluster on loopback (a head and a second raylet, one CPU each):
the data stage, then two training workers placed STRICT_SPREAD, so one on each node, talking gloo."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cerbero_ray.config import REPO_DIR
from conftest import add_worker_node, start_head, stop_node

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~2 minutes: `python -m pytest -m slow`


@pytest.fixture
def two_nodes():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_AUTH_TOKEN", None)
    node = start_head(env, num_cpus=1)
    add_worker_node(node, num_cpus=1)
    probe = "import ray; ray.init(address='{}'); print(sum(n['Alive'] for n in ray.nodes()))".format(node["gcs"])
    deadline = time.monotonic() + 120
    while subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip() != "2":
        assert time.monotonic() < deadline, "the second raylet did not join"
        time.sleep(2)
    yield node
    stop_node(node)


def test_trains_across_two_nodes(two_nodes, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_DIR, "jobs", "recipe.py"),
            f"cluster.address={two_nodes['gcs']}",
            f"paths.output_dir={tmp_path}",
            "train.placement_strategy=STRICT_SPREAD",
            "train.max_steps=6",
            "train.epochs=1",
            "train.checkpoint_every=3",
            "train.eval_every=3",
            "stages=[data,train]",
        ],
        env=two_nodes["env"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.load(open(tmp_path / "train" / "tiny-cpu" / "summary.json"))
    assert summary["steps"] == 6 and summary["eval_losses"][-1] < summary["eval_losses"][0]
    # both ranks wrote their part of the checkpoint, from their own node
    marks = os.listdir(tmp_path / "train" / "tiny-cpu" / "checkpoint_step_0000006" / "complete")
    assert sorted(marks) == ["rank_0", "rank_1"]


def _alive(gcs: str, env: dict) -> int:
    probe = f"import ray; ray.init(address='{gcs}'); print(sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip()
    return int(out) if out.isdigit() else 0


@pytest.fixture
def no_shared_disk(tmp_path_factory, bucket):
    """A head and a worker node, each with its own temporary and cache folders; outputs only in the
    bucket. Yields (head, the worker's environment, a function that kills the worker node's Ray
    processes and starts a fresh one)."""
    base = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    base.pop("RAY_AUTH_TOKEN", None)

    def own(name):
        d = tmp_path_factory.mktemp(name)
        return {**base, "TMPDIR": str(d), "CERBERO_CACHE": str(d / "cache")}

    node = start_head(own("head"), num_cpus=1)
    worker_env = own("worker")
    state = {"proc": add_worker_node(node, 1, worker_env)}

    def wait_for(n):
        deadline = time.monotonic() + 120
        while _alive(node["gcs"], base) != n:
            assert time.monotonic() < deadline, f"not {n} nodes"
            time.sleep(2)

    def replace_worker():
        os.killpg(state["proc"].pid, signal.SIGKILL)  # the node dies: its raylet and every worker on it
        state["proc"].wait(30)
        wait_for(1)
        state["proc"] = add_worker_node(node, 1, own("worker2"))
        wait_for(2)

    wait_for(2)
    yield node, base, replace_worker
    stop_node(node)


def _until(predicate, timeout=600):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(1)


def _weights(uri: str) -> dict:
    from safetensors.numpy import load

    from cerbero_ray import storage

    fs, p = storage.resolve(f"{uri}/model.safetensors")
    with fs.open_input_stream(p, compression=None) as f:
        return load(f.read())


def test_a_node_lost_mid_training_and_mid_labeling_loses_nothing(no_shared_disk, bucket):
    """Outputs only in the bucket. The worker node is killed after the first complete checkpoint:
    training goes on from it (on a fresh node) and ends with the weights of an uninterrupted run.
    Killed mid-labeling: the rerun ends with every row exactly once."""
    import numpy as np
    import pyarrow.parquet as pq

    from cerbero_ray import storage
    from cerbero_ray.train.checkpoint import complete_checkpoints

    node, env, replace_worker = no_shared_disk
    common = [
        f"cluster.address={node['gcs']}",
        f"paths.output_dir={bucket}/run",
        "train.placement_strategy=STRICT_SPREAD",
        "train.max_steps=12",
        "train.epochs=1",
        "train.checkpoint_every=3",
        "train.eval_every=100",
        "train.max_failures=3",
    ]

    def recipe(*extra, wait=True):
        cmd = [sys.executable, os.path.join(REPO_DIR, "jobs", "recipe.py"), *common, *extra]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if wait:
            out, _ = p.communicate(timeout=900)
            assert p.returncode == 0, out[-3000:]
        return p

    recipe("stages=[data,train]", "train.name=straight")  # the uninterrupted run
    run = recipe("stages=[train]", "train.name=killed", wait=False)
    _until(lambda: complete_checkpoints(f"{bucket}/run/train/killed", 2))
    replace_worker()
    out, _ = run.communicate(timeout=900)
    assert run.returncode == 0, out[-3000:]
    assert "resumed from step" in out, out[-3000:]
    a, b = _weights(f"{bucket}/run/train/straight/hf"), _weights(f"{bucket}/run/train/killed/hf")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # labeling: killed mid-run, then the same command
    lab = ["stages=[label]", "train.name=straight", "label.chunk_rows=4", "label.workers=2"]
    run = recipe(*lab, wait=False)
    _until(lambda: len(_parts(f"{bucket}/run/label/sentiment/parts")) >= 2)
    replace_worker()
    run.communicate(timeout=900)
    recipe(*lab)
    fs, p = storage.resolve(f"{bucket}/run/label/sentiment/parts")
    ids = pq.read_table(p, filesystem=fs, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 107


def _parts(uri: str) -> list:
    from cerbero_ray import storage

    fs, p = storage.resolve(uri)
    return [
        i for i in fs.get_file_info(storage.pafs.FileSelector(p, allow_not_found=True)) if i.path.endswith(".parquet")
    ]
