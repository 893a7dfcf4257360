"""``train.kernels=liger``: Liger Kernel's Triton kernels (RMSNorm, SwiGLU, rope, the fused linear
cross-entropy as the loss). They have no CPU path: on CPU the plain path runs, said once, with
the plain path's very losses; a missing package and a bad value are named. On CUDA (``gpu`` tier,
with liger-kernel installed) the fused step gives the plain step's losses to bf16's precision and
the fused loss equals the chunked one. The engines are built by the trainer's own functions."""

import sys

import pytest
import torch

from cerbero_ray.config import check, compose
from cerbero_ray.train.loop import train_step
from cerbero_ray.train.zero import build_engine
from conftest import DEVICES, one_rank_group

pytestmark = pytest.mark.integration


@pytest.fixture
def one_rank(monkeypatch, device):
    with one_rank_group(monkeypatch, "nccl" if device == "cuda" else "gloo"):
        yield


def batches(n: int, device: str, seq: int = 128) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 32000, (1, seq), generator=g)
        labels = ids.clone()
        labels[0, :10] = -100
        pos = torch.cat([torch.arange(seq // 2), torch.arange(seq - seq // 2)])[None]
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return out


def engine(device: str, kernels: str, precision: str = "fp32"):
    o = ["paths.output_dir=/tmp/unused", "train.num_workers=1", "train.global_batch_size=1", "train.lr=1e-3"]
    o += [f"train.kernels={kernels}", f"train.precision={precision}", "train.warmup_steps=0"]
    o += [f"train.use_gpu={str(device == 'cuda').lower()}"]
    return build_engine(check("train", compose("train", o)), 10, torch.device(device), 1)[0]


def losses(e, bs, device: str) -> list[float]:
    return [train_step(e, [b], torch.device(device), 1)[0] for b in bs]


@pytest.mark.parametrize("device", DEVICES)
def test_liger_kernels_train_as_the_plain_path(one_rank, device):
    bs = batches(4, device)
    precision = "bf16" if device == "cuda" else "fp32"
    plain = losses(engine(device, "none", precision), bs, device)
    if device == "cpu":  # no Triton here: the plain path, said once
        with pytest.warns(UserWarning, match="train.kernels=liger: Liger's Triton kernels need CUDA"):
            e = engine(device, "liger", precision)
        assert not e.module.fused_loss
        assert losses(e, bs, device) == plain
        return
    pytest.importorskip("liger_kernel", reason="train.kernels=liger needs liger-kernel (bench/gpu_prepare.sh --train)")
    e = engine(device, "liger", precision)
    kinds = {type(m).__name__ for m in e.module.modules()}
    assert e.module.fused_loss and {"LigerRMSNorm", "LigerSwiGLUMLP"} <= kinds, kinds
    assert losses(e, bs, device) == pytest.approx(plain, rel=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda"])
def test_the_fused_loss_equals_the_chunked_loss(device):
    pytest.importorskip("liger_kernel")
    from cerbero_ray.train.modeling import fused_loss_sum, token_loss_sum

    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(2, 64, 256, device=device, generator=g, requires_grad=True)
    weight = torch.randn(1000, 256, device=device, generator=g, requires_grad=True)
    labels = torch.randint(0, 1000, (2, 64), device=device, generator=g)
    labels[:, :5] = -100
    a, na = token_loss_sum(hidden, weight, labels, 32)
    (ga_h, ga_w) = torch.autograd.grad(a, (hidden, weight))
    b, nb = fused_loss_sum(hidden, weight, labels)
    (gb_h, gb_w) = torch.autograd.grad(b, (hidden, weight))
    assert int(na) == int(nb) == 2 * 63 - 2 * 4
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gb_h, ga_h, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(gb_w, ga_w, rtol=1e-3, atol=1e-4)


def test_a_missing_package_and_a_bad_value_are_named(monkeypatch):
    from cerbero_ray.models import tiny
    from cerbero_ray.train.modeling import apply_liger

    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # what an install without it imports
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)
    with pytest.raises(ValueError, match="train.kernels=liger needs the liger-kernel package"):
        apply_liger(tiny())
    with pytest.raises(ValueError, match="train.kernels must be one of"):
        check("train", compose("train", ["paths.output_dir=/tmp/unused", "train.kernels=unsloth"]))
