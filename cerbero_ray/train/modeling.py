"""The model as the trainer runs it: document-masked attention and a loss that never builds the full
logits tensor.

Attention. A packed row holds several documents; ``position_ids`` restart at 0 at each one. With
no ``attention_mask`` and no cache, transformers turns those restarts into a block-diagonal causal
mask (and, where the model has a sliding window, a per-document window), for ``sdpa``, ``eager`` and
``flex_attention``; ``flash_attention_2`` reads them as varlen ``cu_seqlens``. :func:`pick_attention`
chooses: flash-attention where installed on CUDA, else flex_attention on CUDA, else SDPA (CPU).

Loss. :class:`PackedCausalLM` returns the *sum* of token losses and the count of loss tokens, so the
loop can divide by the count over the whole global batch (every micro-batch on every rank), the
token-weighted mean. It projects only the positions that carry a label (chat data trains on the
assistant turns only), in chunks, each recomputed in backward: at seq 8192 × vocab 32000 the full
fp32 logits would be 1 GiB per row.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cerbero_ray.config.train import ATTENTION
from cerbero_ray.shards import IGNORE_INDEX


def pick_attention(name: str, cuda: bool, micro_batch: int = 1) -> str:
    """The attention implementation for ``train.attention``. transformers reads packed rows'
    document boundaries from ``position_ids`` on the flash-attention path only for a batch of one
    row, so with ``micro_batch > 1`` flash-attention is refused, and ``auto`` picks flex_attention."""
    if name not in ATTENTION:
        raise ValueError(f"train.attention must be one of {ATTENTION}, got {name!r}")
    if name == "flash_attention_2" and micro_batch > 1:
        raise ValueError(
            "train.attention=flash_attention_2 needs train.micro_batch_size=1: with more rows, "
            "documents of a packed row would attend to each other"
        )
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if name == "flash_attention_2" and not (cuda and has_flash):
        raise ValueError("train.attention=flash_attention_2 needs CUDA and the flash-attn package")
    if name == "flex_attention" and not cuda:
        raise ValueError("train.attention=flex_attention is for CUDA; on CPU use sdpa or auto")
    if name != "auto":
        return name
    if cuda:
        return "flash_attention_2" if has_flash and micro_batch == 1 else "flex_attention"
    return "sdpa"


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight).float(), y, reduction="sum")


def _labeled(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """(the hidden states of the positions that carry a next-token label, those labels, a zero tied
    to the graph: with no loss token, backward and DeepSpeed's hooks still run as usual)."""
    y = labels[:, 1:].reshape(-1)
    keep = (y != IGNORE_INDEX).nonzero().squeeze(1)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep)
    return h, y.index_select(0, keep), hidden.sum().float() * 0 + weight.sum().float() * 0


