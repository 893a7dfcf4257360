"""bf16 training keeps gradients in fp32 between micro-batches: with 8 accumulation steps, a bf16
run's accumulated gradient is closer to an fp32 reference's than with DeepSpeed's default, which
accumulates (and reduces) in the model's bf16. DeepSpeed ZeRO-1 on CPU, one gloo rank."""

import pytest
import torch

from cerbero_ray.config import check, compose, to_container
from cerbero_ray.train.zero import build_deepspeed, deepspeed_config
from conftest import one_rank_group

pytestmark = pytest.mark.integration


@pytest.fixture
def one_rank(monkeypatch):
    with one_rank_group(monkeypatch, "gloo"):
        yield


def accumulated_grads(precision: str, extra: dict) -> dict[str, torch.Tensor]:
    """Every parameter's gradient after 8 micro-batches (one optimizer step's worth)."""
    from deepspeed.utils import safe_get_full_grad

    c = to_container(
        compose(
            "train",
            [
                "paths.output_dir=/tmp/unused",
                "train.num_workers=1",
                "train.global_batch_size=8",
                f"train.precision={precision}",
            ],
        )
    )
    c["deepspeed"]["extra"] = extra
    c = check("train", c)
    engine, _, _, _ = build_deepspeed(c, 10, torch.device("cpu"), 1)
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        ids = torch.randint(3, 32000, (1, 128), generator=g)
        loss_sum, _ = engine(ids, ids.clone(), torch.arange(128)[None])
        engine.backward(loss_sum / 1000)
        if i < 7:
            engine.step()  # the last one would apply the update: read the gradient before it
    return {n: safe_get_full_grad(p).float().clone() for n, p in engine.module.named_parameters() if p.requires_grad}


def test_bf16_accumulates_gradients_in_fp32(one_rank):
    c = check("train", compose("train", ["paths.output_dir=/tmp/unused", "train.precision=bf16"]))
    ds = deepspeed_config(c.deepspeed, c.train, world_size=2)
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["communication_data_type"] == "fp32"
    ref = accumulated_grads("fp32", {})
    err = {}
    for name, extra in (
        ("fp32 accumulation", {}),
        ("bf16 accumulation", {"data_types": {"grad_accum_dtype": "bf16"}, "communication_data_type": "bf16"}),
    ):
        g = accumulated_grads("bf16", extra)
        err[name] = sum(((g[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref) / len(ref)
    assert err["fp32 accumulation"] < err["bf16 accumulation"], err
