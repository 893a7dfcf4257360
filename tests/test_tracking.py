"""``train.tracker`` and ``evaluate.tracker``: MLflow and W&B runs opened by the driver, logged by
one process, each step once across a resume; a tracker that refuses is one line before any worker,
one that fails mid-run is a warning. A training run through Ray Train into both trackers:
tests/test_train.py (``test_killed_worker_resumes_exactly``); an evaluation into the training run
that made its checkpoint: tests/test_evaluate_pipeline.py."""

import json
import logging
import os
import socket

import pytest
from omegaconf import OmegaConf

from cerbero_ray.config import check, compose
from cerbero_ray.config.train import TrainStageConfig
from cerbero_ray.tracking import FAILURE, RECORD, Tracker, end_run, flat_config, open_run
from conftest import wandb_history, wandb_summary


def config(tmp_path, *over) -> TrainStageConfig:
    base = [f"paths.output_dir={tmp_path}", f"train.data_dir={tmp_path}", "train.name=run1"]
    return OmegaConf.to_object(compose("train", [*base, *over]))


def opened(c: TrainStageConfig, folder: str) -> dict | None:
    """The training run's tracker run, as the driver opens it."""
    return open_run(c.train.tracker, "train.tracker", c.train.name, folder, flat_config(c))


def tracker(rec: dict, c: TrainStageConfig, folder: str) -> Tracker:
    """Rank 0's side of it."""
    return Tracker(rec, flat_config(c), folder, "train.tracker")


def mlflow_config(tmp_path, *over):
    return config(tmp_path, "train.tracker.kind=mlflow", f"train.tracker.uri=file:{tmp_path}/mlruns", *over)


@pytest.mark.parametrize(
    "over, says",
    [
        (["train.tracker.kind=tensorboard"], r"train.tracker.kind.*'tensorboard'"),
        (["train.tracker.kind=mlflow"], r"train.tracker.uri: MLflow needs a tracking URI"),
        (["train.tracker.kind=wandb", "train.tracker.project= "], r"train.tracker.project: empty"),
    ],
)
def test_a_bad_tracker_is_named_before_ray_starts(tmp_path, monkeypatch, over, says):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match=says):
        check("train", compose("train", [f"paths.output_dir={tmp_path}", *over]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path}/mlruns")  # the URI from the environment
    check("train", compose("train", [f"paths.output_dir={tmp_path}", "train.tracker.kind=mlflow"]))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"train.tracker.kind=wandb needs wandb: pip install '.\[tracking\]'"):
        check("train", compose("train", [f"paths.output_dir={tmp_path}", "train.tracker.kind=wandb"]))


