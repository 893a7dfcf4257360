"""The evaluation stage on Ray Data: ``run_evaluate(cfg)``.

For every checkpoint in ``evaluate.checkpoints`` and every task in ``evaluate.tasks``: the driver
loads the task's file, samples the scored rows and picks the shots (:mod:`cerbero_ray.evaluate.tasks`);
a pool of model actors (one checkpoint each, ``ActorPoolStrategy``, one GPU each on GPU clusters)
runs batches of rows under each protocol (:class:`~cerbero_ray.evaluate.worker.EvalWorker`: the
continuous-batching generator for answers, the label scorer for ``score``); the driver computes
the metrics and writes, per (checkpoint, task), ``predictions.parquet`` (and for SQuAD a
``predictions.json`` in the official format) and ``metrics.json`` last. A rerun skips every
(checkpoint, task) whose ``metrics.json`` holds the same identity. At the end: ``results.json``,
``results.md`` (the seed's two tables) and ``results.png``.

    python jobs/evaluate.py                                   # embedded local cluster
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from cerbero_ray import batchjob, storage
from cerbero_ray.checkpoints import check_checkpoint, is_local
from cerbero_ray.config import check
from cerbero_ray.config.evaluate import selected_tasks
from cerbero_ray.evaluate import squad
from cerbero_ray.evaluate.metrics import baselines, classification_scores, squad_scores
from cerbero_ray.evaluate.report import write_report
from cerbero_ray.evaluate.tasks import Prepared, prepare
from cerbero_ray.evaluate.worker import EvalWorker


def prepare_tasks(ec: dict) -> tuple[dict[str, Prepared], list[str]]:
    """Every selected task's rows; tasks whose file is missing are skipped when ``skip_missing``."""
    prepared, skipped = {}, []
    for name, tc in selected_tasks(ec).items():
        if not storage.is_file(tc["path"]):
            if ec["skip_missing"]:
                skipped.append(name)
                continue
            raise ValueError(f"evaluate.tasks.{name}.path: no such file: {tc['path']}")
        try:
            prepared[name] = prepare(name, tc, ec["seed"])
        except ValueError as e:
            raise ValueError(f"evaluate.tasks.{name}: {e}") from None
    if skipped:
        print(
            f"[evaluate] skipped, their files are not there (paths.data_dir; see ../shared/data/MANIFEST.md): "
            f"{', '.join(skipped)}"
        )
    return prepared, skipped


def _task_dir(ec: dict, ckpt: str, task: str) -> str:
    return storage.join(ec["output_dir"], "runs", ckpt, task)


def _done(ec: dict, ckpt: str, task: str, ident: str) -> dict | None:
    try:
        m = storage.read_json(storage.join(_task_dir(ec, ckpt, task), "metrics.json"))
    except FileNotFoundError:
        return None
    return m if m.get("identity") == ident else None


def _items(p: Prepared, protocol: str, batch_rows: int) -> list[dict]:
    keep = ("id", "messages") if protocol == "generate" else ("id", "text")
    rows = [{k: r[k] for k in keep} for r in p.rows]
    return [
        {"task": p.name, "protocol": protocol, "rows": json.dumps(rows[i : i + batch_rows], ensure_ascii=False)}
        for i in range(0, len(rows), batch_rows)
    ]


def _finish_task(ec: dict, ckpt: str, p: Prepared, outs: dict[str, list[dict]], ident: str) -> dict:
    """Metrics and predictions of one (checkpoint, task); ``metrics.json`` is written last."""
    d = _task_dir(ec, ckpt, p.name)
    gold = {r["id"]: r["gold"] for r in p.rows}
    metrics, table = {}, defaultdict(list)
    for protocol, out in outs.items():
        by_id = {o["id"]: o for o in out}
        if p.kind == "squad":
            preds = {q: by_id[q]["prediction"] for q in gold}
            metrics[protocol] = squad_scores(preds, gold)
            storage.write_json(storage.join(d, "predictions.json"), preds)  # the official script's inputs
            storage.write_json(storage.join(d, "gold.json"), squad.subset(p.rows))
        else:
            metrics[protocol] = classification_scores([gold[q] for q in gold], [by_id[q]["prediction"] for q in gold])
        for q in gold:
            o = by_id[q]
            table["id"].append(q)
            table["gold"].append(json.dumps(gold[q], ensure_ascii=False))
            table["prediction"].append(str(o["prediction"]))
            table["raw"].append(o.get("raw"))
            table["p_yes"].append(o.get("p_yes"))
            table["protocol"].append(protocol)
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("gold", pa.string()),
            ("prediction", pa.string()),
            ("raw", pa.string()),
            ("p_yes", pa.float64()),
            ("protocol", pa.string()),
        ]
    )
    with storage.open_output(storage.join(d, "predictions.parquet")) as f:
        pq.write_table(pa.table(dict(table), schema=schema), f)
    result = {
        "identity": ident,
        "checkpoint": ec["checkpoints"][ckpt],
        "task": p.name,
        "kind": p.kind,
        "rows": len(p.rows),
        "metrics": metrics,
    }
    storage.write_json(storage.join(d, "metrics.json"), result)
    return result


