"""The evaluation stage: ``run_evaluate(cfg)``.

For every model in ``evaluate.checkpoints`` (an HF folder or URI, a ``.gguf`` file, or an
OpenAI-compatible ``http(s)://…/v1`` endpoint) and every task in ``evaluate.tasks``: the driver
loads the task's file, samples the scored rows, picks the shots and builds one *unit* per
(protocol, prompt wording) (:mod:`cerbero_ray.evaluate.tasks`). The request rows of every unit not
yet done travel as columns: to a pool of model actors for an HF checkpoint
(:class:`~cerbero_ray.evaluate.worker.EvalWorker`, ``ActorPoolStrategy``, one GPU each on GPU
clusters), to llama.cpp in a child process for a GGUF file, to the endpoint for a URL
(:mod:`cerbero_ray.evaluate.backends`). The driver reads the answers (:mod:`.reading`), computes the
figures with 95% bootstrap intervals, and writes, per (model, task), ``predictions.parquet`` (and
for SQuAD the official script's ``predictions.json`` and ``gold.json``) and ``metrics.json`` last.
A rerun skips every (model, task) whose ``metrics.json`` holds the same identity. At the end:
paired intervals of each model against the first, ``results.json``, ``results.md``, ``results.png``.

    python jobs/evaluate.py                                   # embedded local cluster
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, replace

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from cerbero_ray import batchjob, storage
from cerbero_ray.checkpoints import check_checkpoint
from cerbero_ray.config import check
from cerbero_ray.config.evaluate import EvaluateConfig, EvaluateStageConfig, selected_tasks
from cerbero_ray.evaluate import squad
from cerbero_ray.evaluate.backends import ModelRun, model_kind, probe, runner
from cerbero_ray.evaluate.metrics import baselines, paired_bootstrap, prompt_summary
from cerbero_ray.evaluate.reading import columns_from_rows, figures, metric_kind, read_unit
from cerbero_ray.evaluate.report import tracked_figures, write_report
from cerbero_ray.evaluate.tasks import Prepared, Unit, prepare, unit_key
from cerbero_ray.evaluate.worker import EvalWorker
from cerbero_ray.logs import progress
from cerbero_ray.storage import is_local
from cerbero_ray.tracking import training_data_of

log = logging.getLogger(__name__)

PREDICTION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("protocol", pa.string()),
        ("prompt", pa.int32()),
        ("draw", pa.int32()),
        ("gold", pa.string()),
        ("prediction", pa.string()),
        ("raw", pa.string()),
        ("p_yes", pa.float64()),
        ("parsed", pa.bool_()),
        ("truncated", pa.bool_()),
        ("gold_class", pa.int32()),
        ("pred_class", pa.int32()),
        ("em", pa.float64()),
        ("f1", pa.float64()),
        ("em_it", pa.float64()),
        ("f1_it", pa.float64()),
        ("exact", pa.float64()),
    ]
)


def prepare_tasks(ec: EvaluateConfig) -> tuple[dict[str, Prepared], list[str]]:
    """Every selected task's rows and units; tasks whose file is missing are skipped when ``skip_missing``."""
    prepared, skipped = {}, []
    for name, tc in selected_tasks(ec).items():
        if not storage.is_file(tc.path):
            if ec.skip_missing:
                skipped.append(name)
                continue
            raise ValueError(f"evaluate.tasks.{name}.path: no such file: {tc.path}")
        try:
            prepared[name] = prepare(name, tc, ec.seed)
        except ValueError as e:
            raise ValueError(f"evaluate.tasks.{name}: {e}") from None
    if skipped:
        log.warning(
            f"[evaluate] skipped, their files are not there (paths.data_dir; see ../shared/data/MANIFEST.md): "
            f"{', '.join(skipped)}"
        )
    return prepared, skipped


def _task_dir(ec: EvaluateConfig, ckpt: str, task: str) -> str:
    return storage.join(ec.output_dir, "runs", ckpt, task)


def _done(ec: EvaluateConfig, ckpt: str, task: str, ident: str) -> dict | None:
    try:
        m = storage.read_json(storage.join(_task_dir(ec, ckpt, task), "metrics.json"))
    except FileNotFoundError:
        return None
    return m if m.get("identity") == ident else None


