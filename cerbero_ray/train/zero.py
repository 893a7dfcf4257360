"""The training engine: model, optimizer, schedule and the DeepSpeed JSON, from plain config values.

``train.strategy=deepspeed`` (the recipe's default): the optimizer is ``torch.optim.AdamW`` (fused
on CUDA; DeepSpeed's own fused/CPU Adam needs build steps and is not needed with ZeRO-1) and the
schedule a ``LambdaLR`` over transformers' formulas (written here: importing transformers' schedulers
imports peft and bitsandbytes, ~3 s in every worker); DeepSpeed owns gradient accumulation,
clipping, the bf16 master weights and the ZeRO sharding. ``train.strategy=torch``: the same model,
optimizer and schedule in plain PyTorch (:mod:`cerbero_ray.train.native`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from cerbero_ray.config.train import SCHEDULES, DeepSpeedConfig, TrainConfig, TrainStageConfig, accumulation_steps
from cerbero_ray.logs import drop_lines
from cerbero_ray.models import build_model
from cerbero_ray.train.modeling import PackedCausalLM, apply_liger, pick_attention, triton_runs


def deepspeed_config(ds: DeepSpeedConfig, t: TrainConfig, world_size: int) -> dict:
    """DeepSpeed's JSON from the ``deepspeed`` and ``train`` config groups."""
    accum = accumulation_steps(t, world_size)
    cfg = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.global_batch_size,
        "gradient_clipping": t.max_grad_norm,
        # LoRA: fp32 adapters on a frozen bf16 base under autocast; DeepSpeed's bf16 mode would cast them
        "bf16": {"enabled": t.precision == "bf16" and t.method == "full"},
        # fp32 master weights are the optimizer's; gradients get the same: accumulated over the
        # micro-batches and reduced across ranks in fp32, not in the model's bf16
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
        "zero_optimization": {
            "stage": ds.stage,
            "overlap_comm": ds.overlap_comm,
            "contiguous_gradients": ds.contiguous_gradients,
            "reduce_bucket_size": ds.reduce_bucket_size,
            "allgather_bucket_size": ds.allgather_bucket_size,
        },
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    return _merge(cfg, ds.extra or {})


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def warmup_steps(t: TrainConfig, total_steps: int) -> int:
    return int(t.warmup_steps) if t.warmup_steps is not None else int(t.warmup_ratio * total_steps)


def param_groups(model: torch.nn.Module, t: TrainConfig) -> list[dict]:
    """The trainable parameters; no weight decay on norms and biases (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # LoRA has no 1-D trainable parameters; ZeRO drops empty groups


def build_optimizer(model: torch.nn.Module, t: TrainConfig, cuda: bool, shard: bool = False) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; ``shard``: its states split across the ranks (ZeRO-1 by
    torch's ``ZeroRedundancyOptimizer``: each rank steps its share and broadcasts it)."""
    kw = dict(lr=learning_rate(t), betas=tuple(t.betas), eps=t.eps, fused=cuda or None)
    if shard:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(
            param_groups(model, t), optimizer_class=torch.optim.AdamW, parameters_as_bucket_view=True, **kw
        )
    return torch.optim.AdamW(param_groups(model, t), **kw)


def learning_rate(t: TrainConfig) -> float:
    """The peak learning rate: ``train.lora.lr`` for a LoRA run when set (adapters usually take a
    rate ~10× a full fine-tune's), else ``train.lr``."""
    return t.lora.lr if t.method == "lora" and t.lora.lr is not None else t.lr