def evaluate_checkpoint(ec: dict, ckpt: str, prepared: dict[str, Prepared]) -> dict[str, dict]:
    """Every task of one checkpoint; returns {task: metrics.json content}."""
    tasks = selected_tasks(ec)
    results, todo = {}, {}
    for name, p in prepared.items():
        ident = p.identity(tasks[name], ec["seed"]) + ":" + ec["checkpoints"][ckpt]
        done = None if ec.get("overwrite") else _done(ec, ckpt, name, ident)
        if done:
            results[name] = done
        else:
            todo[name] = ident
    print(f"[evaluate] {ckpt}: {len(results)} task(s) already done, {len(todo)} to go ({', '.join(todo) or '-'})")
    if not todo:
        return results
    items = [
        it
        for name in todo
        for proto in tasks[name]["protocols"]
        for it in _items(prepared[name], proto, ec["batch_rows"])
    ]
    cfg = {
        "checkpoint": ec["checkpoints"][ckpt],
        **{
            k: ec[k]
            for k in (
                "dtype",
                "batch_size",
                "max_prompt_tokens",
                "prefill_tokens",
                "workers",
                "gpus_per_worker",
                "cpus_per_worker",
            )
        },
        "tasks": {
            n: {
                "kind": tasks[n]["kind"],
                "max_new_tokens": tasks[n]["max_new_tokens"],
                "task": prepared[n].task if "score" in tasks[n]["protocols"] else None,
            }
            for n in todo
        },
    }
    expected = Counter(f"{it['task']}/{it['protocol']}" for it in items)
    outs: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    total = sum(len(json.loads(it["rows"])) for it in items)
    for row in batchjob.map_items(items, EvalWorker, cfg, f"evaluate {ckpt}", total):
        outs[row["task"]][row["protocol"]] += json.loads(row["out"])
        expected[f"{row['task']}/{row['protocol']}"] -= 1
        name = row["task"]
        if name in todo and all(expected[f"{name}/{pr}"] == 0 for pr in tasks[name]["protocols"]):
            results[name] = _finish_task(ec, ckpt, prepared[name], outs.pop(name), todo.pop(name))
    return results


def run_evaluate(cfg: DictConfig | dict) -> dict:
    """Evaluate every checkpoint on every task on an initialised Ray; returns ``results.json``'s content."""
    c = check("evaluate", cfg)
    ec = c["evaluate"]
    for name, path in ec["checkpoints"].items():
        if not is_local(path):
            check_checkpoint(path, f"evaluate.checkpoints.{name}")
    t0 = time.perf_counter()
    prepared, skipped = prepare_tasks(ec)
    for name, p in prepared.items():
        rej = Counter(r["reason"] for r in p.rejects)
        print(
            f"[evaluate] {name}: {len(p.rows)} rows scored, {p.pool_rows} in the shot pool"
            f"{', rejects ' + str(dict(rej)) if rej else ''}"
        )
    per_ckpt = {ckpt: evaluate_checkpoint(ec, ckpt, prepared) for ckpt in ec["checkpoints"]}
    results = {
        "config": ec,
        "seed": ec["seed"],
        "skipped_tasks": skipped,
        "seconds": round(time.perf_counter() - t0, 1),
        "tasks": {
            n: {
                "kind": p.kind,
                "rows": len(p.rows),
                "pool_rows": p.pool_rows,
                "shots": p.shots,
                "rejects": dict(Counter(r["reason"] for r in p.rejects)),
                "rejected": p.rejects[:100],
                "baselines": baselines([r["gold"] for r in p.rows]) if p.kind != "squad" else None,
            }
            for n, p in prepared.items()
        },
        "results": {ck: {t: r["metrics"] for t, r in res.items()} for ck, res in per_ckpt.items()},
    }
    storage.write_json(storage.join(ec["output_dir"], "results.json"), results)
    results["report"] = write_report(results, ec)
    return results