def test_mlflow_run_opened_once_resumed_and_each_step_logged_once(tmp_path):
    from mlflow.tracking import MlflowClient

    extra = "+deepspeed.extra={" + ",".join(f"k{i}: {i}" for i in range(40)) + "}"  # > 100 parameters in all
    c = mlflow_config(tmp_path, "train.tracker.project=exp1", "train.lr=0.001", extra)
    run_dir = str(tmp_path / "train" / "run1")
    rec = opened(c, run_dir)
    assert json.load(open(os.path.join(run_dir, RECORD))) == rec and rec["kind"] == "mlflow"
    client = MlflowClient(tracking_uri=rec["uri"])
    run = client.get_run(rec["run_id"])
    assert run.data.params["train.lr"] == "0.001" and run.data.params["deepspeed.extra.k39"] == "39"
    assert len(run.data.params) == len(flat_config(c)) > 100  # in batches of 100
    assert run.info.run_name == "run1" and run.data.tags["cerbero.folder"] == run_dir
    named = open_run(c.train.tracker, "evaluate.tracker", "m", str(tmp_path / "m"), {"checkpoints.my model (v2)": 1})
    assert client.get_run(named["run_id"]).data.params == {"checkpoints.my model _v2_": "1"}  # a name MLflow takes

    first = tracker(rec, c, run_dir)  # an attempt that dies after step 3: never finished
    for step in range(4):
        first.log(step, {"train/loss": 1.0 / (step + 1), **({"eval/loss": 2.0} if step == 0 else {})})
    first.flush()  # (at each checkpoint)
    assert client.get_run(rec["run_id"]).info.status == "RUNNING"
    end_run(rec, ValueError("a node was lost\nmore"), "train.tracker")  # the driver, once the attempt died
    run = client.get_run(rec["run_id"])
    assert (run.info.status, run.data.tags[FAILURE]) == ("FAILED", "ValueError: a node was lost")
    assert opened(c, run_dir) == rec  # the rerun (or a restarted worker group): the same run
    again = tracker(rec, c, run_dir)  # resumes from the step-2 checkpoint: steps 3.. once more
    for step in range(3, 6):
        again.log(step, {"train/loss": 1.0 / (step + 1)})
    again.log(5, {"eval/loss": 1.5})  # the final held-out loss, at the last step
    again.summary(5, {"summary/final_loss": 0.25}, once=True)  # the run's summary, at the end
    again.finish()
    rerun = tracker(rec, c, run_dir)  # an attempt that died after the summary went, before summary.json
    rerun.summary(5, {"summary/final_loss": 0.25, "summary/train_s": 9.0}, once=True)
    rerun.finish()
    assert [(m.step, m.value) for m in client.get_metric_history(rec["run_id"], "summary/final_loss")] == [(5, 0.25)]
    assert [(m.step, m.value) for m in client.get_metric_history(rec["run_id"], "summary/train_s")] == [(5, 9.0)]
    loss = sorted((m.step, m.value) for m in client.get_metric_history(rec["run_id"], "train/loss"))
    assert loss == [(s, 1.0 / (s + 1)) for s in range(6)]  # each step once
    assert sorted((m.step, m.value) for m in client.get_metric_history(rec["run_id"], "eval/loss")) == [
        (0, 2.0),
        (5, 1.5),
    ]
    run = client.get_run(rec["run_id"])
    assert run.info.status == "FINISHED" and FAILURE not in run.data.tags  # the resume took the failure away

    client.delete_run(rec["run_id"])  # deleted on the server: a rerun opens a new one
    new = opened(c, run_dir)
    assert new["run_id"] != rec["run_id"] and json.load(open(os.path.join(run_dir, RECORD)))["run_id"] == new["run_id"]
    other = mlflow_config(tmp_path, "train.tracker.project=exp2")  # another experiment: another run
    assert opened(other, run_dir)["run_id"] not in (rec["run_id"], new["run_id"])


def test_an_mlflow_server_that_cannot_be_reached_is_one_line_and_a_failure_mid_run_a_warning(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with socket.socket() as s:  # a port with nothing behind it
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    c = config(tmp_path, "train.tracker.kind=mlflow", f"train.tracker.uri=http://127.0.0.1:{closed}")
    with pytest.raises(ValueError, match=rf"^train.tracker: MLflow at http://127.0.0.1:{closed}: ") as e:
        opened(c, str(tmp_path / "run"))
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "run" / RECORD)
    # a run the driver opened, whose server goes away during the training: a warning, no error
    rec = {"kind": "mlflow", "uri": f"http://127.0.0.1:{closed}", "run_id": "0" * 32, "project": "p", "name": "n"}
    gone = tracker(rec, c, str(tmp_path / "run"))
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            gone.log(step, {"train/loss": 1.0})
        gone.finish()
        end_run(rec, KeyboardInterrupt("SIGTERM"), "train.tracker")  # the driver, stopped: a warning
    said = [r.message for r in caplog.records if "tracking stopped" in r.message]
    assert len(said) == 1 and said[0].startswith("train.tracker: mlflow tracking stopped, the job goes on")
    said = [r.message for r in caplog.records if "not marked" in r.message]
    assert len(said) == 1 and said[0].startswith(f"train.tracker: MLflow run {'0' * 32} not marked KILLED: ")


