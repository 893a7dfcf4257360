"""The training stage on Ray: ``run_train(cfg)`` → a Ray Train ``TorchTrainer`` running
:func:`cerbero_ray.train.loop.train_loop` in every worker, DeepSpeed ZeRO-1 inside.

- Rows stream in through Ray Data in every worker, in the order :mod:`cerbero_ray.train.plan`
  fixes, so a restarted worker resumes at the exact next row (the few held-out rows are read in
  the worker itself).
- Failures: ``FailureConfig(max_failures)`` restarts the worker group from the last checkpoint.
- The run folder is ``<train.output_dir>/<train.name>``: Ray Train's checkpoints (the last
  ``keep_checkpoints``), ``hf/`` (the final model; ``adapter/`` under ``train.method=lora``, see
  :mod:`cerbero_ray.train.lora`), ``metrics.jsonl``, ``tensorboard/``, ``loss.png``.
  Running again with the same name resumes that run (a finished one returns its summary at once:
  no worker starts, no checkpoint is loaded; :func:`finished`).

    python jobs/train.py                      # tiny model, 2 CPU workers, the shipped chat sample
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import pyarrow.fs as pafs
from omegaconf import DictConfig

from cerbero_ray import storage
from cerbero_ray.cards import CARD
from cerbero_ray.cluster import check_fits
from cerbero_ray.config import check
from cerbero_ray.config.train import TrainStageConfig
from cerbero_ray.tracking import end_run, flat_config, open_run
from cerbero_ray.train.metrics import read_summary
from cerbero_ray.train.plan import plan_all, total_steps
from cerbero_ray.train.run_plan import check_resume, plan_run

log = logging.getLogger(__name__)
# a check of ours that failed in a worker (its message): Ray Train restarts a failed worker group
# train.max_failures times, and every restart would find the same input, after building its model
# again; with this in the run folder a restart fails at once. The driver clears it before a run.
FAILED = ".failed.json"
# Ray Train's own record of the run's checkpoints (Ray 2.60's name), read when a run resumes
RAY_RECORD = "checkpoint_manager_snapshot.json"


def _worker(config: dict) -> None:
    from cerbero_ray.logs import quiet
    from cerbero_ray.train.env import RayEnv
    from cerbero_ray.train.loop import train_loop

    quiet()
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO line per dataset read otherwise
    try:  # Ray Train 2.60 logs every report at INFO under a logger named after its file
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    c, plan = config["config"], config["plan"]
    t = c.train
    attempt(plan.run_dir, lambda: train_loop(c, plan, RayEnv(plan.run_dir, t.fail_at_step, t.fail_rank)))


def attempt(run_dir: str, train) -> None:
    """A worker's attempt at the run in ``run_dir``: ``train()``, unless an earlier attempt left its
    verdict (:data:`FAILED`), which it raises at once; a check of ours that fails in ``train()``
    (here, or in a Ray Data read task) is left as the verdict, then raised."""
    import traceback

    from cerbero_ray.logs import our_error

    failed = storage.join(run_dir, FAILED)
    earlier = _read_verdict(failed)
    if earlier is not None:  # an earlier attempt of this run found its input wrong: so would this one
        raise ValueError(earlier)
    try:
        train()
    except Exception:
        why = our_error(traceback.format_exc())
        if why is not None:
            storage.write_json(failed, {"error": why})
        raise


def verdict(run_dir: str) -> str | None:
    """The verdict a worker left in ``run_dir`` (None: none), removed: the next run starts clean."""
    failed = storage.join(run_dir, FAILED)
    why = _read_verdict(failed)
    if why is not None:
        fs, p = storage.resolve(failed)
        fs.delete_file(p)
    return why


def set_aside_ray_record(run_dir: str) -> str | None:
    """Ray Train's record of the checkpoints in ``run_dir`` (:data:`RAY_RECORD`), moved aside to
    ``<name>.set-aside-<UTC time>`` when Ray Train would refuse to start on it: a checkpoint it names
    is gone (deleted by hand to go back one, or by a bucket's lifecycle rule), it is not JSON (a copy
    cut short), or another Ray version wrote it. Ray Train would raise its
    ``CheckpointManagerInitializationError`` and ask for a new run name or the folder deleted; but
    the workers resume from the run folder itself (the newest checkpoint every rank completed), so
    Ray Train can start a new record instead. Returns why it was moved (None: fine, or absent).
    The checkpoints the old record named count as unregistered ones: rank 0 deletes them once the
    new record holds a newer one (:meth:`~cerbero_ray.train.env.RayEnv.report`)."""
    import time

    import ray

    path = storage.join(run_dir, RAY_RECORD)
    try:
        rec = storage.read_json(path)
    except FileNotFoundError:
        return None
    except ValueError as e:
        why = f"it is not JSON ({e})"
    else:
        why = None
        if not isinstance(rec, dict):
            why = "it is not Ray Train's record"
        elif rec.get("ray_version") != ray.__version__:
            why = f"Ray {rec.get('ray_version')} wrote it and this is Ray {ray.__version__}"
        else:
            results = [*(rec.get("checkpoint_results") or []), rec.get("latest_checkpoint_result") or {}]
            names = {r.get("checkpoint_dir_name") for r in results if isinstance(r, dict)} - {None}
            fs, p = storage.resolve(run_dir)
            gone = sorted(n for n in names if fs.get_file_info(f"{p}/{n}").type != pafs.FileType.Directory)
            if gone:
                why = f"it names {', '.join(gone)}, which {'is' if len(gone) == 1 else 'are'} gone"
    if why is None:
        return None
    fs, p = storage.resolve(path)
    aside = f"{p}.set-aside-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    fs.move(p, aside)  # as storage.open_output publishes (an object store: a copy, then a delete)
    aside = storage.join(run_dir, os.path.basename(aside))
    return f"Ray Train's record of this run's checkpoints set aside ({why}): {aside}"


def _read_verdict(path: str) -> str | None:
    try:
        return storage.read_json(path)["error"]
    except FileNotFoundError:
        return None


def _storage(output_dir: str) -> dict:
    """Ray Train's storage: an object store through our client (its retries), else the path."""
    if not storage.is_uri(output_dir):  # absolute: Ray Train takes a relative path for a URI
        return {"storage_path": storage.resolve(output_dir)[1]}
    fs, p = storage.resolve(output_dir)
    return {"storage_path": p, "storage_filesystem": fs}


