"""Experiment tracking: a training run's per-step metrics and an evaluation's figures in MLflow or
Weights & Biases (``train.tracker``, ``evaluate.tracker``), beside TensorBoard and results.json.

A tracker run is opened once (:func:`open_run`, on the driver, before any worker starts: MLflow's
experiment and run are created there, so a wrong URI or refused credentials is one line before a
model is built; W&B's run id is chosen there) and recorded in ``tracker.json`` beside what it
tracks, so a rerun, or a worker group Ray Train restarts, logs into the same run. One process logs
(:class:`Tracker`; training: rank 0), each step once: a step the run already holds (logged before a
crash, with the same values, since a resume is exact) is not sent again. A tracker that fails
mid-run warns once and the job goes on without it. An evaluated checkpoint that a tracked training
run wrote (``<run>/hf``, ``<run>/adapter``, ``<run>/checkpoint_step_N/hf``) gets its figures in that
run (:func:`training_run_of`).

A run's status says how it ended: MLflow's RUNNING while a training runs (again on a resume),
FINISHED at its end, FAILED or KILLED (a signal, Ctrl-C) with the first line of the reason as the tag
``cerbero.failure``: rank 0 marks the failures it sees, the driver those it alone sees (another
rank's, a node lost, a signal to the job: :func:`end_run`). W&B's run finishes with exit code 1 on a
failure rank 0 sees; one whose process died unfinished, W&B marks crashed itself.

Credentials stay in the environment (``MLFLOW_TRACKING_TOKEN`` and the like, ``WANDB_API_KEY``):
the embedded cluster's workers inherit the job's; on a cluster of your own, pass them in the job's
runtime env (``cerbero-submit --env WANDB_API_KEY``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid

from cerbero_ray import storage

log = logging.getLogger(__name__)
RECORD = "tracker.json"
TRACKERS = ("none", "mlflow", "wandb")
FAILURE = "cerbero.failure"  # an MLflow run's tag: what ended its last attempt
PACKAGES = {"mlflow": "mlflow-skinny (or mlflow)", "wandb": "wandb"}


def tracking_uri(tc) -> str | None:
    """MLflow's tracking URI: ``<stage>.tracker.uri``, else ``$MLFLOW_TRACKING_URI``."""
    return tc.uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def check_tracker(tc, key: str) -> None:
    """Before Ray starts: ``ValueError`` naming ``key`` (``train.tracker``) for an unknown tracker,
    its package missing, an empty project, or MLflow without a tracking URI (its default, a database
    file in the working folder, would be a Ray worker's scratch folder)."""
    if tc.kind not in TRACKERS:
        raise ValueError(f"{key}.kind must be one of {', '.join(TRACKERS)}, got {tc.kind!r}")
    if tc.kind == "none":
        return
    if importlib.util.find_spec(tc.kind) is None:
        raise ValueError(f"{key}.kind={tc.kind} needs {PACKAGES[tc.kind]}: pip install '.[tracking]'")
    if not str(tc.project or "").strip():
        raise ValueError(f"{key}.project: empty; name the MLflow experiment or W&B project to log into")
    if tc.kind == "mlflow" and not tracking_uri(tc):
        raise ValueError(
            f"{key}.uri: MLflow needs a tracking URI (http://host:5000, databricks, "
            "sqlite:////abs/path/mlflow.db) here or in $MLFLOW_TRACKING_URI"
        )


def flat_config(config) -> dict:
    """A resolved config (a dataclass) as ``{"train.lr": 2e-05, …}``: a tracker run's parameters."""
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


def read_record(folder: str) -> dict | None:
    """The tracker run recorded in ``folder`` (local or URI), or None (also for a record that does
    not read as one: a new run is opened and recorded in its place)."""
    path = storage.join(folder, RECORD)
    if not storage.is_file(path):
        return None
    try:
        rec = storage.read_json(path)
    except ValueError:
        return None
    ok = isinstance(rec, dict) and rec.get("kind") in TRACKERS and isinstance(rec.get("run_id"), str)
    return rec if ok else None


