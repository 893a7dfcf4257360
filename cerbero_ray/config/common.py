"""Schemas every stage shares (cluster, paths, tokenizer, model) and small check helpers."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from omegaconf import MISSING

from cerbero_ray.chat import ASSISTANT_TAGS, SYSTEM_LINE

INFERENCE_DTYPES = ("auto", "bfloat16", "float32", "float16")  # auto: bfloat16 on GPU, float32 on CPU
MODEL_DTYPES = ("float32", "bfloat16", "float16")
ENGINES = ("continuous", "hf")  # what serve.engine and generate.engine choose between


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: embedded local cluster (or the job's cluster under `ray job submit`)
    num_cpus: Optional[int] = None  # embedded cluster only; None = all cores
    dashboard: bool = False  # embedded cluster only
    dashboard_host: str = "127.0.0.1"
    namespace: str = "cerbero"
    object_store_memory_gb: Optional[float] = None
    progress_bars: bool = False  # Ray Data's own per-operator bars (ours are always on)


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


def at_least(section: dict, keys, low: float, prefix: str) -> None:
    for k in keys:
        if section[k] is not None and section[k] < low:
            raise ValueError(f"{prefix}.{k} must be >= {low}, got {section[k]}")


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def local_path(path: str) -> str:
    return os.path.expanduser(path.removeprefix("file://"))


def check_local_checkpoint(path: str, key: str) -> None:
    """``ValueError`` naming ``key`` when a local ``path`` holds no HF model, or its weights are
    missing or cut short (an object-store checkpoint is looked at when the stage has copied it:
    :func:`cerbero_ray.models.from_pretrained`)."""
    if not is_local(path):
        return
    if not os.path.isfile(os.path.join(local_path(path), "config.json")):
        raise ValueError(f"{key}: no HF model at {path} (train first, or point it at an HF folder)")
    from cerbero_ray.storage import check_folder

    check_folder(local_path(path), key)  # a copy cut short (its marker says so), before the weights
    check_weights(local_path(path), key)


def check_weights(folder: str, key: str) -> None:
    """``ValueError`` naming ``key`` when an HF folder's weights are missing, a shard its index
    names is absent, or a safetensors file is cut short or corrupt (an interrupted copy or
    download). Only each file's header and size are read, not the weights."""
    names = set(os.listdir(folder))
    if "model.safetensors.index.json" in names:
        try:
            with open(os.path.join(folder, "model.safetensors.index.json")) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{key}: {folder}/model.safetensors.index.json is not a weight index ({e})") from None
        missing = [s for s in shards if s not in names]
        if missing:
            raise ValueError(
                f"{key}: {folder} lacks {len(missing)} of the {len(shards)} shards its index names: {missing[:3]}"
            )
    elif "model.safetensors" in names:
        shards = ["model.safetensors"]
    elif any(n.startswith("pytorch_model") and n.endswith((".bin", ".bin.index.json")) for n in names):
        return  # legacy pickles: transformers reads them (not checked here)
    else:
        raise ValueError(f"{key}: {folder} has config.json but no weights (model.safetensors or its shards)")
    for shard in shards:
        problem = _safetensors_problem(os.path.join(folder, shard))
        if problem:
            raise ValueError(f"{key}: {folder}/{shard} {problem}; copy or export it again")


def _safetensors_problem(path: str) -> str | None:
    """Why ``path`` is not a whole safetensors file (8-byte header length, JSON header, then the
    tensors' bytes up to the largest end offset, and nothing after), or None."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > 1 << 28:
            return f"is not a safetensors file ({size:,} bytes; header length {n:,})"
        if n > size - 8:
            return f"is cut short: {size:,} bytes, less than its own header ({n + 8:,})"
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "has a corrupt header"
    want = 8 + n + end
    if size < want:
        return f"is cut short: {size:,} of {want:,} bytes"
    if size > want:
        return f"has {size - want:,} bytes past its tensors (not a safetensors file as written)"
    return None


def check_output_dir(path: str, key: str) -> None:
    """``ValueError`` naming ``key`` when a local output folder is an existing file."""
    if is_local(path) and os.path.exists(local_path(path)) and not os.path.isdir(local_path(path)):
        raise ValueError(f"{key}: {path} is a file; give a folder (it is made if missing)")


def check_tokenizer(tc: dict) -> None:
    one_of(tc["assistant_tag"], ASSISTANT_TAGS, "tokenizer.assistant_tag")


def check_model(mc: dict) -> None:
    one_of(mc.get("dtype", "float32"), MODEL_DTYPES, "model.dtype")
    if mc["_target_"].endswith(".from_pretrained"):
        if not mc.get("path"):
            raise ValueError("model.path is required for model=hf (a local folder or an s3:// URI)")
        check_local_checkpoint(mc["path"], "model.path")


def check_cluster(cc: dict) -> None:
    if cc.get("num_cpus") is not None and cc["num_cpus"] < 1:
        raise ValueError(f"cluster.num_cpus must be >= 1 or null, got {cc['num_cpus']}")


def check_local_path(path: str, key: str, glob_ok: bool = False) -> None:
    """``ValueError`` naming ``key`` when a local ``path`` does not exist (URIs are not looked up)."""
    if not is_local(path):
        return
    p = local_path(path)
    if glob_ok and any(c in os.path.basename(p) for c in "*?["):
        p = os.path.dirname(p) or "."
    if not os.path.exists(p):
        raise ValueError(f"{key}: no such file or folder: {path}")