def _runnable(units: list[Unit], cannot: dict[str, str]) -> tuple[list[Unit], dict[str, str]]:
    """The units a model runs, and why the others are not (``cannot``: protocol -> why)."""
    refused = {u.key: cannot[u.protocol] for u in units if u.protocol in cannot}
    return [u for u in units if u.key not in refused], refused


def _requests(todo: dict[str, list[Unit]]) -> list[dict]:
    return [
        {
            "task": name,
            "unit": u.key,
            "id": r["id"],
            "messages": r.get("messages"),
            "text": r.get("text"),
            # the label task that scores it: its unit's, or its own (per-row shots)
            "scorer": f"{name}/{u.key}/{r['id']}" if "task" in r else f"{name}/{u.key}",
            "max_new_tokens": u.max_new_tokens,
            "stop_at_newline": u.stop_at_newline,
            "choices": json.dumps(u.choices, ensure_ascii=False) if u.choices else None,  # choice: the allowed answers
        }
        for name, units in todo.items()
        for u in units
        for r in u.requests
    ]


def _answers(
    ec: EvaluateConfig, ckpt: str, todo: dict[str, list[Unit]], how: ModelRun, on_task=None
) -> dict[tuple, dict]:
    """Every request of ``todo`` answered by model ``ckpt`` run as ``how`` says: {(task, unit, id):
    {raw, p_yes, truncated}}. ``on_task(name, answers)`` is called as soon as every request of task
    ``name`` has its answer (the requests go task after task), so a model that fails later keeps
    the tasks it finished."""
    spec, kind = how.checkpoint, model_kind(how.checkpoint)
    items = _requests(todo)
    left = Counter(item["task"] for item in items)
    out = {}

    def got(key: tuple, answer: dict) -> None:
        out[key] = answer
        left[key[0]] -= 1
        if left[key[0]] == 0 and on_task is not None:
            on_task(key[0], out)

    longest = max([u.max_new_tokens for us in todo.values() for u in us] or [1])
    tasks = {f"{n}/{u.key}": u.task for n, us in todo.items() for u in us if u.task}
    tasks |= {
        f"{n}/{u.key}/{r['id']}": r["task"] for n, us in todo.items() for u in us for r in u.requests if "task" in r
    }
    cfg = replace(how, max_new_tokens=max(longest, 1), tasks=tasks)
    if kind == "hf":
        for row in batchjob.map_items(
            items, EvalWorker, cfg, "evaluate", f"evaluate {ckpt}", len(items), ec.batch_rows, batch_format="pyarrow"
        ):
            got((row["task"], row["unit"], row["id"]), row)
        return out
    run = runner(kind, spec, cfg)
    try:
        with progress(total=len(items), unit="row", desc=f"evaluate {ckpt} ({kind})") as bar:
            for s in range(0, len(items), ec.batch_rows):
                batch = items[s : s + ec.batch_rows]
                for item, o in zip(batch, run.run(batch)):
                    got((item["task"], item["unit"], item["id"]), o)
                bar.update(len(batch))
    finally:
        if hasattr(run, "close"):  # a GGUF file's llama.cpp child
            run.close()
    return out


def _finish_task(
    ec: EvaluateConfig, ckpt: str, p: Prepared, units: list[Unit], answers: dict, ident: str, refused: dict
) -> dict:
    """Figures and predictions of one (model, task); ``metrics.json`` is written last."""
    d = _task_dir(ec, ckpt, p.name)
    table, by_unit = [], {}
    for u in units:
        outs = {r["id"]: answers[(p.name, u.key, r["id"])] for r in u.requests}
        rows, cols, counts = read_unit(p, u, outs)
        table += rows
        by_unit[u.key] = {
            "protocol": u.protocol,
            "prompt": u.prompt,
            "draw": u.draw,
            "prompt_hash": u.prompt_hash(),
            **figures(metric_kind(p.kind, u.protocol), cols, counts, ec.bootstrap, ec.seed),
        }
        if p.kind == "squad" and u.protocol == "generate" and u.prompt == 0:  # the official script's inputs
            preds = {r["id"]: r["prediction"] for r in rows}
            storage.write_json(storage.join(d, "predictions.json"), preds)
            storage.write_json(storage.join(d, "gold.json"), squad.subset(p.rows))
    with storage.open_output(storage.join(d, "predictions.parquet")) as f:
        pq.write_table(pa.Table.from_pylist(table, schema=PREDICTION_SCHEMA), f)
    result = {
        "identity": ident,
        "checkpoint": ec.checkpoints[ckpt],
        "model_kind": model_kind(ec.checkpoints[ckpt]),
        "task": p.name,
        "kind": p.kind,
        "rows": len(p.rows),
        "units": by_unit,
        "protocols": _over_prompts(by_unit),
        "unsupported": refused,
    }
    storage.write_json(storage.join(d, "metrics.json"), result)
    return result