def token_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token losses and the number of loss tokens; ``labels`` aligned with the inputs
    (position t's label is the token at t), ``IGNORE_INDEX`` where no loss is taken."""
    h, y, total = _labeled(hidden, weight, labels)
    for i in range(0, len(y), chunk):
        args = (h[i : i + chunk], weight, y[i : i + chunk])
        total = total + (
            checkpoint(_chunk_loss, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk_loss(*args)
        )
    return total, torch.tensor(len(y), device=hidden.device)


def fused_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_loss_sum` by Liger Kernel's fused linear cross-entropy (``train.kernels=liger``,
    CUDA): the labeled positions' logits are built a chunk at a time inside one Triton-backed
    function that also computes their gradients (accumulated in fp32), never whole."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    h, y, total = _labeled(hidden, weight, labels)
    if len(y):
        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", accum_dtype=torch.float32)
        total = total + loss(weight, h, y).float()
    return total, torch.tensor(len(y), device=hidden.device)


def apply_liger(lm: nn.Module) -> None:
    """Liger Kernel's Triton RMSNorm, SwiGLU and rope in ``lm``'s modules (``train.kernels=liger``;
    the loss is :func:`fused_loss_sum`); ``ValueError`` naming the key when the package is missing,
    has no kernels for the architecture or fails to patch it (the module then as it was).

    Liger patches ``lm``'s instances (their ``forward``; they keep their classes: ``_get_name()``
    says ``LigerRMSNorm``) and, to do so, the modeling module's globals: its norm and MLP classes,
    so that every model built after it in the process would be built of Liger's modules, Triton
    and CUDA only, and its rope function, which the attention looks up at each call. The classes
    are put back here; the rope stays patched for the instance's sake, but as :func:`_on_triton`:
    Liger's kernel where Triton can run (:func:`triton_runs`), the module's own function elsewhere
    (a CPU model in the same process)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        raise ValueError(
            f"train.kernels=liger needs the liger-kernel package (pip install '.[liger]'; Triton, CUDA): {e}"
        ) from e
    kind = getattr(lm.config, "model_type", None)
    fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(kind)
    if fn is None:
        raise ValueError(
            f"train.kernels=liger: Liger Kernel has no kernels for {kind!r} models; use train.kernels=none"
        )
    module = sys.modules[type(lm).__module__]
    before = dict(vars(module))
    try:
        fn(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=lm)
    except Exception as e:  # a liger-kernel that does not know this transformers' model code
        vars(module).update(before)  # nothing half-patched left in the module
        raise ValueError(
            f"train.kernels=liger: Liger Kernel could not patch this {kind} model ({e!r}); "
            "check that liger-kernel supports this transformers version, or use train.kernels=none"
        ) from e
    for name, value in before.items():
        now = getattr(module, name)
        if now is not value:
            setattr(module, name, _on_triton(now, value) if name == "apply_rotary_pos_emb" else value)


def triton_runs(device: torch.device) -> bool:
    """Whether Triton kernels run on ``device``'s tensors: CUDA, or anywhere under Triton's
    interpreter (``TRITON_INTERPRET=1``: the kernels run on the host, slowly; how they are checked
    on a machine without a GPU)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _on_triton(liger, plain):
    """A rope function that runs Liger's Triton kernel where :func:`triton_runs` and the model's
    own elsewhere (the interpreter's switch read once, here: nothing for a compiled layer to trace)."""
    plain = getattr(plain, "_liger_plain", plain)  # applied twice: wrap the module's own function once
    anywhere = triton_runs(torch.device("cpu"))

    def rope(q, k, *args, **kwargs):
        return (liger if anywhere or q.is_cuda else plain)(q, k, *args, **kwargs)

    rope._liger_plain = plain
    return rope


def output_weight(head: nn.Module) -> torch.Tensor:
    """The output layer's weight as the chunked loss multiplies by it: the plain weight; a LoRA'd
    head's ``W + scale · B A`` (its adapter applied without dropout: the loss never builds the
    full logits, so it cannot run the layer's own forward); a head trained in full's own copy."""
    if hasattr(head, "lora_A") and "default" in head.lora_A:
        return head.base_layer.weight + head.get_delta_weight("default")
    if hasattr(head, "modules_to_save"):
        return head.modules_to_save["default"].weight
    return head.weight


class PackedCausalLM(nn.Module):
    """A causal LM returning (sum of token losses, loss tokens) for a packed batch."""

    def __init__(self, lm: nn.Module, loss_chunk: int = 4096, autocast: bool = False, fused_loss: bool = False):
        super().__init__()
        self.lm = lm
        self.loss_chunk = loss_chunk
        self.fused_loss = fused_loss  # Liger's fused linear cross-entropy (train.kernels=liger, CUDA)
        # bf16 autocast (LoRA on CUDA: fp32 adapters on a bf16 base; train.strategy=torch: fp32 master weights)
        self.autocast = autocast

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor):
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            hidden = self.lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
            if self.fused_loss:
                return fused_loss_sum(hidden, output_weight(self.lm.lm_head), labels)
            return token_loss_sum(hidden, output_weight(self.lm.lm_head), labels, self.loss_chunk)


def count_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 2 × parameters forward, 2 × backward to the inputs, 2 × trainable
    parameters for their gradients (6 × parameters for a full fine-tune), + attention (6 × layers ×
    hidden × seq_len, the convention ../shared/bench/gpu_zero1_check.py uses, so MFU figures compare)."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * n + 2 * trainable + 6 * c.num_hidden_layers * c.hidden_size * seq_len


def peak_flops(device: torch.device, dtype: torch.dtype, configured: float | None) -> float | None:
    """Peak FLOP/s per device for MFU: configured, else a known GPU's dense bf16 figure, else None."""
    if configured:
        return configured * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H200", 989), ("H100", 989), ("A100", 312), ("L40S", 362)):
        if key in name:
            return tflops * 1e12 * (1 if dtype != torch.float32 else 0.5)
    return None
