"""The loss is the token-weighted mean over the whole global batch, across micro-batches *and*
ranks: DeepSpeed ZeRO-1 over gloo with 2 ranks × 1 micro-batch, 1 rank × 2 micro-batches, and a
plain PyTorch reference all take the same step. (Runs without Ray, as the GPU benchmark does.)"""

import os
import socket

import numpy as np
import torch
import torch.multiprocessing as mp

from cerbero_ray.config.common import ModelConfig
from cerbero_ray.config.train import DeepSpeedConfig, TrainConfig, TrainStageConfig
from cerbero_ray.data.packing import IGNORE_INDEX
from cerbero_ray.models import build_model

SEQ = 32
MODEL = {"_target_": "cerbero_ray.models.tiny", "path": None, "dtype": "float32", "overrides": {}}
# eps = 1: Adam's first step is then ~ lr × gradient, so a wrongly weighted gradient shows
TRAIN = {
    "method": "full",
    "micro_batch_size": 1,
    "global_batch_size": 2,
    "max_grad_norm": 1e9,
    "precision": "fp32",
    "lr": 1e-2,
    "min_lr_ratio": 1.0,
    "schedule": "constant",
    "warmup_steps": 0,
    "warmup_ratio": 0.0,
    "weight_decay": 0.0,
    "betas": [0.9, 0.95],
    "eps": 1.0,
    "gradient_checkpointing": False,
    "attention": "sdpa",
    "loss_chunk_tokens": 7,
    "seed": 0,
}
DS = {
    "stage": 1,
    "overlap_comm": False,
    "contiguous_gradients": True,
    "reduce_bucket_size": 10**7,
    "allgather_bucket_size": 10**7,
    "extra": {},
}


CONFIG = TrainStageConfig(
    model=ModelConfig(**MODEL),
    deepspeed=DeepSpeedConfig(**DS),
    train=TrainConfig(data_dir="-", output_dir="-", **TRAIN),
)


def batches():
    g = np.random.default_rng(0)
    out = []
    for loss_tokens in (28, 3):  # very different counts: a mean of means would weight them equally
        ids = g.integers(3, 32000, (1, SEQ))
        labels = np.full_like(ids, IGNORE_INDEX)
        labels[0, SEQ - loss_tokens :] = ids[0, SEQ - loss_tokens :]
        out.append({"input_ids": ids, "labels": labels, "position_ids": np.arange(SEQ)[None]})
    return out


def _run(rank, world, port, out):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from cerbero_ray.train.loop import train_step
    from cerbero_ray.train.zero import build_deepspeed

    engine, _, lm, _ = build_deepspeed(CONFIG, 1, torch.device("cpu"), world)
    mine = batches() if world == 1 else [batches()[rank]]
    loss, n = train_step(engine, mine, torch.device("cpu"), world)
    if rank == 0:
        torch.save({"state": lm.state_dict(), "loss": loss, "n": n}, out)
    torch.distributed.barrier()  # leave together: a rank tearing gloo down under a peer's collective can abort
    torch.distributed.destroy_process_group()


def run_ds(world, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / f"w{world}.pt")
    mp.spawn(_run, args=(world, port, out), nprocs=world, join=True)
    return torch.load(out)


def reference(weighting):
    lm = build_model(MODEL, seed=0)
    opt = torch.optim.AdamW(lm.parameters(), lr=TRAIN["lr"], betas=TRAIN["betas"], eps=TRAIN["eps"], weight_decay=0.0)
    losses = []
    for b in batches():
        logits = lm(input_ids=torch.as_tensor(b["input_ids"]), use_cache=False).logits[0, :-1]
        losses.append(
            torch.nn.functional.cross_entropy(
                logits, torch.as_tensor(b["labels"])[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum"
            )
        )
    counts = [int((torch.as_tensor(b["labels"])[0, 1:] != IGNORE_INDEX).sum()) for b in batches()]
    loss = sum(losses) / sum(counts) if weighting == "tokens" else sum(x / c for x, c in zip(losses, counts)) / 2
    loss.backward()
    opt.step()
    return lm.state_dict(), loss.item()


def test_ranks_and_micro_batches_weigh_tokens_alike(tmp_path):
    one, two = run_ds(1, tmp_path), run_ds(2, tmp_path)
    ref, ref_loss = reference("tokens")
    mean_of_means, _ = reference("micro_batches")
    assert one["n"] == two["n"] == 31
    assert abs(one["loss"] - ref_loss) < 1e-5 and abs(two["loss"] - ref_loss) < 1e-5
    for k, v in ref.items():
        torch.testing.assert_close(one["state"][k], v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(two["state"][k], v, rtol=1e-5, atol=1e-6)
    # and the test can tell the difference
    assert max((mean_of_means[k] - ref[k]).abs().max().item() for k in ref) > 1e-4
