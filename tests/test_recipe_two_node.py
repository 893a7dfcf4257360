"""The main job on a two-node Ray cluster on loopback (a head and a second raylet, one CPU each):
the data stage, then two training workers placed STRICT_SPREAD, so one on each node, talking gloo."""

import json
import os
import subprocess
import sys
import time

import pytest

from cerbero_ray.config import REPO_DIR
from conftest import add_worker_node, start_head, stop_node

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~2 minutes: `python -m pytest -m slow`


@pytest.fixture
def two_nodes(tmp_path_factory):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_AUTH_TOKEN", None)
    node = start_head(env, tmp_path_factory.mktemp("ray"), num_cpus=1)
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