def open_run(tc, key: str, name: str, folder: str, params: dict, tags: dict | None = None) -> dict | None:
    """The tracker run (``tc``: a ``TrackerConfig``) that what ``folder`` holds logs into: the one
    ``<folder>/tracker.json`` names, when it is of the same tracker and project and still there;
    else a new one named ``name``, with ``params`` (and ``tags``), recorded there. None without a
    tracker. ``ValueError`` (one line, naming the config ``key``: ``train.tracker``) when the
    tracker cannot be reached or refuses."""
    if tc.kind == "none":
        return None
    old = read_record(folder)
    rec = {"kind": tc.kind, "project": tc.project, "name": name, "uri": None, "run_id": None}
    if tc.kind == "mlflow":
        rec["uri"] = tracking_uri(tc)
        try:
            rec["run_id"] = _mlflow_run(rec, old, params, {"cerbero.folder": folder, **(tags or {})})
        except Exception as e:  # the client's own errors: a URI it cannot reach, a token refused
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{key}: MLflow at {rec['uri']}: {first[:300]}") from None
    else:
        rec["uri"] = tc.uri
        same = old and old.get("kind") == "wandb" and old.get("project") == tc.project
        rec["run_id"] = old["run_id"] if same else uuid.uuid4().hex[:12]
    if rec != old:
        storage.write_json(storage.join(folder, RECORD), rec)
    where = f" at {rec['uri']}" if rec["uri"] else ""
    again = " (resumed)" if old and old.get("run_id") == rec["run_id"] else ""
    log.info(f"[{key.split('.')[0]}] logging into {tc.kind}{where}: {tc.project}, run {rec['run_id']}{again}")
    return rec


def ended_by(e: BaseException) -> str:
    """MLflow's status for a run that ``e`` ended: KILLED (a signal, Ctrl-C), else FAILED."""
    return "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"


def _reason(e: BaseException) -> str:
    """What ended a run, in one line: the error's type and first line; a stop, its signal."""
    if isinstance(e, KeyboardInterrupt):  # runtime.interrupt_on_sigterm's carries the signal's name
        return f"stopped by {str(e) or 'SIGINT (Ctrl-C)'}"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:500] if first else type(e).__name__


def _mark(client, run_id: str, e: BaseException) -> None:
    client.set_tag(run_id, FAILURE, _reason(e))
    client.set_terminated(run_id, ended_by(e))


def end_run(rec: dict | None, e: BaseException, key: str) -> None:
    """The driver's side of a run that ``e`` ended unfinished: its MLflow run, while still RUNNING
    (rank 0 has marked a failure it saw), becomes FAILED or KILLED (:func:`ended_by`), the reason in
    its tag ``cerbero.failure``. A tracker that cannot be reached then: a warning."""
    if not rec or rec.get("kind") != "mlflow":
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=rec["uri"])
        if client.get_run(rec["run_id"]).info.status == "RUNNING":
            _mark(client, rec["run_id"], e)
    except Exception as x:
        log.warning(f"{key}: MLflow run {rec['run_id']} not marked {ended_by(e)}: {str(x).strip()[:300]}")


def _mlflow_run(rec: dict, old: dict | None, params: dict, tags: dict) -> str:
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
    run = client.create_run(exp_id, run_name=rec["name"], tags=tags)
    named = {metric_name(k)[:250]: str(v)[:6000] for k, v in params.items()}  # MLflow's limits on both
    listed = [Param(k, v) for k, v in named.items()]
    for s in range(0, len(listed), 100):  # MLflow takes at most 100 parameters a batch
        client.log_batch(run.info.run_id, params=listed[s : s + 100])
    return run.info.run_id


SUMMARY = "summary.json"  # a training run folder's figures (rank 0 writes it: cerbero_ray.train.metrics), read here


def run_folder_of(checkpoint: str) -> tuple[str, int | None] | None:
    """The training run folder that wrote ``checkpoint`` by its place (``<run>/hf``,
    ``<run>/adapter``, or one in ``<run>/checkpoint_step_N/``) and the checkpoint's step (None: the
    run's final model); None for any other path."""
    path = checkpoint.rstrip("/")
    parent, base = path.rsplit("/", 1) if "/" in path else ("", path)
    if base not in ("hf", "adapter") or not parent:
        return None
    up, last = parent.rsplit("/", 1) if "/" in parent else ("", parent)
    found = re.fullmatch(r"checkpoint_step_(\d+)", last)
    return (up, int(found.group(1))) if found and up else (parent, None)


def training_run_of(checkpoint: str) -> tuple[str, dict, int] | None:
    """The training run folder that wrote ``checkpoint`` (:func:`run_folder_of`), when that run was
    tracked: (its folder, its tracker record, the checkpoint's step); else None."""
    where = run_folder_of(checkpoint)
    if where is None:
        return None
    run, step = where
    try:
        rec = read_record(run)
        if rec is None:
            return None
        if step is None:  # the run's final model: its summary's step count
            summary = storage.join(run, SUMMARY)
            step = int(storage.read_json(summary)["steps"]) if storage.is_file(summary) else 0
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run, rec, step


