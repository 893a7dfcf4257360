"""The training stage's run-time checks, before any worker starts: :func:`plan_run` checks the
config (``check_train``), reads the data stage's manifest, checks the shards and the model against
it (a ``ValueError`` naming the key), and returns the run's :class:`RunPlan` (what every worker
trains on, and where it writes), which the workers get beside the config. The part that needs
neither the tokenizer nor the model (a local manifest, its rows' length and count) runs before Ray
starts too: :func:`check_local_data`, the train stage's ``precheck`` in the stage table.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass

from cerbero_ray import storage
from cerbero_ray.config import check
from cerbero_ray.config.train import TrainStageConfig
from cerbero_ray.shards import read_manifest
from cerbero_ray.train.plan import DATA_ORDER_CHANGED, same_order, settings, settings_changed


@dataclass(frozen=True)
class RunPlan:
    run_dir: str  # <train.output_dir>/<train.name>: checkpoints, hf/, metrics
    seq_len: int  # the shards' rows, in tokens
    rows: int  # rows in all the shards
    shards: tuple  # ({"path", "rows"}, …): the manifest's shards, in its order
    tracker: dict | None = None  # the experiment tracker's run rank 0 logs into (cerbero_ray.tracking.open_run)
    data_id: str | None = None  # what the shards hold, wherever they lie (data_id): signs the data order


def plan_run(c: TrainStageConfig) -> RunPlan:
    """Validate ``c`` (the resolved config) against the shards and the model; returns the run's plan."""
    c = check("train", c)
    t = c.train
    manifest = _manifest(t.data_dir)
    seq_len = _check_shards(t, manifest)
    # transformers is imported here, not with the module: Ray Train's controller unpickles the
    # worker function from cerbero_ray.train.trainer, which imports this module, and runs no plan
    from cerbero_ray.models import build_model_config
    from cerbero_ray.tokenizer import build_tokenizer, tokenizer_hash

    tc = c.tokenizer
    tok = build_tokenizer(tc.path, tc.assistant_tag, tc.system_line)
    if manifest["tokenizer_hash"] != tokenizer_hash(tok):
        raise ValueError(
            f"tokenizer: the shards were made with another tokenizer or chat template "
            f"({manifest['tokenizer_hash']} vs {tokenizer_hash(tok)}); use the data stage's tokenizer config"
        )
    mc = build_model_config(c.model)
    if len(tok) > mc.vocab_size:
        raise ValueError(
            f"model: vocab_size {mc.vocab_size} is smaller than the tokenizer's {len(tok)} tokens "
            "(model.overrides.vocab_size)"
        )
    if seq_len > mc.max_position_embeddings:
        raise ValueError(f"model: max_position_embeddings {mc.max_position_embeddings} < the shards' seq_len {seq_len}")
    shards = [{"path": s["path"], "rows": int(s["rows"])} for s in manifest["shards"]]
    rows = sum(s["rows"] for s in shards)
    # a local run folder made absolute here, once: the workers' working folder is not the driver's
    out = t.output_dir if storage.is_uri(t.output_dir) else storage.resolve(t.output_dir)[1]
    return RunPlan(storage.join(out, t.name), seq_len, rows, tuple(shards), data_id=data_id(manifest))