def test_a_wandb_run_keeps_its_id_across_a_rerun_and_logs_offline(tmp_path):
    c = config(tmp_path, "train.tracker.kind=wandb", "train.tracker.project=p1")
    run_dir = tmp_path / "train" / "run1"
    rec = opened(c, str(run_dir))
    assert rec["kind"] == "wandb" and opened(c, str(run_dir)) == rec  # the id kept for the rerun
    t = tracker(rec, c, str(run_dir))
    for step in range(3):
        t.log(step, {"train/loss": 1.0 / (step + 1)})
    t.log(2, {"eval/loss": 0.5})  # the same step again: merged into it
    t.finish()
    run_id, rows = wandb_history(run_dir)
    assert run_id == rec["run_id"]
    assert [(r["_step"], r["train/loss"]) for r in rows] == [(s, 1.0 / (s + 1)) for s in range(3)]
    assert rows[-1]["eval/loss"] == 0.5
    assert (
        opened(config(tmp_path, "train.tracker.kind=wandb", "train.tracker.project=p2"), str(run_dir))["run_id"]
        != rec["run_id"]
    )  # another project: another run


def test_trackers_of_a_run_folder_in_a_bucket(tmp_path, bucket):
    """tracker.json in the bucket (a rerun on another machine finds the run); W&B's offline run
    copied into ``<run>/wandb/`` there at the end."""
    import boto3

    run_dir = f"{bucket}/train/run1"
    c = mlflow_config(tmp_path)
    rec = opened(c, run_dir)
    stored = boto3.client("s3").get_object(Bucket=bucket[5:], Key="train/run1/tracker.json")["Body"].read()
    assert json.loads(stored) == rec
    assert opened(c, run_dir) == rec
    w = config(tmp_path, "train.tracker.kind=wandb")
    rec = opened(w, run_dir)  # another tracker: its own run, recorded instead
    assert opened(w, run_dir) == rec and rec["kind"] == "wandb"
    t = tracker(rec, w, run_dir)
    for step in range(3):
        t.log(step, {"train/loss": float(step)})
    t.finish()
    from cerbero_ray import storage

    run_id, rows = wandb_history(storage.local_copy(run_dir))  # the run folder, downloaded
    assert run_id == rec["run_id"] and [r["train/loss"] for r in rows] == [0.0, 1.0, 2.0]


def test_an_evaluation_s_figures_go_into_the_w_b_run_summary(tmp_path):
    """W&B's steps belong to the training: an evaluation's figures go into the run's summary (its
    runs table), under names every tracker takes."""
    from cerbero_ray.config.common import TrackerConfig

    tc, params = TrackerConfig(kind="wandb", project="p"), {"checkpoint": "/ckpt/hf"}
    rec = open_run(tc, "evaluate.tracker", "model", str(tmp_path), params)
    t = Tracker(rec, params, str(tmp_path), "evaluate.tracker")
    t.summary(0, {"eval/squad_it/generate/f1": 12.5, "eval/ami2020/score#1/f1": 3.0})
    t.finish()
    got = wandb_summary(tmp_path)
    assert got["eval/squad_it/generate/f1"] == 12.5 and got["eval/ami2020/score_1/f1"] == 3.0


def test_a_record_that_does_not_read_is_replaced_and_an_evaluation_tracker_refusing_stops_it_first(
    tmp_path, monkeypatch
):
    """A tracker.json cut short (a crash while it was written): a new run, recorded in its place.
    An evaluation whose tracker cannot be reached says so in one line before any model runs."""
    c = mlflow_config(tmp_path)
    run_dir = tmp_path / "train" / "run1"
    os.makedirs(run_dir)
    (run_dir / RECORD).write_text('{"kind": "mlfl')
    rec = opened(c, str(run_dir))
    assert rec["kind"] == "mlflow" and json.load(open(run_dir / RECORD)) == rec

    from cerbero_ray.evaluate import run_evaluate
    from conftest import SAMPLES

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    over = [
        f"paths.output_dir={tmp_path}",
        "~evaluate.checkpoints.tiny-cpu",
        f"+evaluate.checkpoints.api=http://127.0.0.1:{closed}/v1",  # never asked: the tracker first
        f"evaluate.tasks.squad_it.path={SAMPLES}/squad_it_sample.json",
        "evaluate.only=[squad_it]",
        "evaluate.tracker.kind=mlflow",
        f"evaluate.tracker.uri=http://127.0.0.1:{closed}",
    ]
    with pytest.raises(ValueError, match=rf"^evaluate.tracker: MLflow at http://127.0.0.1:{closed}: [^\n]*$"):
        run_evaluate(compose("evaluate", over))
    assert not os.path.exists(tmp_path / "evaluate" / "runs" / "api" / "squad_it")
