"""LoRA on CUDA (the ``gpu`` tier; skipped without a GPU): the frozen base in bf16 with fp32 adapters
and AdamW states under autocast, QLoRA's 4-bit base (bitsandbytes), and the mixed-adapter decode
step captured in a CUDA graph giving the eager step's logits."""

import copy

import pytest
import torch

from cerbero_ray.config import compose, to_container
from conftest import one_rank_group

pytestmark = pytest.mark.gpu


@pytest.fixture
def one_cuda_rank(monkeypatch):
    with one_rank_group(monkeypatch, "nccl"):
        yield


def _steps(engine, n=4, seq=128):
    g = torch.Generator().manual_seed(0)
    losses = []
    ids = torch.randint(3, 32000, (1, seq), generator=g).cuda()
    for _ in range(n):
        loss_sum, tokens = engine(ids, ids.clone(), torch.arange(seq, device="cuda")[None])
        engine.backward(loss_sum / tokens)
        engine.step()
        losses.append(float(loss_sum / tokens))
    return losses


def _config(tmp_path, *over):
    return to_container(
        compose(
            "train",
            [
                f"paths.output_dir={tmp_path}",
                "train.num_workers=1",
                "train.global_batch_size=1",
                "train.use_gpu=true",
                "train.precision=bf16",
                "train.method=lora",
                "train.lora.lr=1e-2",
                *over,
            ],
        )
    )


def test_lora_base_bf16_adapters_fp32(one_cuda_rank, tmp_path):
    from cerbero_ray.train.zero import build_deepspeed

    engine, _, lm, _ = build_deepspeed(_config(tmp_path), 10, torch.device("cuda"), 1)
    frozen = {p.dtype for p in lm.parameters() if not p.requires_grad}
    trained = {p.dtype for p in lm.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    losses = _steps(engine)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    states = [s for st in engine.optimizer.state.values() for s in st.values() if torch.is_tensor(s) and s.dim()]
    assert states and all(s.dtype == torch.float32 for s in states)


def test_qlora_trains_a_4bit_base(one_cuda_rank, tmp_path, tiny_hf):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install '.[qlora]'")
    from cerbero_ray.train.zero import build_deepspeed

    c = _config(tmp_path, "model=hf", f"model.path={tiny_hf}", "train.lora.qlora=true")
    engine, _, lm, _ = build_deepspeed(c, 10, torch.device("cuda"), 1)
    kinds = {type(m).__name__ for m in lm.modules()}
    assert "Linear4bit" in kinds, kinds
    losses = _steps(engine)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_mixed_adapters_in_a_cuda_graph(tiny_hf, tiny_adapters, tok):
    from transformers import AutoModelForCausalLM

    from cerbero_ray.inference.multilora import AdapterSet
    from cerbero_ray.inference.slots import SlotModel

    base = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.bfloat16).cuda().eval()
    out = {}
    for graphs in (False, True):
        m = copy.deepcopy(base)
        slots = SlotModel(m, 4, 256, AdapterSet(m, dict(tiny_adapters)))
        prompts = [tok(p).input_ids for p in ("Ciao", "Il gatto dorme", "Roma è", "Buongiorno")]
        for s, a in enumerate((0, 1, 2, 1)):
            slots.set_adapter(s, a)
        first = slots.prefill(prompts, [0, 1, 2, 3]).argmax(-1)
        out[graphs] = slots.decode(first.cpu(), torch.tensor([len(p) for p in prompts]), graphs=graphs)
        assert slots.graph_error is None
    assert torch.allclose(out[True], out[False], atol=2e-2)