def _over_prompts(by_unit: dict) -> dict:
    """Per protocol and figure: over its prompt wordings (each the mean over its shot draws) the
    mean, std, best prompt and combined score; over the shot draws, their number, the mean of each
    wording's standard deviation and the widest range (``draw_std``, ``draw_range``)."""
    out = defaultdict(dict)
    groups = defaultdict(lambda: defaultdict(list))  # protocol -> prompt -> its draws' units
    for u in by_unit.values():
        groups[u["protocol"]][u["prompt"]].append(u)
    for protocol, per_prompt in groups.items():
        order = sorted(per_prompt)
        first = per_prompt[order[0]][0]
        for k, v in first.items():
            if isinstance(v, float) and k not in ("prompt",):
                draws = [[u[k] for u in per_prompt[p] if u.get(k) is not None] for p in order]
                s = prompt_summary([sum(d) / len(d) for d in draws])
                s["draws"] = min(len(d) for d in draws)
                s["draw_std"] = round(sum(statistics.stdev(d) if len(d) > 1 else 0.0 for d in draws) / len(draws), 4)
                s["draw_range"] = round(max(max(d) - min(d) for d in draws), 4)
                out[protocol][k] = s
    return dict(out)


def model_identity(ec: EvaluateConfig, spec: str) -> dict:
    """How a model runs, for its results' identity: the checkpoint, dtype and prompt limit, and
    what the checkpoint holds now (:func:`~cerbero_ray.storage.version`): results of the files that
    were at its path before are not its own."""
    return {
        "dtype": ec.dtype,
        "max_prompt_tokens": ec.max_prompt_tokens,
        "checkpoint": spec,
        "version": storage.version(spec),
    }


def evaluate_model(ec: EvaluateConfig, ckpt: str, prepared: dict[str, Prepared]) -> dict[str, dict]:
    """Every task of one model; returns {task: metrics.json content}."""
    tasks, kind = selected_tasks(ec), model_kind(ec.checkpoints[ckpt])
    model = model_identity(ec, ec.checkpoints[ckpt])
    results, todo, idents, refused = {}, {}, {}, {}
    # an endpoint is asked once which model it serves and whether it scores
    how, cannot = probe(kind, ec.checkpoints[ckpt], ModelRun.of(ec, ec.checkpoints[ckpt]))
    for name, p in prepared.items():
        units, refused[name] = _runnable(p.units, cannot)
        ident = p.identity(tasks[name], ec.seed, model) + f":{ec.bootstrap}"
        # what was refused is part of the identity: an endpoint that can score later redoes the task
        ident += f":without={','.join(sorted(refused[name]))}" if refused[name] else ""
        for key, why in refused[name].items():
            log.info(f"[evaluate] {ckpt}: {name} {key} not run: {why}")
        done = None if ec.overwrite else _done(ec, ckpt, name, ident)
        if done:
            results[name] = done
        else:
            todo[name], idents[name] = units, ident
    log.info(f"[evaluate] {ckpt}: {len(results)} task(s) already done, {len(todo)} to go ({', '.join(todo) or '-'})")
    if not todo:
        return results

    def finish(name: str, answers: dict) -> None:  # written as soon as its last answer is in
        results[name] = _finish_task(ec, ckpt, prepared[name], todo[name], answers, idents[name], refused[name])

    answers = _answers(ec, ckpt, todo, how, finish)
    for name in todo:
        if name not in results:  # no request to send (every unit refused)
            finish(name, answers)
    return {name: results[name] for name in prepared}  # in the tasks' order, however they finished


