"""Model builders: named architectures with literal hyperparameters, and HF checkpoints.

``tiny`` is the test and demo model (random init, the real 32,000-token vocabulary, small
dimensions); ``mistral_7b`` is the Mistral-7B v0.1 architecture; ``from_pretrained`` loads any local
or object-store HF folder (never ``trust_remote_code``). Single-device model code only: how it is
distributed lives in the trainer.
"""

from __future__ import annotations

import importlib

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from cerbero_ray.checkpoints import PATH_REQUIRED, check_base, check_weights
from cerbero_ray.config.common import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def tiny_config(**overrides) -> MistralConfig:
    cfg = dict(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        sliding_window=None,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return MistralConfig(**{**cfg, **overrides})


def mistral_7b_config(**overrides) -> MistralConfig:
    """mistral-7b v0.1: 32 layers, 4096 hidden, 14336 FFN, 32 heads / 8 KV heads, sliding window 4096."""
    cfg = dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        sliding_window=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return MistralConfig(**{**cfg, **overrides})


def tiny(path=None, dtype: str = "float32", overrides: dict | None = None, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return MistralForCausalLM(tiny_config(**(overrides or {}))).to(_dtype(dtype))


def mistral_7b(path=None, dtype: str = "bfloat16", overrides: dict | None = None, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return MistralForCausalLM(mistral_7b_config(**(overrides or {}))).to(_dtype(dtype))


def from_pretrained(
    path: str | None = None, dtype: str = "bfloat16", overrides: dict | None = None, seed: int = 0
) -> PreTrainedModel:
    if not path:
        raise ValueError(PATH_REQUIRED)
    from cerbero_ray.storage import local_copy

    folder = local_copy(path)
    check_weights(folder, path)  # a cut-short copy is named, not a safetensors traceback
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=_dtype(dtype), trust_remote_code=False, **(overrides or {})
    )


def load_adapted(adapter: str, dtype: str, base: str | None = None, merge: bool = True):
    """The base of a LoRA ``adapter`` folder (``base``, else the one it records; its fingerprint
    checked) with the adapter applied: merged into the weights (``merge``: a plain model, as fast as
    the base) or as a ``peft.PeftModel``."""
    from peft import PeftModel

    from cerbero_ray import adapters
    from cerbero_ray.storage import local_copy

    b = adapters.base_of(adapter, base)
    folder = local_copy(b)
    check_base(adapter, b, folder, "checkpoint")
    model = from_pretrained(b, dtype=dtype)
    peft_model = PeftModel.from_pretrained(model, local_copy(adapter))
    return peft_model.merge_and_unload() if merge else peft_model


def load_for_inference(checkpoint: str, dtype: str = "auto", base: str | None = None):
    """(model in eval mode on the GPU if there is one, tokenizer) from an HF folder or URI, or a LoRA
    adapter folder (merged into its base: ``base``, else the one it records); the tokenizer must
    carry the chat template (the trainer's export does; an adapter's tokenizer, else its base's)."""
    from transformers import AutoTokenizer

    from cerbero_ray import adapters
    from cerbero_ray.logs import quiet
    from cerbero_ray.storage import is_file, join, local_copy

    quiet()  # every model actor and replica loads through here
    cuda = torch.cuda.is_available()
    name = ("bfloat16" if cuda else "float32") if dtype == "auto" else dtype
    if adapters.is_adapter(checkpoint):
        model = load_adapted(checkpoint, name, base)
        has_tok = is_file(join(checkpoint, "tokenizer_config.json"))
        tok_from = checkpoint if has_tok else adapters.base_of(checkpoint, base)
    else:
        model, tok_from = from_pretrained(checkpoint, dtype=name), checkpoint
    model = model.eval().to("cuda" if cuda else "cpu")
    tok = AutoTokenizer.from_pretrained(local_copy(tok_from))
    if not tok.chat_template:
        raise ValueError(f"{checkpoint}: the tokenizer has no chat template (export it with the trainer)")
    return model, tok


def _model_config(model_cfg: ModelConfig | dict) -> ModelConfig:
    return ModelConfig(**model_cfg) if isinstance(model_cfg, dict) else model_cfg


def build_model(model_cfg: ModelConfig | dict, seed: int = 0) -> PreTrainedModel:
    """The model named by a ``model`` config group (its schema, or a mapping of its keys)."""
    model_cfg = _model_config(model_cfg)
    module, _, name = model_cfg._target_.rpartition(".")
    builder = getattr(importlib.import_module(module), name)
    return builder(
        path=model_cfg.path,
        dtype=model_cfg.dtype,
        overrides=dict(model_cfg.overrides or {}),
        seed=seed,
    )


def build_model_config(model_cfg: ModelConfig | dict) -> PretrainedConfig:
    """The architecture a ``model`` config names, without building the weights (config-time checks)."""
    model_cfg = _model_config(model_cfg)
    target, overrides = model_cfg._target_, dict(model_cfg.overrides or {})
    if target.endswith(".tiny"):
        return tiny_config(**overrides)
    if target.endswith(".mistral_7b"):
        return mistral_7b_config(**overrides)
    if target.endswith(".from_pretrained"):
        if not model_cfg.path:
            raise ValueError(PATH_REQUIRED)
        from cerbero_ray.storage import local_copy

        return AutoConfig.from_pretrained(local_copy(model_cfg.path), **overrides)
    return build_model(model_cfg).config
