"""Config-time checks for the training stage: a ``ValueError`` naming the key, before any worker starts.

:func:`prepare_run` reads the data stage's manifest and returns the plain-dict config the workers
get, with a ``run`` section (shards, seq_len, run folder) filled in.
"""

from __future__ import annotations

from cerbero_ray import storage
from cerbero_ray.data.manifest import read_manifest
from cerbero_ray.models import build_model_config
from cerbero_ray.tokenizer import build_tokenizer, tokenizer_hash
from cerbero_ray.train.engine import SCHEDULES, ZERO_STAGES
from cerbero_ray.train.modeling import ATTENTION

PRECISIONS = ("bf16", "fp32")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def check_train_config(t: dict, ds: dict) -> None:
    positive = ("num_workers", "micro_batch_size", "global_batch_size", "epochs", "log_every", "keep_checkpoints",
                "loss_chunk_tokens")
    for k in positive:
        if int(t[k]) < 1:
            raise ValueError(f"train.{k} must be >= 1, got {t[k]}")
    for k in ("eval_rows", "eval_every", "checkpoint_every", "max_failures"):
        if int(t[k]) < 0:
            raise ValueError(f"train.{k} must be >= 0, got {t[k]}")
    per_step = t["micro_batch_size"] * t["num_workers"]
    if t["global_batch_size"] % per_step:
        raise ValueError(f"train.global_batch_size={t['global_batch_size']} must be a multiple of "
                         f"train.micro_batch_size × train.num_workers = {per_step}")
    for key, allowed in (("precision", PRECISIONS), ("attention", ATTENTION), ("schedule", tuple(SCHEDULES)),
                         ("placement_strategy", PLACEMENTS)):
        if t[key] not in allowed:
            raise ValueError(f"train.{key} must be one of {allowed}, got {t[key]!r}")
    if ds["stage"] not in ZERO_STAGES:
        raise ValueError(f"deepspeed.stage must be one of {ZERO_STAGES} (the recipe is ZeRO-1; stage 3 shards "
                         f"the weights, which this trainer's checkpoint export does not gather), got {ds['stage']}")
    if not 0 <= t["min_lr_ratio"] <= 1 or t["lr"] <= 0:
        raise ValueError("train.lr must be > 0 and train.min_lr_ratio in [0, 1]")
    if t.get("max_steps") is not None and t["max_steps"] < 1:
        raise ValueError(f"train.max_steps must be >= 1 or null, got {t['max_steps']}")


def prepare_run(c: dict) -> dict:
    """Validate ``c`` (the resolved config) against the shards and the model; returns the workers' config."""
    t = c["train"]
    check_train_config(t, c["deepspeed"])
    try:
        manifest = read_manifest(t["data_dir"])
    except FileNotFoundError:
        raise ValueError(f"train.data_dir: no manifest.json in {t['data_dir']} (run prepare_data first, "
                         "or point train.data_dir at its data.output_dir)") from None
    seq_len = int(manifest["seq_len"])
    if t.get("seq_len") is not None and int(t["seq_len"]) != seq_len:
        raise ValueError(f"train.seq_len={t['seq_len']} but the shards in {t['data_dir']} are {seq_len} tokens "
                         "long; rerun prepare_data with that data.seq_len, or drop train.seq_len")
    tc = c["tokenizer"]
    tok = build_tokenizer(tc.get("path"), tc["assistant_tag"], tc["system_line"])
    if manifest["tokenizer_hash"] != tokenizer_hash(tok):
        raise ValueError(f"tokenizer: the shards were made with another tokenizer or chat template "
                         f"({manifest['tokenizer_hash']} vs {tokenizer_hash(tok)}); use the data stage's tokenizer config")
    mc = build_model_config(c["model"])
    if len(tok) > mc.vocab_size:
        raise ValueError(f"model: vocab_size {mc.vocab_size} is smaller than the tokenizer's {len(tok)} tokens "
                         "(model.overrides.vocab_size)")
    if seq_len > mc.max_position_embeddings:
        raise ValueError(f"model: max_position_embeddings {mc.max_position_embeddings} < the shards' seq_len {seq_len}")
    shards = [{"path": s["path"], "rows": int(s["rows"])} for s in manifest["shards"]]
    rows = sum(s["rows"] for s in shards)
    need = t["global_batch_size"] + t["eval_rows"]
    if rows < need:
        raise ValueError(f"train.global_batch_size + train.eval_rows = {need} rows, but {t['data_dir']} holds {rows}; "
                         "lower them or prepare more data (a shorter data.seq_len gives more rows)")
    run_dir = storage.join(t["output_dir"], t["name"])
    return {**c, "run": {"shards": shards, "seq_len": seq_len, "run_dir": run_dir, "rows": rows}}