def training_data_of(checkpoint: str) -> dict | None:
    """What is known of the data a model of ours was trained on: ``{"dedup": ...}``, the data stage's
    checks (which evaluation files it was checked against). From the model's own card first (its
    metadata's :data:`cerbero_ray.cards.RECORD`, in ``hf/``, ``adapter/``, a checkpoint's: it goes
    wherever the folder goes), else from the summary of the run folder it sits in (a checkpoint from
    before the record); a GGUF file's from its own metadata (:func:`cerbero_ray.cards.gguf_data`: it
    goes wherever the file goes). None when nothing says."""
    from cerbero_ray.cards import card_metadata, data_of, gguf_data, readable_data

    if checkpoint.lower().endswith(".gguf"):  # the file's own metadata (an adapter's base file has none)
        return gguf_data(checkpoint)
    if (data := data_of(card_metadata(checkpoint.rstrip("/")))) is not None:
        return data
    where = run_folder_of(checkpoint)
    if where is None:
        return None
    try:
        return readable_data(storage.read_json(storage.join(where[0], SUMMARY)).get("data"))
    except (OSError, ValueError, AttributeError):
        return None


def metric_name(name: str) -> str:
    """A name every tracker takes, for a metric or a parameter (MLflow: letters, digits,
    ``_ - . / :`` and spaces; a model or task name of the config may hold anything)."""
    return re.sub(r"[^A-Za-z0-9_\-./: ]", "_", name)


