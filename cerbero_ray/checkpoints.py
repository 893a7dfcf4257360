"""HF checkpoints: is this a model folder, whole, of an architecture our engine runs. One place for
every such check, used when a config is composed (local folders, before Ray starts) and when a
stage loads a checkpoint (object-store folders, once copied). Imports neither torch nor
transformers: only file headers and ``config.json`` are read.
"""

from __future__ import annotations

import json
import os
import struct

from cerbero_ray import adapters, storage
from cerbero_ray.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, fingerprint, read_record
from cerbero_ray.storage import is_local, local_path

CONTINUOUS_ARCHITECTURES = ("mistral", "llama")  # what the continuous-batching engine runs
PATH_REQUIRED = "model.path is required for model=hf (a local folder or an s3:// URI)"


def check_checkpoint(path: str, key: str, base: str | None = None) -> None:
    """``ValueError`` naming ``key`` when ``path`` (a folder or URI) holds no HF model, or a copy of
    it that was cut short (its folder marker says so). A LoRA adapter folder is a checkpoint too:
    the adapter and its base (``base``, else the one it records) are checked."""
    if adapters.is_adapter(path):
        check_adapter(path, key)
        b = adapters.base_of(path, base, key)
        if adapters.is_adapter(b):
            raise ValueError(f"{key}: the base of the adapter at {path} is another adapter ({b})")
        check_checkpoint(b, f"{key} (the adapter's base)")
        return
    if not storage.is_file(storage.join(path, "config.json")):
        raise ValueError(f"{key}: no HF model at {path} (train first, or point it at an HF folder)")
    storage.check_folder(path, key)


def check_adapter(path: str, key: str) -> None:
    """``ValueError`` naming ``key`` unless ``path`` is a whole LoRA adapter folder."""
    storage.check_folder(path, key)
    try:
        cfg = adapter_config(path)
    except ValueError as e:
        raise ValueError(f"{key}: {path}/{ADAPTER_CONFIG} is not JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{key}: {path} is a {cfg.get('peft_type')!r} adapter; LoRA adapters only")
    if not storage.is_file(storage.join(path, ADAPTER_WEIGHTS)):
        raise ValueError(f"{key}: {path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    if is_local(path):
        problem = _safetensors_problem(os.path.join(local_path(path), ADAPTER_WEIGHTS))
        if problem:
            raise ValueError(f"{key}: {path}/{ADAPTER_WEIGHTS} {problem}")


def check_base(adapter: str, base: str, base_folder: str, key: str) -> None:
    """``ValueError`` when the base at ``base_folder`` (a local copy of ``base``) is not the model
    the adapter was trained on (its recorded fingerprint)."""
    want = read_record(adapter).get("fingerprint")
    if want and fingerprint(base_folder) != want:
        raise ValueError(
            f"{key}: {base} is not the base the adapter at {adapter} was trained on (fingerprint "
            f"{fingerprint(base_folder)}, recorded {want}); give the base it was trained on"
        )


def check_served_adapter(path: str, key: str) -> None:
    """``ValueError`` naming ``key`` (``serve.adapters.<name>``) unless ``path`` is a whole LoRA
    adapter folder that a mixed batch can serve (no DoRA, per-module ranks, trained biases...)."""
    if not adapters.is_adapter(path):
        raise ValueError(f"{key}: no LoRA adapter at {path} (adapter_config.json; a train run's adapter/)")
    check_adapter(path, key)
    why = adapters.unsupported(adapter_config(path))
    if why:
        raise ValueError(f"{key}: cannot be served in a mixed batch: {why}")


def check_local_checkpoint(path: str, key: str, base: str | None = None) -> None:
    """At compose time: :func:`check_checkpoint` and :func:`check_weights` for a local ``path``
    (an object-store checkpoint is looked at when the stage has copied it)."""
    if not is_local(path):
        storage.check_scheme(path, key)
        return
    if adapters.is_adapter(local_path(path)):
        check_adapter(local_path(path), key)
        check_local_checkpoint(adapters.base_of(local_path(path), base, key), f"{key} (the adapter's base)")
        return
    check_checkpoint(local_path(path), key)
    check_weights(local_path(path), key)


def model_type(path: str, base: str | None = None) -> str | None:
    """The ``model_type`` an HF folder or URI's config.json declares (an adapter's: its base's)."""
    if adapters.is_adapter(path):
        return adapters.read_record(path).get("model_type") or model_type(adapters.base_of(path, base))
    return storage.read_json(storage.join(path, "config.json")).get("model_type")


def vocab_size(path: str, base: str | None = None) -> int | None:
    """The ``vocab_size`` an HF folder or URI's config.json declares (an adapter's: its base's)."""
    if adapters.is_adapter(path):
        path = adapters.base_of(path, base)
    return storage.read_json(storage.join(path, "config.json")).get("vocab_size")


def check_inference(checkpoint: str, engine: str, stage: str, base: str | None = None) -> None:
    """What a stage that generates with ``checkpoint`` checks once it can read it: a whole HF model
    or adapter (``<stage>.checkpoint``; ``base``: an adapter's) of an architecture the engine runs
    (``<stage>.engine``)."""
    check_checkpoint(checkpoint, f"{stage}.checkpoint", base)
    check_engine(engine, f"{stage}.engine", checkpoint, base)


def check_engine(engine: str, key: str, checkpoint: str, base: str | None = None) -> None:
    """``ValueError`` naming ``key`` (``serve.engine``, ``generate.engine``) when the continuous
    engine is asked to run a checkpoint whose architecture it does not support (reads its config)."""
    if engine == "continuous":
        kind = model_type(checkpoint, base)
        if kind not in CONTINUOUS_ARCHITECTURES:
            raise ValueError(
                f"{key}=continuous runs {CONTINUOUS_ARCHITECTURES} models; {checkpoint} is {kind!r} (use {key}=hf)"
            )


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
