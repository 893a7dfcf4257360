"""Experiment tracking beside TensorBoard: each step's metrics and the run's config in MLflow or
Weights & Biases (``train.tracker``).

The driver opens the tracker's run before any worker starts (:func:`open_run`): MLflow's experiment
and run are created there, so a wrong URI or refused credentials is one line before Ray Train
builds a model; W&B's run id is chosen there. Both are kept in the run folder's ``tracker.json``,
so a rerun, or a worker group Ray Train restarts, logs into the same tracker run. Rank 0 logs
(:class:`Tracker`), each step once: a step the tracker already holds (logged before a crash, with
the same values, since a resume is exact) is not sent again. A tracker that fails mid-run warns
once and the training goes on without it.

Credentials stay in the environment (``MLFLOW_TRACKING_TOKEN`` and the like, ``WANDB_API_KEY``):
the embedded cluster's workers inherit the job's; on a cluster of your own, pass them in the job's
runtime env (``cerbero-submit --env WANDB_API_KEY``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid

from cerbero_ray import storage

log = logging.getLogger(__name__)
RECORD = "tracker.json"


def tracking_uri(tc) -> str | None:
    """MLflow's tracking URI: ``train.tracker.uri``, else ``$MLFLOW_TRACKING_URI``
    (:func:`~cerbero_ray.config.train.check_tracker` made sure there is one)."""
    return tc.uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def flat_config(config) -> dict:
    """The resolved config as ``{"train.lr": 2e-05, …}``: the tracker run's parameters."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    out: dict = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    walk("", tree)
    return out


def open_run(config, run_dir: str) -> dict | None:
    """The driver, before any worker starts: the tracker run this training run logs into (the one
    ``<run_dir>/tracker.json`` names, when it is of the same tracker and still there; else a new
    one, recorded there); None without a tracker. ``ValueError`` (one line) when the tracker
    cannot be reached or refuses."""
    tc = config.train.tracker
    if tc.kind == "none":
        return None
    path = storage.join(run_dir, RECORD)
    fs, p = storage.resolve(path)
    old = storage.read_json(path) if fs.get_file_info(p).is_file else None
    rec = {"kind": tc.kind, "project": tc.project, "name": config.train.name, "uri": None, "run_id": None}
    if tc.kind == "mlflow":
        rec["uri"] = tracking_uri(tc)
        try:
            rec["run_id"] = _mlflow_run(config, rec, old, run_dir)
        except Exception as e:  # the client's own errors: a URI it cannot reach, a token refused
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"train.tracker: MLflow at {rec['uri']}: {first[:300]}") from None
    else:
        rec["uri"] = tc.uri
        same = old and old.get("kind") == "wandb" and old.get("project") == tc.project
        rec["run_id"] = old["run_id"] if same else uuid.uuid4().hex[:12]
    if rec != old:
        storage.write_json(path, rec)
    where = f" at {rec['uri']}" if rec["uri"] else ""
    again = " (the run's own, resumed)" if old and old.get("run_id") == rec["run_id"] else ""
    log.info(f"[train] logging into {tc.kind}{where}: {tc.project}, run {rec['run_id']}{again}")
    return rec


def _mlflow_run(config, rec: dict, old: dict | None, run_dir: str) -> str:
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=rec["uri"])
    if old and old.get("kind") == "mlflow" and (old.get("uri"), old.get("project")) == (rec["uri"], rec["project"]):
        try:
            run = client.get_run(old["run_id"])
            if run.info.lifecycle_stage != "deleted":
                return old["run_id"]
        except MlflowException:  # deleted from the server since: a new run
            pass
    exp = client.get_experiment_by_name(rec["project"])
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(rec["project"])
    run = client.create_run(exp_id, run_name=rec["name"], tags={"cerbero.run_dir": run_dir})
    params = [Param(k, str(v)[:6000]) for k, v in flat_config(config).items()]
    for s in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
        client.log_batch(run.info.run_id, params=params[s : s + 100])
    return run.info.run_id