def run_train(cfg: DictConfig | dict | TrainStageConfig) -> dict:
    """Train on an initialised Ray; returns the summary (run folder, HF folder, losses, speed)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    c = check("train", cfg)
    t = c.train
    if not t.use_gpu:  # the CPU workers' own choice of attention, made here: one error, not one per worker
        from cerbero_ray.train.modeling import pick_attention

        try:
            pick_attention(t.attention, cuda=False, micro_batch=t.micro_batch_size)
        except ValueError as e:
            raise ValueError(f"{e} (train.use_gpu=false gives Ray Train's workers no GPU)") from None
    run = plan_run(c)
    plans = plan_all(list(run.shards), t, t.num_workers)
    steps = total_steps(plans, t)
    check_resume(run, c, steps)  # a changed data order or settings: here, not in every worker once per restart
    log.info(
        f"[train] {run.rows} rows × {run.seq_len} tokens; {t.num_workers} workers; "
        f"global batch {t.global_batch_size} rows; {steps} steps over {t.epochs} epoch(s) "
        f"({plans[0].dropped_rows} rows per epoch left over, {t.eval_rows} held out) → {run.run_dir}",
    )
    done = finished(run.run_dir, t, steps)
    if done is not None:  # a rerun of a finished run: no worker starts, no checkpoint is loaded
        log.info(
            f"[train] {run.run_dir} finished its {steps} steps: nothing to train "
            "(another train.name, or more epochs, trains on)"
        )
        return _report(done)
    # a tracker that refuses: here, before the workers
    run = replace(run, tracker=open_run(t.tracker, "train.tracker", t.name, run.run_dir, flat_config(c)))
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    check_fits(  # Ray Train starts the workers together
        {k: v * t.num_workers for k, v in resources.items()},
        f"train.num_workers={t.num_workers} with train.cpus_per_worker={t.cpus_per_worker:g}"
        + (" and train.use_gpu=true (a GPU each)" if t.use_gpu else ""),
    )
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": c, "plan": run},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker=resources,
            placement_strategy=t.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=t.name,
            **_storage(t.output_dir),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            # our progress lines are the log; Ray Train's INFO line per report would drown them
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    verdict(run.run_dir)  # an earlier run's: its input may have been mended since
    aside = set_aside_ray_record(run.run_dir)
    if aside:
        log.warning(f"[train] {aside}; resuming from the run folder's newest complete checkpoint")
    try:
        try:
            result = trainer.fit()
            if result.error:
                raise result.error
        except Exception:
            why = verdict(run.run_dir)
            if why is None:
                raise
            raise ValueError(why) from None  # one line: what the workers found wrong with the input
    except BaseException as e:  # the tracker's run says so, when rank 0 could not (killed, or Ctrl-C here)
        end_run(run.tracker, e, "train.tracker")
        raise
    summary = read_summary(run.run_dir)
    # Ray's path is inside its filesystem (no s3://): the same checkpoint named by the run folder's URI
    last = result.checkpoint
    if last is None:  # a finished run rerun after its Ray record was set aside reports none
        from cerbero_ray.train.checkpoint import complete_checkpoints

        done = complete_checkpoints(run.run_dir, t.num_workers)
        summary["checkpoint"] = done[-1] if done else None
    else:
        summary["checkpoint"] = storage.join(run.run_dir, os.path.basename(last.path.rstrip("/")))
    return _report(summary)


def finished(run_dir: str, t, steps: int) -> dict | None:
    """The summary of a run that already trained all ``steps`` (with its newest checkpoint), or
    None: its ``summary.json`` (rank 0 writes it last) says ``steps``, every one of
    ``train.num_workers`` ranks completed a checkpoint of that step, and its model folder is there
    (``hf/``; under LoRA ``adapter/``, and ``hf/`` when merged). Starting the workers would load
    that checkpoint (a 7B's weights and optimizer states) only to find nothing left to do."""
    from cerbero_ray.train.checkpoint import complete_checkpoints, read_record

    try:
        summary = read_summary(run_dir)
    except (FileNotFoundError, ValueError):
        return None
    if summary.get("steps") != steps or summary.get("method", "full") != t.method:
        return None
    done = complete_checkpoints(run_dir, t.num_workers)
    if not done or (read_record(done[-1]) or {}).get("step") != steps:
        return None
    models = [(summary.get("adapter_dir"), "adapter_config.json")] if t.method == "lora" else []
    if t.method != "lora" or t.lora.merge:
        models.append((summary.get("hf_dir"), "config.json"))
    if not all(folder and storage.is_file(storage.join(folder, marker)) for folder, marker in models):
        return None
    return {**summary, "checkpoint": done[-1]}


def _report(summary: dict) -> dict:
    """The run's summary block in the log; returns ``summary``."""
    evals = summary.get("eval_losses") or []
    log.info("── train ─────────────────────────────────────────────────────")
    log.info(f" run           {summary.get('run_dir')}")
    log.info(
        f" steps         {summary.get('steps')}  (train loss {summary.get('first_loss'):.4f} → "
        f"{summary.get('final_loss'):.4f})"
        if summary.get("first_loss") is not None
        else f" steps  {summary.get('steps')}"
    )
    if evals:
        log.info(f" held-out loss {' → '.join(f'{e:.3f}' for e in evals)}")
    log.info(f" checkpoint    {summary['checkpoint']}")
    if summary.get("adapter_dir"):
        log.info(
            f" adapter       {summary['adapter_dir']}  (LoRA: {summary['trainable_params']:,} trainable "
            f"parameters, {100 * summary['trainable_share']:.2f}% of {summary['total_params']:,}; "
            f"base {summary['base']})"
        )
    if summary.get("hf_dir"):
        carded = storage.is_file(storage.join(summary["hf_dir"], CARD))
        log.info(f" hf model      {summary['hf_dir']}" + (f"  (its model card: {CARD})" if carded else ""))
    log.info(f" loss curve    {summary.get('loss_png')}")
    log.info("──────────────────────────────────────────────────────────────")
    return summary
