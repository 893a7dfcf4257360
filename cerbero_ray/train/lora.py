"""``train.method=lora``: low-rank adapters (peft) on a frozen base, in the same loop, the same
DeepSpeed ZeRO-1 engine and the same checkpoints as a full fine-tune.

- The base is built as for a full fine-tune and frozen: bf16 on GPU under ``precision=bf16`` (fp32
  on CPU), or 4-bit NF4 through bitsandbytes with ``train.lora.qlora`` (CUDA; on CPU its slow torch
  fallback, for tests). The adapter weights (and modules trained in full,
  ``train.lora.train_in_full``) are fp32, and so are their AdamW
  states: DeepSpeed runs without its bf16 mode (which would cast them), and on GPU the forward runs
  under ``torch.autocast(bfloat16)``.
- DeepSpeed checkpoints leave the frozen base out (``exclude_frozen_parameters``); a resumed worker
  rebuilds the same base (the same path, or the same seed) and loads the adapter and its optimizer
  state: resume is exact.
- Outputs (rank 0): ``<run>/adapter`` (:mod:`cerbero_ray.adapters`: peft's folder, the tokenizer,
  the base's identity); ``<run>/base`` when the base has no checkpoint of its own (a random-init
  builder: the demo and tests), so the adapter always names a base it can be loaded with;
  ``<run>/hf`` merged when ``train.lora.merge``.
"""

from __future__ import annotations

import os
import tempfile
import types
from dataclasses import replace

import torch

from cerbero_ray import adapters, storage
from cerbero_ray.cards import write_card
from cerbero_ray.config.common import ModelConfig
from cerbero_ray.config.train import LoraConfig, TrainConfig, check_bitsandbytes

BASE_DIR, ADAPTER_DIR = "base", "adapter"


def base_dtype(t: TrainConfig, cuda: bool) -> str:
    """The frozen base's dtype: bf16 on GPU under ``precision=bf16``, else fp32."""
    return "bfloat16" if cuda and t.precision == "bf16" else "float32"


def build_base(model_cfg: ModelConfig, t: TrainConfig, cuda: bool, seed: int):
    """The base as a full fine-tune builds it, in :func:`base_dtype`, or 4-bit with QLoRA."""
    from cerbero_ray.models import build_model, from_pretrained

    if not t.lora.qlora:
        return build_model(replace(model_cfg, dtype=base_dtype(t, cuda)), seed=seed)
    check_bitsandbytes(cuda)  # and model=hf: check_train
    from transformers import BitsAndBytesConfig

    # the 4-bit weights are unpacked to the compute dtype in each product: bf16 on GPU; on CPU
    # bitsandbytes' torch fallback (slow: tests and small runs) computes in fp32, as LoRA does there
    compute = torch.bfloat16 if cuda else torch.float32
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    overrides = {
        **(model_cfg.overrides or {}),
        "quantization_config": q,
        "device_map": {"": torch.cuda.current_device() if cuda else "cpu"},
    }
    return from_pretrained(model_cfg.path, dtype=str(compute).removeprefix("torch."), overrides=overrides)


def apply_lora(lm, lc: LoraConfig, seed: int, autocast: bool = False):
    """The peft model around ``lm`` (changed in place: its targeted linears gain adapters); the base
    frozen, the trainable weights fp32. The adapter's initial weights follow ``seed``. Under bf16
    ``autocast`` each adapter reads its input as it comes: peft would first copy every adapted
    linear's input to fp32 (its A's dtype), a full-size pass over the activations per projection
    that autocast then casts back to bf16 for the product (the same numbers, twice the traffic)."""
    from peft import LoraConfig, get_peft_model

    if lc.qlora:
        from peft import prepare_model_for_kbit_training

        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)  # ours is set by the caller
    cfg = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=list(lc.target_modules),
        modules_to_save=list(lc.train_in_full) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    pm = get_peft_model(lm, cfg)
    for p in pm.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if autocast:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in pm.modules():
            if isinstance(m, BaseTunerLayer):
                m.cast_input_dtype_enabled = False
            if _plain_lora_linear(m):
                m.forward = types.MethodType(_fused_forward, m)
    return pm


def _plain_lora_linear(m) -> bool:
    """A peft LoRA linear with one plain adapter (no DoRA or other variant) on an ``nn.Linear``."""
    from peft.tuners.lora.layer import Linear

    return (
        type(m) is Linear
        and type(m.base_layer) is torch.nn.Linear
        and list(m.lora_A) == ["default"]
        and not getattr(m, "lora_variant", None)
        and not m.use_dora.get("default", False)
    )


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA forward (``base(x) + scaling · B(A(dropout(x)))``) with the scaled update added
    in the second product's epilogue (``addmm``): one pass writes the output, where peft's
    ``* scaling`` and ``+`` make two more over it. Training under bf16 autocast only."""
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters or self.merged:
        return result
    h = self.lora_A["default"](self.lora_dropout["default"](x))
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        h.reshape(-1, h.shape[-1]),
        self.lora_B["default"].weight.t(),
        alpha=self.scaling["default"],
    )
    return out.view(result.shape)


def counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters); a 4-bit weight (QLoRA) counts as the matrix it
    stands for, not its packed bytes."""

    def n(p) -> int:
        qs = getattr(p, "quant_state", None)
        return qs.shape.numel() if qs is not None else p.numel()

    trainable = sum(n(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(n(p) for p in model.parameters())


def save_base(lm, tokenizer, run_dir: str) -> dict:
    """Rank 0, before the adapters are applied: the base's identity record; a random-init base is
    first written to ``<run>/base`` (kept when a resumed run finds it)."""
    from cerbero_ray.train.checkpoint import save_hf, save_hf_to

    dest = storage.join(run_dir, BASE_DIR)
    if storage.is_file(storage.join(dest, "config.json")) and storage.is_file(storage.join(dest, storage.COMPLETE)):
        return record_of(dest)
    if storage.is_uri(dest):
        with tempfile.TemporaryDirectory() as tmp:
            save_hf(lm, tokenizer, tmp)
            record = make_record(dest, tmp)
            storage.upload_folder(tmp, dest)
        return record
    save_hf_to(lm, tokenizer, dest)
    return make_record(dest, storage.resolve(dest)[1])


def record_of(base: str) -> dict:
    """The identity record of a base checkpoint (a folder or URI)."""
    return make_record(base, storage.local_copy(base))


def make_record(base: str, folder: str) -> dict:
    import json

    with open(os.path.join(folder, "config.json")) as f:
        kind = json.load(f).get("model_type")
    return {"base": base, "model_type": kind, "fingerprint": adapters.fingerprint(folder)}


def save_adapter(peft_model, tokenizer, record: dict, directory: str, card: str | None = None) -> None:
    """An adapter folder: peft's files, the tokenizer, the base record, our model ``card`` (in place
    of peft's template, when given); its complete marker last.

    ``save_embedding_layers=False``: with ``lm_head`` among the targets peft would otherwise copy the
    frozen base head (vocab x hidden, 262 MB for Mistral-7B in bf16) into every adapter; the base
    holds it already. Columns trained in full go through ``modules_to_save`` and are saved anyway."""
    peft_model.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False)
    if tokenizer is not None:
        from cerbero_ray.tokenizer import save_tokenizer

        save_tokenizer(tokenizer, directory)
    adapters.write_record(directory, record)
    write_card(directory, card)
    storage.mark_complete(directory)