def paired(ec: EvaluateConfig, prepared: dict[str, Prepared], per_model: dict) -> dict:
    """Each model against the first, on the same rows and resamples: per task and unit, the
    difference of every figure with its 95% interval."""
    names = list(per_model)
    if len(names) < 2:
        return {}
    out = {}
    cols = {
        (m, t): {
            u: columns_from_rows(metric_kind(prepared[t].kind, u.split("/")[0]), rows) for u, rows in units.items()
        }
        for m in names
        for t in per_model[m]
        for units in [_unit_rows(ec, m, t)]
    }
    base = names[0]
    for m in names[1:]:
        for t in per_model[m]:
            for u, b in cols.get((m, t), {}).items():
                a = cols.get((base, t), {}).get(u)
                if a is None or len(next(iter(a.values()))) != len(next(iter(b.values()))):
                    continue
                kind = metric_kind(prepared[t].kind, u.split("/")[0])
                out.setdefault(f"{m} - {base}", {}).setdefault(t, {})[u] = paired_bootstrap(
                    kind, a, b, ec.bootstrap, ec.seed
                )
    return out


def _unit_rows(ec: EvaluateConfig, ckpt: str, task: str) -> dict[str, list[dict]]:
    fs, p = storage.resolve(storage.join(_task_dir(ec, ckpt, task), "predictions.parquet"))
    with fs.open_input_file(p) as f:
        rows = pq.read_table(f).to_pylist()
    units = defaultdict(list)
    for r in rows:
        units[unit_key(r["protocol"], r["prompt"], r.get("draw") or 0)].append(r)
    return units


def _present(ec: EvaluateConfig, name: str, path: str) -> bool:
    """A GGUF file that is not there (the main job without llama-cpp-python makes no Q4_K_M file) is
    skipped with one line when ``skip_missing``; else an error naming the key."""
    if model_kind(path) != "gguf" or storage.is_file(path):
        return True
    if ec.skip_missing:
        log.warning(f"[evaluate] {name} skipped: no GGUF file at {path}")
        return False
    raise ValueError(f"evaluate.checkpoints.{name}: no such GGUF file: {path}")


def run_evaluate(cfg: DictConfig | dict | EvaluateStageConfig) -> dict:
    """Evaluate every model on every task on an initialised Ray; returns ``results.json``'s content."""
    c = check("evaluate", cfg)
    ec = c.evaluate
    for name, path in ec.checkpoints.items():
        if model_kind(path) == "hf" and not is_local(path):
            check_checkpoint(path, f"evaluate.checkpoints.{name}")
    t0 = time.perf_counter()
    prepared, skipped = prepare_tasks(ec)
    for name, p in prepared.items():
        rej = Counter(r["reason"] for r in p.rejects)
        log.info(
            f"[evaluate] {name}: {len(p.rows)} rows scored, {p.pool_rows} in the shot pool, "
            f"{len(p.units)} unit(s) ({', '.join(u.key for u in p.units)})"
            f"{', rejects ' + str(dict(rej)) if rej else ''}"
        )
    models = [m for m, path in ec.checkpoints.items() if _present(ec, m, path)]
    runs = open_tracking(ec, models)  # evaluate.tracker: a tracker that refuses says so before any model runs
    try:
        per_model = {m: evaluate_model(ec, m, prepared) for m in models}
    except BaseException as e:  # the runs of their own this evaluation opened say how it ended
        from cerbero_ray.tracking import end_run

        for _, rec, _, _, own in runs.values():
            if own:
                end_run(rec, e, "evaluate.tracker")
        raise
    results = {
        "config": asdict(ec),
        "seed": ec.seed,
        "bootstrap": ec.bootstrap,
        "skipped_tasks": skipped,
        "seconds": round(time.perf_counter() - t0, 1),
        "tasks": {
            n: {
                "kind": p.kind,
                "rows": len(p.rows),
                "pool_rows": p.pool_rows,
                "shots": p.shots,
                "file_sha256": p.file_sha256,
                "prompt_hashes": {u.key: u.prompt_hash() for u in p.units},
                "rejects": dict(Counter(r["reason"] for r in p.rejects)),
                "rejected": p.rejects[:100],
                "baselines": baselines([r["gold"] for r in p.rows]) if p.kind != "squad" else None,
            }
            for n, p in prepared.items()
        },
        "results": {m: {t: r["units"] for t, r in res.items()} for m, res in per_model.items()},
        "over_prompts": {m: {t: r["protocols"] for t, r in res.items()} for m, res in per_model.items()},
        "model_kinds": {m: model_kind(ec.checkpoints[m]) for m in per_model},
        "training_data": {m: d for m in per_model if (d := training_data_of(ec.checkpoints[m])) is not None},
        "paired": paired(ec, prepared, per_model),
    }
    storage.write_json(storage.join(ec.output_dir, "results.json"), results)
    results["report"] = write_report(results, ec)
    track(ec, per_model, runs)
    return results


