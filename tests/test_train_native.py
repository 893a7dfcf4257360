"""``train.strategy=torch``: the recipe's ZeRO-1 in plain PyTorch (fp32 weights, autocast, DDP,
ZeroRedundancyOptimizer) against DeepSpeed on the same batches. On CPU over gloo: one rank gives
DeepSpeed's losses, gradient norms and weights (full fine-tune and LoRA, fp32; bf16 within bf16's
tolerance); two ranks shard AdamW's states, give one rank's losses on the same global batches and
resume exactly from their checkpoint; a run resumed with the other strategy's checkpoint is refused
naming the strategy; its fp32 weights are exported as a bf16 model; the config refuses ZeRO-2 for
it."""

import os
import shutil
import socket

import pytest
import torch

from cerbero_ray.config import check, compose
from cerbero_ray.train import checkpoint as ckpt
from cerbero_ray.train.loop import train_step
from cerbero_ray.train.zero import build_engine
from conftest import one_rank_group

pytestmark = pytest.mark.integration


@pytest.fixture
def one_rank(monkeypatch):
    with one_rank_group(monkeypatch, "gloo"):
        yield


def batches(n: int, seq: int = 64) -> list[dict]:
    """Packed rows of two documents each, a few tokens unlabeled (token weighting matters)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 32000, (1, seq), generator=g)
        labels = ids.clone()
        labels[0, : int(torch.randint(1, 20, (1,), generator=g))] = -100
        pos = torch.cat([torch.arange(seq // 2), torch.arange(seq - seq // 2)])[None]
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return out


def config(strategy: str, method: str = "full", precision: str = "fp32", world: int = 1, accum: int = 2, *over):
    o = ["paths.output_dir=/tmp/unused", f"train.num_workers={world}", f"train.global_batch_size={world * accum}"]
    o += [f"train.precision={precision}", f"train.strategy={strategy}", f"train.method={method}", "train.lr=1e-3"]
    o += ["train.warmup_steps=1", "train.lora.dropout=0", "train.max_grad_norm=0.5", *over]
    return check("train", compose("train", o))


def run(engine, bs: list[dict], accum: int, world: int = 1) -> list[tuple[float, float]]:
    """(loss, gradient norm) per optimizer step, ``accum`` micro-batches each."""
    out = []
    for i in range(0, len(bs), accum):
        loss, _ = train_step(engine, bs[i : i + accum], torch.device("cpu"), world)
        out.append((loss, float(engine.get_global_grad_norm())))
    return out


def weights(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in engine.module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_one_rank_trains_as_deepspeed(one_rank, method):
    bs = batches(6)
    ds = build_engine(config("deepspeed", method), 10, torch.device("cpu"), 1)[0]
    native = build_engine(config("torch", method), 10, torch.device("cpu"), 1)[0]
    assert type(native).__name__ == "TorchEngine" and type(native.optimizer) is torch.optim.AdamW
    a, b = run(ds, bs, 2), run(native, bs, 2)
    assert [x for x, _ in a] == pytest.approx([x for x, _ in b], rel=1e-5)
    assert [x for _, x in a] == pytest.approx([x for _, x in b], rel=1e-4)  # the clipping saw the same norms
    assert a[-1][0] < a[0][0]
    wa, wb = weights(ds), weights(native)
    assert wa.keys() == wb.keys()
    assert all((wa[k] - wb[k]).norm() <= 1e-4 * wa[k].norm() for k in wa)


def test_bf16_autocast_over_fp32_weights_follows_deepspeed_bf16(one_rank):
    """DeepSpeed's bf16 keeps a bf16 model beside fp32 masters; ours keeps fp32 weights and casts in
    the forward: the losses agree to bf16's precision and the weights stay fp32."""
    bs = batches(6)
    ds = build_engine(config("deepspeed", precision="bf16"), 10, torch.device("cpu"), 1)[0]
    native = build_engine(config("torch", precision="bf16"), 10, torch.device("cpu"), 1)[0]
    a, b = run(ds, bs, 2), run(native, bs, 2)
    assert [x for x, _ in a] == pytest.approx([x for x, _ in b], rel=2e-2)
    assert {p.dtype for p in native.module.parameters()} == {torch.float32}


def test_one_rank_resumes_exactly_and_refuses_the_other_strategy_s_checkpoint(one_rank, tmp_path):
    bs = batches(8)
    whole = build_engine(config("torch"), 10, torch.device("cpu"), 1)[0]
    want = run(whole, bs, 2)
    first = build_engine(config("torch"), 10, torch.device("cpu"), 1)[0]
    run(first, bs[:4], 2)
    ckpt.save(first, str(tmp_path / "c"), 0, {"loop": {"step": 2}})
    assert os.path.isfile(tmp_path / "c" / "torch" / "state" / "optimizer_rank_0.pt")
    again = build_engine(config("torch"), 10, torch.device("cpu"), 1)[0]
    assert ckpt.load(again, str(tmp_path / "c"), 0) == {"loop": {"step": 2}}
    assert run(again, bs[4:], 2) == want[2:]
    wa, wb = weights(whole), weights(again)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ds = build_engine(config("deepspeed"), 10, torch.device("cpu"), 1)[0]
    with pytest.raises(RuntimeError, match="no deepspeed state in .*: it was written with train.strategy=torch"):
        ckpt.load(ds, str(tmp_path / "c"), 0)


