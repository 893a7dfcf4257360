"""LoRA's device paths: the frozen base (bf16 on CUDA under ``precision=bf16``, fp32 on CPU) with fp32
adapters and AdamW states, QLoRA's 4-bit base (bitsandbytes, CUDA only), and the mixed-adapter
decode step (captured in a CUDA graph on CUDA) giving the eager step's logits. Each body runs on CPU
in the default tier and on CUDA in the ``gpu`` tier; the QLoRA run needs CUDA, its config is
checked on CPU."""

import copy

import pytest
import torch

from cerbero_ray.config import check, compose
from conftest import DEVICES, one_rank_group


@pytest.fixture
def one_rank(monkeypatch, device):
    with one_rank_group(monkeypatch, "nccl" if device == "cuda" else "gloo"):
        yield


def _steps(engine, device, n=4, seq=128):
    g = torch.Generator().manual_seed(0)
    losses = []
    ids = torch.randint(3, 32000, (1, seq), generator=g).to(device)
    for _ in range(n):
        loss_sum, tokens = engine(ids, ids.clone(), torch.arange(seq, device=device)[None])
        engine.backward(loss_sum / tokens)
        engine.step()
        losses.append(float(loss_sum / tokens))
    return losses


def _config(tmp_path, device, *over):
    """The checked train config (what the trainer's workers get) for one LoRA rank on ``device``."""
    return check(
        "train",
        compose(
            "train",
            [
                f"paths.output_dir={tmp_path}",
                "train.num_workers=1",
                "train.global_batch_size=1",
                f"train.use_gpu={str(device == 'cuda').lower()}",
                "train.precision=bf16",
                "train.method=lora",
                "train.lora.lr=1e-2",
                *over,
            ],
        ),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_lora_frozen_base_and_fp32_adapters(one_rank, tmp_path, device):
    from cerbero_ray.train.zero import build_deepspeed

    engine, _, lm, _ = build_deepspeed(_config(tmp_path, device), 10, torch.device(device), 1)
    frozen = {p.dtype for p in lm.parameters() if not p.requires_grad}
    trained = {p.dtype for p in lm.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16 if device == "cuda" else torch.float32} and trained == {torch.float32}
    losses = _steps(engine, device)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    states = [s for st in engine.optimizer.state.values() for s in st.values() if torch.is_tensor(s) and s.dim()]
    assert states and all(s.dtype == torch.float32 for s in states)


def _qlora_config(tmp_path, tiny_hf):
    return _config(tmp_path, "cuda", "model=hf", f"model.path={tiny_hf}", "train.lora.qlora=true")


def test_the_qlora_config_checks_on_cpu(tmp_path, tiny_hf):
    c = _qlora_config(tmp_path, tiny_hf)
    assert c.train.lora.qlora and c.train.use_gpu and c.model.path == tiny_hf


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda"])
def test_qlora_trains_a_4bit_base(one_rank, tmp_path, tiny_hf, device):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install '.[qlora]'")
    from cerbero_ray.train.zero import build_deepspeed

    engine, _, lm, _ = build_deepspeed(_qlora_config(tmp_path, tiny_hf), 10, torch.device(device), 1)
    kinds = {type(m).__name__ for m in lm.modules()}
    assert "Linear4bit" in kinds, kinds
    losses = _steps(engine, device)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_adapters_decoded_eager_and_graphed(tiny_hf, tiny_adapters, tok, device):
    """The module path (eager) against the fast decode step with the adapters' deltas (on CUDA:
    captured in a graph, its regions compiled; on CPU: eager), rows of three adapters."""
    from transformers import AutoModelForCausalLM

    from cerbero_ray.inference.multilora import AdapterSet
    from cerbero_ray.inference.slots import SlotModel

    base = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.bfloat16).to(device).eval()
    out = []
    for fast, graphs in ((False, False), (True, device == "cuda")):
        m = copy.deepcopy(base)
        slots = SlotModel(m, 4, 256, AdapterSet(m, dict(tiny_adapters)), fast=fast)
        prompts = [tok(p).input_ids for p in ("Ciao", "Il gatto dorme", "Roma è", "Buongiorno")]
        for s, a in enumerate((0, 1, 2, 1)):
            slots.set_adapter(s, a)
        first = slots.prefill(prompts, [0, 1, 2, 3]).argmax(-1)
        out.append(slots.decode(first.cpu(), torch.tensor([len(p) for p in prompts]), graphs=graphs))
        assert slots.fast == fast and slots.graph_error is None and bool(slots.graphs) == graphs
        assert slots.compile_error is None
    assert torch.allclose(out[1], out[0], atol=2e-2)
