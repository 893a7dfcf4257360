"""``train.strategy=torch``: the recipe's ZeRO-1 in plain PyTorch, beside DeepSpeed.

The model's own parameters are the fp32 master weights; the forward runs under bf16 autocast
(``train.precision=bf16``); gradients stay fp32, accumulate over the micro-batches (no all-reduce
between them) and are all-reduced in fp32 by DDP at the last one, overlapped with the backward
pass; then clipping, and AdamW (fused on CUDA) with its states sharded across the ranks by torch's
``ZeroRedundancyOptimizer`` (``deepspeed.stage=1``: each rank steps its share of the parameters
and broadcasts them; ``deepspeed.stage=0``: every rank steps all of them). At world size 1 it is
the plain mixed-precision loop, no wrapper: what ``../shared/bench/gpu_zero1_check.py`` calls
``amp_fp32``, which ran 1.05x DeepSpeed ZeRO-1 at 0.8x its memory on one H200.

:class:`TorchEngine` speaks the part of DeepSpeed's engine that the loop
(:mod:`cerbero_ray.train.loop`) and the checkpoints (:mod:`cerbero_ray.train.checkpoint`) use:
call, ``backward``, ``step`` (the optimizer at the accumulation boundary), ``get_global_grad_norm``,
``eval``/``train``, ``module``, ``optimizer``, ``save_checkpoint``/``load_checkpoint``. Its
checkpoint (``<checkpoint>/torch/state/``): the weights (rank 0; a LoRA run's without the frozen
base), the schedule and the loop's state (rank 0), each rank's optimizer shard.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

STATE_DIR = "torch"


class TorchEngine:
    def __init__(self, module, optimizer, scheduler, accum: int, max_grad_norm: float, device: torch.device):
        self.module = module  # PackedCausalLM
        self.optimizer, self.lr_scheduler = optimizer, scheduler
        self.accum, self.max_grad_norm = accum, max_grad_norm
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = (
                [torch.cuda.current_device() if device.index is None else device.index]
                if device.type == "cuda"
                else None
            )
            self.ddp = DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True)
        self.micro_steps = 0
        self._grad_norm: float | None = None
        self.state_dir = STATE_DIR

    def _params(self):
        return [p for p in self.module.parameters() if p.requires_grad]

    def __call__(self, *args):
        if self.ddp is None or not torch.is_grad_enabled() or not self.module.training:
            return self.module(*args)
        # the all-reduce happens in the backward of the last micro-batch only (DDP reads this at forward)
        self.ddp.require_backward_grad_sync = (self.micro_steps + 1) % self.accum == 0
        return self.ddp(*args)

    def backward(self, loss: torch.Tensor) -> None:
        """As DeepSpeed: the loss divided by the micro-batches per step (DDP averages over ranks)."""
        (loss / self.accum).backward()

    def step(self) -> None:
        """After each micro-batch; at the accumulation boundary: clip, step, zero, schedule."""
        self.micro_steps += 1
        if self.micro_steps % self.accum:
            return
        self._grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params(), self.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()

    def get_global_grad_norm(self) -> float | None:
        """The last step's gradient norm, before clipping (every rank holds the reduced gradients)."""
        return self._grad_norm

    def eval(self):
        self.module.eval()
        return self

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    # ── checkpoints ───────────────────────────────────────────────────────────────────────────
    def _local_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optim", self.optimizer)  # ZeroRedundancyOptimizer: this rank's shard

    def _frozen(self) -> set[str]:
        return {n for n, p in self.module.named_parameters() if not p.requires_grad}

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, exclude_frozen_parameters: bool = False):
        rank = dist.get_rank() if dist.is_initialized() else 0
        d = os.path.join(save_dir, tag)
        os.makedirs(d, exist_ok=True)
        if rank == 0:
            frozen = self._frozen() if exclude_frozen_parameters else set()
            weights = {k: v for k, v in self.module.state_dict().items() if k not in frozen}
            torch.save(weights, os.path.join(d, "model.pt"))
            state = {
                "client": client_state,
                "scheduler": self.lr_scheduler.state_dict(),
                "micro_steps": self.micro_steps,
            }
            torch.save(state, os.path.join(d, "engine.pt"))
        torch.save(self._local_optimizer().state_dict(), os.path.join(d, f"optimizer_rank_{rank}.pt"))
        if dist.is_initialized():
            dist.barrier()

    def load_checkpoint(self, load_dir: str, tag: str, load_module_strict: bool = True, **_) -> tuple:
        """(path, client state), or (None, None) when ``load_dir`` holds no state of this strategy."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        d = os.path.join(load_dir, tag)
        if not os.path.isfile(os.path.join(d, "engine.pt")):
            return None, None
        weights = torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True)
        missing, unexpected = self.module.load_state_dict(weights, strict=load_module_strict)
        if unexpected or set(missing) - self._frozen():
            raise RuntimeError(f"the checkpoint's weights do not fit this model: {missing[:3]} {unexpected[:3]}")
        opt = os.path.join(d, f"optimizer_rank_{rank}.pt")
        if not os.path.isfile(opt):
            raise RuntimeError(f"{d} has no optimizer state for rank {rank}: written by another world size")
        self._local_optimizer().load_state_dict(torch.load(opt, map_location="cpu", weights_only=False))
        state = torch.load(os.path.join(d, "engine.pt"), map_location="cpu", weights_only=False)
        self.lr_scheduler.load_state_dict(state["scheduler"])
        # the learning rate the schedule had reached (ZeRO's wrapper groups would hand their stale one on)
        for g, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
            g["lr"] = lr
        self.micro_steps = state["micro_steps"]
        return d, state["client"]