def test_fp32_weights_are_exported_as_the_bf16_model_deepspeed_writes(tmp_path):
    """Under ``train.strategy=torch`` with ``precision=bf16`` the weights are fp32 masters; the HF
    folder (:func:`~cerbero_ray.train.checkpoint.save_hf` with a dtype) holds them in bf16 and says
    so in its config, and the model in memory stays fp32."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from cerbero_ray.models import tiny

    lm = tiny()
    ckpt.save_hf(lm, None, str(tmp_path / "hf"), torch.bfloat16)
    w = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {v.dtype for v in w.values()} == {torch.bfloat16} and {p.dtype for p in lm.parameters()} == {torch.float32}
    assert json.load(open(tmp_path / "hf" / "config.json"))["dtype"] == "bfloat16"
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype="auto")
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.state_dict()["lm_head.weight"], lm.state_dict()["lm_head.weight"].to(torch.bfloat16))


def test_zero2_is_refused_for_the_torch_strategy():
    with pytest.raises(ValueError, match="train.strategy=torch shards the optimizer states only"):
        config("torch", "full", "fp32", 1, 2, "deepspeed.stage=2")
    with pytest.raises(ValueError, match="train.strategy must be one of"):
        config("fsdp")
    with pytest.raises(ValueError, match="deepspeed.extra is merged into DeepSpeed's JSON"):
        config("torch", "full", "fp32", 1, 2, "+deepspeed.extra.zero_optimization.overlap_comm=false")


def _two_ranks(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of two: the global batches of :func:`batches` split across ranks, one
    micro-batch each per step; a checkpoint after two steps, then two more; a fresh engine resumed
    from it does the last two again."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        bs = batches(8)[rank::2]  # global batch i: rows 2i and 2i + 1
        e = build_engine(config("torch", "full", "fp32", 2, 1), 10, torch.device("cpu"), 2)[0]
        first = run(e, bs[:2], 1, 2)
        local = sum(s.numel() for st in e.optimizer.optim.state.values() for s in st.values() if s.dim())
        ckpt.save(e, os.path.join(out, "c"), rank, {"loop": {"step": 2}})
        rest = run(e, bs[2:], 1, 2)
        again = build_engine(config("torch", "full", "fp32", 2, 1), 10, torch.device("cpu"), 2)[0]
        # resumed from what a resume on another machine downloads: this rank's files only
        mine, wanted = os.path.join(out, f"c-rank{rank}"), ckpt.resume_files({rank})
        for r, _, files in os.walk(os.path.join(out, "c")):
            for f in files:
                name = os.path.relpath(os.path.join(r, f), os.path.join(out, "c")).replace(os.sep, "/")
                if wanted(name):
                    os.makedirs(os.path.dirname(os.path.join(mine, name)), exist_ok=True)
                    shutil.copy(os.path.join(r, f), os.path.join(mine, name))
        assert not os.path.exists(os.path.join(mine, "torch", "state", f"optimizer_rank_{1 - rank}.pt"))
        ckpt.load(again, mine, rank)
        resumed = run(again, bs[2:], 1, 2)
        same = all(torch.equal(a, b) for a, b in zip(e.module.parameters(), again.module.parameters()))
        torch.save(
            {"losses": first + rest, "resumed": resumed, "same": same, "state_numel": local},
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_shard_adamw_and_train_as_one(one_rank, tmp_path):
    """Two gloo ranks (DDP's all-reduce, ZeroRedundancyOptimizer) against one rank taking both rows
    of each global batch as two micro-batches: the same losses; each rank holds about half of
    AdamW's states; a resume from the two ranks' checkpoint repeats the last steps exactly."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_two_ranks, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    one = build_engine(config("torch", "full", "fp32", 1, 2), 10, torch.device("cpu"), 1)[0]
    want = run(one, batches(8), 2)
    assert r0["losses"] == r1["losses"]
    assert [x for x, _ in r0["losses"]] == pytest.approx([x for x, _ in want], rel=1e-5)
    assert [x for _, x in r0["losses"]] == pytest.approx([x for _, x in want], rel=1e-4)
    assert r0["resumed"] == r0["losses"][2:] and r1["resumed"] == r1["losses"][2:]
    assert r0["same"] and r1["same"]
    total = 2 * sum(p.numel() for p in one.module.parameters())  # exp_avg and exp_avg_sq
    assert r0["state_numel"] + r1["state_numel"] == total
    assert 0.2 < r0["state_numel"] / total < 0.8