TRACKED = "tracked.json"  # beside a model's tasks: each task's identity its tracker run has the figures of


def open_tracking(ec: EvaluateConfig, models: list[str]) -> dict:
    """``evaluate.tracker``, before any model runs (a tracker that refuses is one line then): each
    model's tracker run, ``{model: (folder, record, step, params or None, its own run)}``: the
    training run that wrote its checkpoint when that run was tracked with the same tracker (at the
    checkpoint's step, its parameters and status left as they are), else a run of its own named
    after the model in ``evaluate.tracker.project`` (recorded in ``runs/<model>/tracker.json``)."""
    tc = ec.tracker
    if tc.kind == "none":
        return {}
    from cerbero_ray.tracking import flat_config, open_run, training_run_of

    out = {}
    for m in models:
        path = ec.checkpoints[m]
        owner = training_run_of(path) if model_kind(path) == "hf" else None
        if owner and owner[1]["kind"] == tc.kind:
            out[m] = (*owner, None, False)
            continue
        folder, params = storage.join(ec.output_dir, "runs", m), {"checkpoint": path, **flat_config(ec)}
        rec = open_run(tc, "evaluate.tracker", m, folder, params, {"cerbero.checkpoint": path})
        out[m] = (folder, rec, 0, params, True)
    return out


def _report_copies(out: str, d: str) -> list[str]:
    """Local copies, in ``d``, of the report under ``out`` (local or a bucket)."""
    copies = []
    for name in ("results.md", "results.png"):
        src = storage.join(out, name)
        if storage.is_file(src):
            fs, p = storage.resolve(src)
            with fs.open_input_stream(p) as f, open(os.path.join(d, name), "wb") as dst:
                dst.write(f.read())
            copies.append(os.path.join(d, name))
    return copies


def track(ec: EvaluateConfig, per_model: dict, runs: dict) -> None:
    """Each model's figures (:func:`~cerbero_ray.evaluate.report.tracked_figures`, as
    ``eval/<task>/<protocol>/<metric>``) into its tracker run (:func:`open_tracking`). A task's
    figures go once per identity: a rerun that computes nothing new sends nothing."""
    from cerbero_ray.tracking import Tracker

    for m, res in per_model.items():
        if m not in runs:
            continue
        record = storage.join(ec.output_dir, "runs", m, TRACKED)
        sent = storage.read_json(record) if storage.is_file(record) else {}
        new = {t: r for t, r in res.items() if sent.get(t) != r["identity"]}
        if not new:
            continue
        where, rec, step, params, own = runs[m]
        t = Tracker(rec, params, where, "evaluate.tracker", own=own)
        figures = {f"eval/{task}/{k}": v for task, r in new.items() for k, v in tracked_figures(r["units"]).items()}
        t.summary(step, figures)
        with tempfile.TemporaryDirectory(prefix="cerbero-report-") as d:  # the report beside them
            t.files(_report_copies(ec.output_dir, d), under="evaluation")
        t.finish()
        if not t.broken:  # else said once (a warning); the next run sends them again
            storage.write_json(record, {**sent, **{task: r["identity"] for task, r in new.items()}})
            log.info(f"[evaluate] {m}: {len(new)} task(s)' figures in {ec.tracker.kind} run {rec['run_id']}")