def data_id(manifest: dict) -> str:
    """What a data run's shards hold, not where they lie: the data config's and tokenizer's hashes,
    its sources' files (sizes and times) and each shard's name, rows and tokens, as the manifest
    says. A copy of the folder (another disk, a bucket) has the same; a data run again with
    other sources, settings or files has another, even written to the same paths."""
    blob = json.dumps(
        {
            "config": manifest.get("config_hash"),
            "tokenizer": manifest.get("tokenizer_hash"),
            "sources": {k: (v or {}).get("stamp") for k, v in sorted((manifest.get("sources") or {}).items())},
            "shards": [[posixpath.basename(s["path"]), int(s["rows"]), s.get("tokens")] for s in manifest["shards"]],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_resume(run: RunPlan, c, total: int) -> None:
    """Before any worker starts: ``ValueError`` when the run folder's newest checkpoint was made with
    another data order and the run is not finished (``total`` steps), or under other settings
    (:func:`~cerbero_ray.train.plan.settings_changed`, finished or not). The workers check it too,
    but only once each has built its model; Ray Train restarts a failed worker group
    ``train.max_failures`` times, and each restart would find the same. The newest checkpoint rank 0
    finished counts, complete or not: a run with more workers than the checkpoint's finds none of
    its own world complete, and would otherwise start over in the same folder."""
    from cerbero_ray.train.checkpoint import complete_checkpoints, read_record

    t = c.train
    marked = complete_checkpoints(run.run_dir, 1)  # rank 0 marked it (its loop.json is written before)
    rec = read_record(marked[-1]) if marked else None
    order = rec and same_order(rec["signature"], list(run.shards), t, t.num_workers, run.data_id)
    if rec and not order and rec["step"] < total:
        raise ValueError(f"{DATA_ORDER_CHANGED} ({marked[-1]})")
    why = settings_changed((rec or {}).get("settings"), settings(c), run.run_dir)
    if why:
        raise ValueError(why)


def check_local_data(c, before: frozenset = frozenset()) -> None:
    """Before Ray starts (``runtime.launch``): a local ``train.data_dir``'s manifest, its rows'
    length and count against the config (what :func:`plan_run` checks first, without the tokenizer
    and the model), unless the data stage runs before this one in the same job. An object-store
    folder is read when the run plans."""
    t = c.train
    if "data" in before or storage.is_uri(t.data_dir):
        return
    _check_shards(t, _manifest(t.data_dir))


def _manifest(data_dir: str) -> dict:
    """The data stage's manifest in ``data_dir``, with what the trainer reads of it; else a
    ``ValueError`` naming the key and the file."""
    try:
        m = read_manifest(data_dir)
    except FileNotFoundError:
        raise ValueError(
            f"train.data_dir: no manifest.json in {data_dir} (run the data stage first, "
            "or point train.data_dir at its data.output_dir)"
        ) from None
    except ValueError as e:  # not JSON: a copy cut short, or another file under the name
        raise ValueError(f"train.data_dir: {data_dir}/manifest.json is not JSON ({e}); rerun the data stage") from None
    try:
        ok = int(m["seq_len"]) > 0 and isinstance(m["tokenizer_hash"], str) and isinstance(m["shards"], list)
        ok = ok and all(isinstance(s["path"], str) and int(s["rows"]) >= 0 for s in m["shards"])
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"train.data_dir: {data_dir}/manifest.json is not a data stage manifest (seq_len, tokenizer_hash, "
            "shards with path and rows); rerun the data stage"
        )
    return m


def _check_shards(t, manifest: dict) -> int:
    """``ValueError`` naming the key when the shards cannot feed the run; returns their seq_len."""
    seq_len = int(manifest["seq_len"])
    if t.seq_len is not None and int(t.seq_len) != seq_len:
        raise ValueError(
            f"train.seq_len={t.seq_len} but the shards in {t.data_dir} are {seq_len} tokens "
            "long; rerun the data stage with that data.seq_len, or drop train.seq_len"
        )
    rows = sum(int(s["rows"]) for s in manifest["shards"])
    _check_rows(manifest["shards"])
    need = t.global_batch_size + t.eval_rows
    if rows < need:
        raise ValueError(
            f"train.global_batch_size + train.eval_rows = {need} rows, but {t.data_dir} holds {rows}; "
            "lower them or prepare more data (a shorter data.seq_len gives more rows)"
        )
    return seq_len


def _check_rows(shards: list[dict]) -> None:
    """Each shard the manifest lists is there with the rows it says (its Parquet footer only, read in
    parallel for an object store): a folder copied in part, or shards rewritten since, fail here,
    not in a worker's read mid-epoch."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    def rows(path: str) -> int | None:
        fs, p = storage.resolve(path)
        if not fs.get_file_info(p).is_file:  # a local path or a bucket key alike
            return None
        with fs.open_input_file(p) as f:
            return pq.ParquetFile(f).metadata.num_rows

    with ThreadPoolExecutor(min(16, max(1, len(shards)))) as pool:
        found = list(pool.map(rows, [s["path"] for s in shards]))
    for s, n in zip(shards, found):
        if n != int(s["rows"]):
            what = "is missing" if n is None else f"has {n} rows"
            raise ValueError(
                f"train.data_dir: {s['path']} {what}; the manifest says {s['rows']} rows (shards changed or "
                "copied in part since the data stage wrote them: rerun it, or copy its whole folder)"
            )
