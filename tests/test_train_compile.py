"""``train.compile=layers``: each decoder layer's forward compiled (regional, as torchtitan), with
our checkpoint around it. On CPU (inductor), over optimizer steps on packed rows of several
documents: the same losses and weights as eager, for the full fine-tune and for LoRA; a run
resumed from a DeepSpeed checkpoint with compile on continues exactly as the uninterrupted one; a
model without decoder layers is refused naming the key. DeepSpeed ZeRO-1, one gloo rank."""

import pytest
import torch

from cerbero_ray.config import check, compose
from cerbero_ray.train.loop import train_step
from cerbero_ray.train.zero import build_deepspeed, compile_layers
from conftest import one_rank_group

pytestmark = pytest.mark.integration


@pytest.fixture
def one_rank(monkeypatch):
    with one_rank_group(monkeypatch, "gloo"):
        yield


def batches(steps: int) -> list[dict]:
    """Packed rows of three documents each (positions restart: document-masked attention)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, 32000, (1, 96), generator=g)
        pos = torch.cat([torch.arange(40), torch.arange(30), torch.arange(26)])[None]
        out.append({"input_ids": ids, "labels": ids.clone(), "position_ids": pos})
    return out


def engine(compile_: str, method: str = "full"):
    over = ["paths.output_dir=/tmp/unused", "train.num_workers=1", "train.global_batch_size=1", "train.precision=fp32"]
    over += [f"train.compile={compile_}", f"train.method={method}", "train.lr=1e-3", "train.warmup_steps=0"]
    # no LoRA dropout: compiled code draws its random numbers its own way (equal in law, not in value)
    over += ["train.lora.dropout=0"]
    return build_deepspeed(check("train", compose("train", over)), 10, torch.device("cpu"), 1)[0]


def run(e, bs: list[dict]) -> list[float]:
    return [train_step(e, [b], torch.device("cpu"), 1)[0] for b in bs]


def weights(e) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in e.module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_compiled_layers_train_as_eager(one_rank, method):
    from torch._dynamo.utils import counters

    bs = batches(3)
    eager, compiled = engine("none", method), engine("layers", method)
    counters.clear()
    assert run(eager, bs) == pytest.approx(run(compiled, bs), rel=1e-5)
    # it did compile, whole: one graph for both layers (transformers' own checkpointing would break it)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    a, b = weights(eager), weights(compiled)
    # AdamW divides by sqrt(v): a gradient near 0 (LoRA's A before B has moved) that differs in its
    # 9th digit moves that weight by up to the learning rate; the tensors as a whole agree
    assert a.keys() == b.keys()
    assert all((a[k] - b[k]).norm() <= 1e-3 * a[k].norm() for k in a), max(
        ((a[k] - b[k]).norm() / a[k].norm()).item() for k in a
    )
    # the state-dict keys a checkpoint and the HF folder are written with are the eager ones
    assert list(eager.module.state_dict()) == list(compiled.module.state_dict())


def test_a_compiled_run_resumes_exactly(one_rank, tmp_path):
    bs = batches(4)
    whole = engine("layers")
    losses = run(whole, bs)
    first = engine("layers")
    run(first, bs[:2])
    first.save_checkpoint(str(tmp_path), tag="step2")
    again = engine("layers")
    again.load_checkpoint(str(tmp_path), tag="step2")
    assert run(again, bs[2:]) == losses[2:]
    a, b = weights(whole), weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(ValueError, match="train.compile=layers: Linear has no model.layers"):
        compile_layers(torch.nn.Linear(2, 2), checkpointing=True)