def lr_factor(step: int, *, schedule: str, warmup: int, total: int, min_ratio: float) -> float:
    """The learning rate at optimizer step ``step`` as a share of the peak: linear warmup from 0 over
    ``warmup`` steps, then constant, linear to 0 at ``total``, or a half cosine down to ``min_ratio``
    at ``total`` (transformers' ``constant_with_warmup``, ``linear`` and ``cosine_with_min_lr``)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, cosine * (1 - min_ratio) + min_ratio)


def build_scheduler(opt: torch.optim.Optimizer, t: TrainConfig, total_steps: int) -> LambdaLR:
    if t.schedule not in SCHEDULES:
        raise ValueError(f"train.schedule must be one of {list(SCHEDULES)}, got {t.schedule!r}")
    warmup = warmup_steps(t, total_steps)
    fn = partial(lr_factor, schedule=t.schedule, warmup=warmup, total=max(total_steps, 1), min_ratio=t.min_lr_ratio)
    return LambdaLR(opt, fn)


def decoder_layers(lm) -> torch.nn.ModuleList:
    """The decoder layers of an HF causal LM (``model.layers``; a peft model's too: it injects in place)."""
    inner = getattr(lm, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"train.compile=layers: {type(lm).__name__} has no model.layers to compile")
    return layers


def compile_layers(lm, checkpointing: bool) -> int:
    """``torch.compile`` each decoder layer's forward (regional compilation, as torchtitan: layers of
    one shape share one graph, compiled once, in the first step). With activation checkpointing,
    our own non-reentrant checkpoint goes around each compiled forward: transformers' checkpointing
    wraps the layer's call from inside, where dynamo breaks the graph on its context variable (so
    nothing would be compiled). Parameters and state-dict keys are untouched."""
    import functools

    from torch.utils.checkpoint import checkpoint

    layers = decoder_layers(lm)
    for layer in layers:
        fwd = torch.compile(layer.forward)
        layer.forward = functools.partial(checkpoint, fwd, use_reentrant=False) if checkpointing else fwd
    return len(layers)


def build_packed(config: TrainStageConfig, device: torch.device, on_base=None, autocast: bool = False):
    """(:class:`PackedCausalLM` on ``device``, the HF model inside, the peft model around it or
    None). ``train.method=lora``: ``on_base(lm)`` sees the frozen base before the adapters are
    applied (rank 0 records it, :mod:`cerbero_ray.train.lora`). A full fine-tune's weights are fp32."""
    t = config.train
    cuda = device.type == "cuda"
    lora = t.method == "lora"
    peft_model = None
    if lora:
        from cerbero_ray.train.lora import apply_lora, build_base

        lm = build_base(config.model, t, cuda, t.seed)
        lm.requires_grad_(False)
        if on_base is not None:
            on_base(lm)
    else:
        # DeepSpeed casts to bf16 and keeps fp32 masters; train.strategy=torch keeps fp32 under autocast
        lm = build_model(replace(config.model, dtype="float32"), seed=t.seed)
    lm.config._attn_implementation = pick_attention(t.attention, cuda, t.micro_batch_size)
    lm.config.use_cache = False
    liger = t.kernels == "liger" and triton_runs(device)
    if t.kernels == "liger" and not liger:
        warnings.warn(
            "train.kernels=liger: Liger's Triton kernels need CUDA (or Triton's interpreter, TRITON_INTERPRET=1); "
            "the plain path runs on CPU",
            stacklevel=2,
        )
    if liger:  # on the base, before any adapter wraps its projections
        apply_liger(lm)
    if t.gradient_checkpointing and t.compile == "none":  # transformers >= 5.2x renamed it; the GPU images may be older
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        peft_model = apply_lora(lm, t.lora, t.seed, autocast)
    if t.compile == "layers":
        compile_layers(lm, t.gradient_checkpointing)
    lm.train()
    model = PackedCausalLM(lm, t.loss_chunk_tokens, autocast=autocast, fused_loss=liger)
    return model.to(device), lm, peft_model


def build_engine(config: TrainStageConfig, total_steps: int, device: torch.device, world_size: int, on_base=None):
    """(engine, scheduler, the HF model inside, the peft model or None) for ``train.strategy``."""
    if config.train.strategy == "torch":
        return build_torch(config, total_steps, device, world_size, on_base)
    return build_deepspeed(config, total_steps, device, world_size, on_base)


def build_torch(config: TrainStageConfig, total_steps: int, device: torch.device, world_size: int, on_base=None):
    """:func:`build_engine` for ``train.strategy=torch`` (:class:`~cerbero_ray.train.native.TorchEngine`)."""
    from cerbero_ray.train.native import TorchEngine

    t = config.train
    model, lm, peft_model = build_packed(config, device, on_base, autocast=t.precision == "bf16")
    opt = build_optimizer(model, t, device.type == "cuda", shard=config.deepspeed.stage >= 1 and world_size > 1)
    sched = build_scheduler(opt, t, total_steps)
    engine = TorchEngine(model, opt, sched, accumulation_steps(t, world_size), t.max_grad_norm, device)
    return engine, sched, lm, peft_model


def build_deepspeed(config: TrainStageConfig, total_steps: int, device: torch.device, world_size: int, on_base=None):
    """(DeepSpeed engine wrapping :class:`PackedCausalLM`, scheduler, the HF model inside, the peft
    model around it or None); ``on_base``: as :func:`build_packed`."""
    import deepspeed

    t = config.train
    cuda = device.type == "cuda"
    model, lm, peft_model = build_packed(
        config, device, on_base, autocast=t.method == "lora" and cuda and t.precision == "bf16"
    )
    opt = build_optimizer(model, t, cuda)
    sched = build_scheduler(opt, t, total_steps)
    with drop_lines(r"^DeepSpeed \S+ built successfully$"):  # its CPU comm op, printed once per worker
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=opt,
            lr_scheduler=sched,
            config=deepspeed_config(config.deepspeed, t, world_size),
            dist_init_required=False,
        )
    return engine, sched, lm, peft_model