class Tracker:
    """Rank 0's side: :meth:`log` each step's scalars (TensorBoard's names), :meth:`finish` at
    the end. A failure warns once and turns the tracker off; the training goes on."""

    def __init__(self, rec: dict, config, run_dir: str):
        self.rec, self.kind, self.client, self.run = rec, rec["kind"], None, None
        self.run_dir, self.staged = run_dir, None  # W&B's folder, for a run folder in a bucket
        self.held: dict[str, int] = {}  # MLflow: key -> the last step the run already has
        self.wandb_from = 0  # W&B: the first step the run does not have yet
        self.sent: list = []  # MLflow: the batches its client is still sending (RunOperations)
        try:
            if self.kind == "mlflow":
                from mlflow.tracking import MlflowClient

                self.client = MlflowClient(tracking_uri=rec["uri"])
            else:
                self._start_wandb(config)
        except Exception as e:
            raise ValueError(f"train.tracker: {self.kind} could not start: {str(e).strip()[:300]}") from None

    def _start_wandb(self, config) -> None:
        """W&B's own folder (its offline run, its logs): ``$WANDB_DIR``, else ``<run>/wandb/``; a run
        folder in a bucket gets it copied there at the end."""
        import wandb

        folder = os.environ.get("WANDB_DIR")
        if not folder and storage.is_uri(self.run_dir):
            folder = self.staged = tempfile.mkdtemp(prefix="cerbero-wandb-")
        elif not folder:
            folder = storage.resolve(self.run_dir)[1]
            os.makedirs(folder, exist_ok=True)
        kw = {"settings": wandb.Settings(base_url=self.rec["uri"])} if self.rec.get("uri") else {}
        self.run = wandb.init(
            project=self.rec["project"],
            name=self.rec["name"],
            id=self.rec["run_id"],
            resume="allow",
            config=flat_config(config),
            dir=folder,
            **kw,
        )
        self.wandb_from = int(self.run.step)  # resumed: what an earlier attempt logged stays

    def _new(self, step: int, key: str) -> bool:
        """Whether the tracker run lacks ``key`` at ``step``. MLflow: asked once per key (a
        resumed run's history), then kept; W&B: its steps run in order, every key at once (a step
        logged again merges into it)."""
        if self.kind == "wandb":
            return step >= self.wandb_from
        if key not in self.held:
            history = self.client.get_metric_history(self.rec["run_id"], key)
            self.held[key] = max((m.step for m in history), default=-1)
        return step > self.held[key]

    def log(self, step: int, values: dict) -> None:
        if self.kind is None:
            return
        try:
            new = {k: float(v) for k, v in values.items() if self._new(step, k)}
            if not new:
                return
            if self.kind == "mlflow":
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                metrics = [Metric(k, v, now, step) for k, v in new.items()]
                self.sent.append(self.client.log_batch(self.rec["run_id"], metrics=metrics, synchronous=False))
            else:
                self.run.log(new, step=step)
            self.held.update(dict.fromkeys(new, step))
        except Exception as e:
            self._off(e)

    def flush(self) -> None:
        """Wait until the tracker has every step logged so far (at a checkpoint, at the end)."""
        if self.kind != "mlflow":
            return
        try:
            while self.sent:
                self.sent.pop(0).wait()
        except Exception as e:
            self._off(e)

    def finish(self) -> None:
        self.flush()
        if self.kind is None:
            return
        try:
            if self.kind == "mlflow":
                self.client.set_terminated(self.rec["run_id"], "FINISHED")
            else:
                self.run.finish(exit_code=0)
                if self.staged:
                    where = storage.join(self.run_dir, "wandb")
                    storage.upload_folder(os.path.join(self.staged, "wandb"), where, markers=False)
        except Exception as e:
            self._off(e)
        self.kind = None

    def _off(self, e: Exception) -> None:
        log.warning(f"[train] {self.kind} tracking stopped, the training goes on: {str(e).strip()[:300]}")
        self.kind = None
