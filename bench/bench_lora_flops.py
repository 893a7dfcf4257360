"""How much work LoRA saves, counted rather than timed (issue 31: on an H200 the LoRA run's tokens/s
equalled the full fine-tune's). One training step's forward and backward of our training module
(:class:`~cerbero_ray.train.modeling.PackedCausalLM`: packed rows, the chunked head and loss) under
``torch.utils.flop_counter.FlopCounterMode``, for the full fine-tune and for LoRA on a frozen base
(the recipe's ``apply_lora``), with and without activation checkpointing. The counter sees the
matrix multiplications (attention's own FLOPs are left out on CPU), which are where a frozen base
saves: no weight gradients for its linears. Plain CPU, seconds; no Ray, no DeepSpeed.

    python bench/bench_lora_flops.py                       # a 7B-proportioned model, 2 layers, hidden 512
    python bench/bench_lora_flops.py --hidden 4096 --ffn 14336 --layers 1 --seq 2048   # the 7B's widths
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def count(cfg, method: str, checkpointing: bool, seq: int, rank: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import MistralForCausalLM

    from cerbero_ray.config.train import LoraConfig
    from cerbero_ray.train.lora import apply_lora
    from cerbero_ray.train.modeling import PackedCausalLM

    torch.manual_seed(0)
    lm = MistralForCausalLM(cfg)
    lm.config.use_cache, lm.config._attn_implementation = False, "sdpa"
    if method == "lora":
        lm.requires_grad_(False)
    if checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "lora":
        apply_lora(lm, LoraConfig(r=rank, alpha=2.0 * rank, dropout=0.05, target_modules=TARGETS), 0)
    lm.train()
    model = PackedCausalLM(lm, 4096)
    ids = torch.randint(3, cfg.vocab_size, (1, seq))
    pos = torch.cat([torch.arange(seq // 2), torch.arange(seq - seq // 2)])[None]  # two documents
    with FlopCounterMode(display=False) as fwd:
        loss, _ = model(ids, ids.clone(), pos)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"forward": fwd.get_total_flops(), "backward": bwd.get_total_flops(), "trainable": trainable}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1792)  # the 7B's ratio (14336 / 4096)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", default=os.environ.get("OUT", RESULTS))
    a = p.parse_args()
    from transformers import MistralConfig

    cfg = MistralConfig(
        hidden_size=a.hidden,
        intermediate_size=a.ffn,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=max(1, a.heads // 4),
        vocab_size=32000,
        sliding_window=None,
    )
    res = {"args": vars(a)}
    for ckpt in (False, True):
        full, lora = (count(cfg, m, ckpt, a.seq, a.rank) for m in ("full", "lora"))
        key = "checkpointing" if ckpt else "no_checkpointing"
        res[key] = {
            "full": full,
            "lora": lora,
            "lora_vs_full_backward": round(lora["backward"] / full["backward"], 3),
            "lora_vs_full_step": round((lora["forward"] + lora["backward"]) / (full["forward"] + full["backward"]), 3),
        }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_lora_flops.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
