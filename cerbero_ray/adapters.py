"""LoRA adapters: what an adapter folder holds, which base it belongs to, and its weights as plain
tensors. Imports neither torch nor peft at module level (the config checks use it).

    <run>/adapter/
      adapter_config.json        peft's: r, lora_alpha, target_modules, base_model_name_or_path
      adapter_model.safetensors  peft's lora_A / lora_B weights (and modules trained in full)
      cerbero_base.json          the base's identity: path, model_type, fingerprint
      tokenizer files            the run's tokenizer with the chat template

``peft.PeftModel.from_pretrained(base, "<run>/adapter")`` loads it. Every stage that takes a
checkpoint takes an adapter folder too: the base comes from ``cerbero_base.json`` (else peft's
``base_model_name_or_path``), or is given; a base whose fingerprint differs from the recorded one
is refused (an adapter applied to another model is a silently wrong model).

The fingerprint is a SHA-256 over the base's ``config.json`` and each safetensors file's name, size,
header (tensor names, shapes, dtypes, offsets) and 16 samples of 64 KiB of its bytes spread over the
file: about 1 MiB read per file however large, and any other weights (another seed, another
fine-tune of the same architecture) differ in every sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from cerbero_ray import storage

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_RECORD = "cerbero_base.json"
SAMPLES, SAMPLE_BYTES = 16, 1 << 16  # the fingerprint's reads of each weight file
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}$")  # a served adapter's name (a request's `model`)


def is_adapter(path: str) -> bool:
    """Whether ``path`` (a folder or URI) is a peft adapter folder."""
    return storage.is_file(storage.join(path, ADAPTER_CONFIG))


def adapter_config(path: str) -> dict:
    return storage.read_json(storage.join(path, ADAPTER_CONFIG))


def fingerprint(folder: str) -> str:
    """The identity of a local HF model folder (see the module docstring)."""
    h = hashlib.sha256()
    with open(os.path.join(folder, "config.json"), "rb") as f:
        cfg = json.load(f)
    for k in ("_name_or_path", "transformers_version", "use_cache", "dtype", "torch_dtype"):
        cfg.pop(k, None)  # how it was saved, not what it is
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")):
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(f"{name}:{size}:".encode() + f.read(min(n, 1 << 28)))
            for i in range(SAMPLES):
                f.seek(size * i // SAMPLES)
                h.update(f.read(SAMPLE_BYTES))
    return "sha256:" + h.hexdigest()[:32]


def write_record(adapter_dir: str, record: dict) -> None:
    """Write ``cerbero_base.json`` (``{"base", "model_type", "fingerprint"}``) into a local adapter
    folder, and the base into peft's ``base_model_name_or_path``."""
    with open(os.path.join(adapter_dir, BASE_RECORD), "w") as f:
        json.dump(record, f, indent=2)
    cfg_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = record["base"]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def read_record(path: str) -> dict:
    """The adapter's base record (``{}`` for a peft adapter made elsewhere)."""
    p = storage.join(path, BASE_RECORD)
    return storage.read_json(p) if storage.is_file(p) else {}


def base_of(adapter: str, base: str | None = None, key: str = "checkpoint") -> str:
    """The base checkpoint of ``adapter``: ``base`` when given, else its record, else peft's
    ``base_model_name_or_path`` when that is a folder or URI that holds a model."""
    if base:
        return base
    recorded = read_record(adapter).get("base") or adapter_config(adapter).get("base_model_name_or_path")
    if not recorded:
        raise ValueError(f"{key}: the adapter at {adapter} records no base model; give its base checkpoint")
    if not storage.is_file(storage.join(recorded, "config.json")):
        raise ValueError(
            f"{key}: the adapter at {adapter} was trained on {recorded}, which holds no HF model here "
            "(a hub id, or a folder on another machine); give its base checkpoint"
        )
    return recorded


def lora_scale(cfg: dict) -> float:
    """The factor peft multiplies ``B @ A`` by."""
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return alpha / r**0.5 if cfg.get("use_rslora") else alpha / r


def unsupported(cfg: dict) -> str | None:
    """Why an adapter cannot be applied as plain ``x @ A.T @ B.T × scale`` (served in a mixed batch,
    written as a llama.cpp LoRA), or None."""
    if cfg.get("use_dora"):
        return "a DoRA adapter (use_dora)"
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        return "per-module ranks or alphas (rank_pattern/alpha_pattern)"
    if cfg.get("modules_to_save"):
        return f"modules trained in full ({cfg['modules_to_save']}): serve or export it merged"
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        return "trained biases"
    return None


def read_lora(folder: str) -> tuple[dict, dict]:
    """(adapter_config, ``{module name: (A [r, in], B [out, r])}``) from a local adapter folder, as
    float32 torch tensors; module names as in the base model (``model.layers.0.self_attn.q_proj``)."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, ADAPTER_CONFIG)) as f:
        cfg = json.load(f)
    tensors = load_file(os.path.join(folder, ADAPTER_WEIGHTS))
    pairs: dict[str, dict] = {}
    for name, t in tensors.items():
        for part in ("lora_A", "lora_B"):
            tag = f".{part}."
            if tag in name:
                module = name.split(tag)[0].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[part] = t.float()
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{folder}: {module} has {sorted(ab)} but not both lora_A and lora_B")
        out[module] = (ab["lora_A"], ab["lora_B"])
    if not out:
        raise ValueError(f"{folder}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return cfg, out