class Tracker:
    """The logging side of a run :func:`open_run` opened: :meth:`log` a step's scalars,
    :meth:`summary` figures that have no step of their own, :meth:`finish` at the end. ``params``:
    the run's configuration for W&B (None: leave the run's as it is). ``own``: the run is this
    job's, whose status it sets (MLflow: RUNNING from the start, as a resume reopens a run; an
    evaluation logging into the training run that made its checkpoint leaves its status be). A
    failure after the start warns once and turns the tracker off; the job goes on."""

    def __init__(self, rec: dict, params: dict | None, folder: str, key: str, own: bool = True):
        self.rec, self.kind, self.client, self.run, self.key = rec, rec["kind"], None, None, key
        self.own = own
        self.folder, self.staged = folder, None  # W&B's folder, for a folder in a bucket
        self.held: dict[str, int] = {}  # MLflow: key -> the last step the run already has
        self.wandb_from = 0  # W&B: the first step the run does not have yet
        # MLflow: batches sent in order by one thread of ours, so that a slow server never holds a
        # step up (its client's own asynchronous queue sends batches of one run concurrently,
        # which its file store does not survive: lines lost)
        self.outbox: queue.Queue = queue.Queue()
        self.sender: threading.Thread | None = None
        self.failed: Exception | None = None
        self.broken = False  # turned off by a failure (said once)
        try:
            if self.kind == "mlflow":
                from mlflow.tracking import MlflowClient

                self.client = MlflowClient(tracking_uri=rec["uri"])
                if own:  # sent first, by the sending thread: a slow server holds nothing up
                    self._queue(self._reopen)
            else:
                self._start_wandb(params)
        except Exception as e:
            raise ValueError(f"{key}: {self.kind} could not start: {str(e).strip()[:300]}") from None

    def _start_wandb(self, params: dict | None) -> None:
        """W&B's own folder (its offline run, its logs): ``$WANDB_DIR``, else ``<folder>/wandb/``;
        a folder in a bucket gets it copied there at the end."""
        import wandb

        where = os.environ.get("WANDB_DIR")
        if not where and storage.is_uri(self.folder):
            where = self.staged = tempfile.mkdtemp(prefix="cerbero-wandb-")
        elif not where:
            where = storage.resolve(self.folder)[1]
            os.makedirs(where, exist_ok=True)
        kw = {"settings": wandb.Settings(base_url=self.rec["uri"])} if self.rec.get("uri") else {}
        self.run = wandb.init(
            project=self.rec["project"],
            name=self.rec["name"],
            id=self.rec["run_id"],
            resume="allow",
            dir=where,
            **({"config": params} if params is not None else {}),
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
            named = {metric_name(k): float(v) for k, v in values.items()}
            new = {k: v for k, v in named.items() if self._new(step, k)}
            if not new:
                return
            if self.kind == "mlflow":
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                if self.failed is not None:
                    raise self.failed
                metrics = [Metric(k, v, now, step) for k, v in new.items()]
                self._queue(lambda: self.client.log_batch(self.rec["run_id"], metrics=metrics))
            else:
                self.run.log(new, step=step)
            self.held.update(dict.fromkeys(new, step))
        except Exception as e:
            self._off(e)

    def summary(self, step: int, values: dict, once: bool = False) -> None:
        """Figures of the run as a whole (a training's summary, an evaluation's): MLflow metrics at
        ``step`` (the last step, the checkpoint's), W&B's run summary (its steps belong to the
        training). ``once``: a figure MLflow's run holds at ``step`` already (sent by an attempt
        that died before it could say it was done) is not sent again."""
        self.flush()  # one batch of a run at a time
        if self.kind is None:
            return
        try:
            values = {metric_name(k): float(v) for k, v in values.items()}
            if self.kind == "mlflow" and once:
                values = {k: v for k, v in values.items() if self._new(step, k)}
                self.held.update(dict.fromkeys(values, step))
            if not values:
                return
            if self.kind == "mlflow":
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                self.client.log_batch(self.rec["run_id"], metrics=[Metric(k, v, now, step) for k, v in values.items()])
            else:
                self.run.summary.update(values)
        except Exception as e:
            self._off(e)

    def _reopen(self) -> None:
        """MLflow: the run RUNNING, without the failure an earlier attempt left on it."""
        run = self.client.get_run(self.rec["run_id"])
        if run.info.status != "RUNNING":
            self.client.update_run(self.rec["run_id"], status="RUNNING")
        if FAILURE in run.data.tags:
            self.client.delete_tag(self.rec["run_id"], FAILURE)

    def _queue(self, call) -> None:
        """MLflow: ``call`` (one request to the server) sent after those queued before it."""
        if self.sender is None:
            self.sender = threading.Thread(target=self._send, name="cerbero-mlflow", daemon=True)
            self.sender.start()
        self.outbox.put(call)

    def files(self, paths: list[str], under: str | None = None) -> None:
        """Local files stored with the run (MLflow's artifacts, W&B's run files; ``under``: in that
        folder of them): a training's loss curve and summary, an evaluation's report. One that
        cannot be stored (an artifact store this machine cannot reach) is a warning; the run's
        figures and status are not affected."""
        if self.kind is None:
            return
        for p in paths:
            try:
                if self.kind == "mlflow":
                    self.client.log_artifact(self.rec["run_id"], p, artifact_path=under)
                else:  # a copy in the run's own folder: W&B would link to ``p``, which may be temporary
                    where = os.path.join(self.run.dir, under or "")
                    os.makedirs(where, exist_ok=True)
                    kept = shutil.copy(p, where)
                    self.run.save(kept, base_path=self.run.dir, policy="now")
            except Exception as e:
                name = os.path.basename(p)
                log.warning(f"{self.key}: {name} and the run's other files not stored in {self.kind}: {str(e)[:300]}")
                return

    def _send(self) -> None:
        """The sending thread: each request in turn, until a failure (kept for the logging side)."""
        while True:
            call = self.outbox.get()
            try:
                if self.failed is None:
                    call()
            except Exception as e:
                self.failed = e
            finally:
                self.outbox.task_done()

    def flush(self) -> None:
        """Wait until the tracker has every step logged so far (at a checkpoint, at the end)."""
        if self.kind != "mlflow":
            return
        self.outbox.join()
        if self.failed is not None:
            self._off(self.failed)

    def finish(self, failure: BaseException | None = None) -> None:
        """The run done (``failure``: ended by it): every step sent; the run's status set when it is
        this job's own (MLflow: FINISHED, else FAILED or KILLED with the reason; W&B: exit code
        0, else 1)."""
        self.flush()
        if self.kind is None:
            return
        try:
            if self.kind == "mlflow":
                if self.own and failure is None:
                    self.client.set_terminated(self.rec["run_id"], "FINISHED")
                elif self.own:
                    _mark(self.client, self.rec["run_id"], failure)
            else:
                import wandb

                self.run.finish(exit_code=0 if failure is None else 1)
                # finish only tells W&B's service the run is done; the service writes the run's
                # file to its end after that: its teardown waits for it (an offline run read, or a
                # bucket's copy made, right after finish held a file cut short)
                wandb.teardown()
                if self.staged:
                    where = storage.join(self.folder, "wandb")
                    storage.upload_folder(os.path.join(self.staged, "wandb"), where, markers=False)
                    shutil.rmtree(self.staged, ignore_errors=True)
        except Exception as e:
            self._off(e)
        self.kind = None

    def _off(self, e: Exception) -> None:
        log.warning(f"{self.key}: {self.kind} tracking stopped, the job goes on: {str(e).strip()[:300]}")
        self.kind, self.broken = None, True
