"""Schemas every stage shares (cluster, paths, tokenizer, model) and small check helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from omegaconf import MISSING

from cerbero_ray.chat import ASSISTANT_TAGS, SYSTEM_LINE
from cerbero_ray.checkpoints import PATH_REQUIRED, check_local_checkpoint
from cerbero_ray.storage import check_scheme, is_local, join, local_path, split_glob, within

INFERENCE_DTYPES = ("auto", "bfloat16", "float32", "float16")  # auto: bfloat16 on GPU, float32 on CPU
MODEL_DTYPES = ("float32", "bfloat16", "float16")
GENERATION_ENGINES = ("continuous", "hf")  # what serve.engine and generate.engine choose between


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: embedded local cluster (or the job's cluster under `ray job submit`)
    num_cpus: Optional[int] = None  # embedded cluster only; None = all cores
    dashboard: bool = False  # embedded cluster only
    dashboard_host: str = "127.0.0.1"
    namespace: str = "cerbero"
    object_store_memory_gb: Optional[float] = None
    progress_bars: bool = False  # Ray Data's own per-operator bars (ours are always on)
    # embedded cluster only: the port Prometheus scrapes Ray's metrics (and the server's) from; None: Ray picks one
    metrics_export_port: Optional[int] = None


@dataclass
class TrackerConfig:
    """``<stage>.tracker``: an experiment tracker's run beside the stage's own files
    (:mod:`cerbero_ray.tracking`): training's per-step metrics, evaluation's figures."""

    kind: str = "none"  # none | mlflow | wandb (pip install '.[tracking]')
    project: str = "cerbero-ray"  # the MLflow experiment or the W&B project
    # MLflow: its tracking URI (null: $MLFLOW_TRACKING_URI); W&B: its server (null: $WANDB_BASE_URL, wandb.ai)
    uri: Optional[str] = None


@dataclass
class PathsConfig:
    repo_dir: str = MISSING
    data_dir: str = MISSING  # external data (../shared/data or a bucket)
    output_dir: str = MISSING


@dataclass
class TokenizerConfig:
    path: Optional[str] = None  # None: mistral-common's tokenizer.model.v1
    assistant_tag: str = "AI"  # "AI" ([|AI|], the seed) or "Assistente" (the released model)
    system_line: str = SYSTEM_LINE


@dataclass
class ModelConfig:
    _target_: str = MISSING  # a builder in cerbero_ray.models
    path: Optional[str] = None  # for cerbero_ray.models.from_pretrained
    dtype: str = "float32"
    overrides: Dict[str, Any] = field(default_factory=dict)


def one_of(value, allowed, key: str) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {tuple(allowed)}, got {value!r}")


def at_least(section, keys, low: float, prefix: str) -> None:
    for k in keys:
        v = getattr(section, k)
        if v is not None and v < low:
            raise ValueError(f"{prefix}.{k} must be >= {low}, got {v}")


def check_paths(pc: PathsConfig) -> None:
    """A blank ``paths.output_dir`` or ``paths.data_dir`` (``CERBERO_OUTPUT_DIR=$UNSET``) is refused:
    every folder under it would start at the filesystem's root (``/train``, ``/data``)."""
    for key, env in (("output_dir", "CERBERO_OUTPUT_DIR"), ("data_dir", "CERBERO_DATA_DIR")):
        if not str(getattr(pc, key) or "").strip():
            raise ValueError(
                f"paths.{key} is empty (is ${env} set to an empty value?): every folder under it would "
                "start at the filesystem's root; give a folder or a URI"
            )


def check_output_dir(path: str, key: str) -> None:
    """``ValueError`` naming ``key`` when a local output folder is blank or an existing file, or a
    URI of a scheme no storage here reads."""
    if not str(path or "").strip():
        raise ValueError(f"{key} is empty: give a folder or a URI")
    check_scheme(path, key)
    if is_local(path) and os.path.exists(local_path(path)) and not os.path.isdir(local_path(path)):
        raise ValueError(f"{key}: {path} is a file; give a folder (it is made if missing)")


def check_apart(inp: str, out: str, in_key: str, out_key: str, written: tuple[str, ...] = ()) -> None:
    """``ValueError`` when the input ``inp`` (a folder, or a glob's folder; local or a URI) is the
    output folder ``out``: a rerun would read the stage's output as its input; or lies in one of the
    folders the stage writes in ``out`` (``written``: its ``parts/``, the data stage's ``shards/``),
    which a run started over deletes. An output folder inside the input folder is fine: what lies
    in it is never read (:func:`cerbero_ray.inputs.list_inputs`); so is an input file named in the
    output folder."""
    if not isinstance(inp, str) or not inp.strip() or not isinstance(out, str) or not out.strip():
        return
    folder = split_glob(inp)[0]
    if within(folder, out) and within(out, folder):
        raise ValueError(
            f"{in_key} ({inp}) reads {out_key} ({out}): a rerun would read the stage's own output as its "
            "input; give the output a folder of its own (one inside the input folder is fine: it is never read)"
        )
    for name in written:
        if within(folder, join(out, name)):
            raise ValueError(
                f"{in_key} ({inp}) lies in {out_key}'s {name}/ ({out}), which the stage writes and a run "
                "started over deletes; copy it elsewhere, or give the output a folder of its own"
            )


def check_share(value, key: str, zero_ok: bool = False) -> None:
    """``ValueError`` naming ``key`` unless ``value`` is a share of a resource Ray schedules: at least
    its smallest (0.0001; 0 too when ``zero_ok``: no GPU)."""
    from cerbero_ray.cluster import RAY_UNIT

    v = float(value)
    if not (v >= RAY_UNIT or (zero_ok and v == 0)):
        floor = f"0 or at least {RAY_UNIT:g}" if zero_ok else f"at least {RAY_UNIT:g}"
        raise ValueError(f"{key} must be {floor} (the smallest share of a resource Ray schedules), got {value}")


def check_tokenizer(tc: TokenizerConfig) -> None:
    one_of(tc.assistant_tag, ASSISTANT_TAGS, "tokenizer.assistant_tag")


def check_model(mc: ModelConfig) -> None:
    one_of(mc.dtype, MODEL_DTYPES, "model.dtype")
    if mc._target_.endswith(".from_pretrained"):
        if not mc.path:
            raise ValueError(PATH_REQUIRED)
        check_local_checkpoint(mc.path, "model.path")


def check_cluster(cc: ClusterConfig) -> None:
    if cc.num_cpus is not None and cc.num_cpus < 1:
        raise ValueError(f"cluster.num_cpus must be >= 1 or null, got {cc.num_cpus}")
    if cc.metrics_export_port is not None and not 1 <= cc.metrics_export_port <= 65535:
        raise ValueError(f"cluster.metrics_export_port must be a port (1..65535) or null, got {cc.metrics_export_port}")


def check_local_path(path: str, key: str, glob_ok: bool = False) -> None:
    """``ValueError`` naming ``key`` when a local ``path`` does not exist (URIs are not looked up:
    only their scheme is checked)."""
    if not is_local(path):
        check_scheme(path, key)
        return
    p = local_path(path)
    if glob_ok:
        p = split_glob(p)[0]
    if not os.path.exists(p):
        raise ValueError(f"{key}: no such file or folder: {path}")
