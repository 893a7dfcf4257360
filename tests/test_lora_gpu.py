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


def test_adapters_read_bf16_activations_as_they_come_under_autocast():
    """peft copies each adapted linear's input to its A's dtype (fp32) before autocast casts it back
    to bf16 for the product: a full-size pass over the activations per projection, for the same
    numbers. ``apply_lora(..., autocast=True)`` turns that copy off: no fp32 copy of an activation
    in a forward and backward (counted at the dispatcher), the same logits and adapter gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from cerbero_ray.config.train import LORA_TARGETS, LoraConfig
    from cerbero_ray.models import tiny
    from cerbero_ray.train.lora import apply_lora

    seq = 48
    base = tiny(dtype="bfloat16").eval()
    base.requires_grad_(False)
    hidden = base.config.hidden_size

    class Copies(TorchDispatchMode):  # fp32 copies of activation-sized tensors
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.dtype == torch.float32 and out.numel() >= seq * hidden:
                self.n += 1
            return out

    ids = torch.randint(3, 32000, (1, seq), generator=torch.Generator().manual_seed(0))
    got = {}
    for off in (None, False, True):  # None: the base alone (its RMSNorms and the loss copy to fp32 anyway)
        pm = copy.deepcopy(base)
        if off is not None:
            pm = apply_lora(pm, LoraConfig(r=4, dropout=0.0, target_modules=list(LORA_TARGETS)), 0, off)
        else:
            pm.model.embed_tokens.weight.requires_grad_(True)  # a backward through every layer, as LoRA's
        with Copies() as c, torch.autocast("cpu", dtype=torch.bfloat16):
            logits = pm(input_ids=ids).logits
            logits.float().logsumexp(-1).mean().backward()
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
        got[off] = (c.n, logits.detach(), grads)
    layers = base.config.num_hidden_layers
    # peft's copies: at least one per adapted linear; with the flag, none beyond the base's own
    # (whose backward through every layer also copies its embedding's gradient)
    counts = {k: v[0] for k, v in got.items()}
    assert counts[False] - counts[None] >= 7 * layers and counts[True] <= counts[None], counts
    assert torch.equal(got[False][1], got[True][1])
    assert all(torch.equal(got[False][2][k], got[True][2][k]) for k in got[False][2])
