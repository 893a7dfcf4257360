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
        losses.append(float(loss_sum.detach() / tokens))
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


def _qlora_config(tmp_path, tiny_hf, device="cuda"):
    return _config(tmp_path, device, "model=hf", f"model.path={tiny_hf}", "train.lora.qlora=true")


@pytest.mark.parametrize("installed", ["0.50.2", "0.45.0", None])
def test_the_qlora_config_checks_on_cpu(tmp_path, tiny_hf, monkeypatch, installed):
    """The config, checked before Ray starts, whatever bitsandbytes this machine has (the version
    the check reads is set here): a CUDA config needs 0.45, a CPU one 0.50 (its torch fallback);
    merging into a 4-bit base is refused."""
    import importlib.metadata

    from packaging.version import Version

    real = importlib.metadata.version

    def version(name):
        if name != "bitsandbytes":
            return real(name)
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)
    if installed is None:  # nor importable under another distribution's name
        import importlib.util

        find = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else find(n, *a))
    for device, need in (("cuda", "0.45"), ("cpu", "0.50")):
        if installed is not None and Version(installed) >= Version(need):
            c = _qlora_config(tmp_path, tiny_hf, device)
            assert c.train.lora.qlora and c.train.use_gpu == (device == "cuda") and c.model.path == tiny_hf
        else:
            on = "on CUDA" if device == "cuda" else "on CPU"
            with pytest.raises(
                ValueError, match=rf"needs bitsandbytes >= {need} {on} \(found {installed or 'none'}\): pip"
            ):
                _qlora_config(tmp_path, tiny_hf, device)
    if installed is not None:
        with pytest.raises(ValueError, match="qlora=true quantizes a checkpoint as it loads: use model=hf"):
            _config(tmp_path, "cpu", "train.lora.qlora=true")  # the random-init demo model: nothing to load
        with pytest.raises(ValueError, match="train.lora.merge=true with qlora"):
            _config(
                tmp_path, "cuda", "model=hf", f"model.path={tiny_hf}", "train.lora.qlora=true", "train.lora.merge=true"
            )


@pytest.mark.parametrize("device", DEVICES)
def test_qlora_trains_a_4bit_base_and_resumes_exactly(one_rank, tmp_path, tiny_hf, device):
    """QLoRA (bitsandbytes' 4-bit NF4 base; on CPU its torch fallback): the base's linears are 4-bit
    and frozen, the adapters fp32, the loss falls; a checkpoint without the base (as the trainer
    writes it) resumed on a base quantized again from the same checkpoint gives the same losses and
    adapter weights as the run that did not stop; the adapter folder loads with peft on the base."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install '.[qlora]'")
    from peft import PeftModel
    from test_train_native import batches, run
    from transformers import AutoModelForCausalLM

    from cerbero_ray.train import checkpoint as ckpt
    from cerbero_ray.train.lora import counts, record_of, save_adapter
    from cerbero_ray.train.zero import build_deepspeed

    dev = torch.device(device)

    def engine():
        return build_deepspeed(_qlora_config(tmp_path, tiny_hf, device), 10, dev, 1)

    bs = [{k: v.to(dev) for k, v in b.items()} for b in batches(8)]
    whole, _, lm, peft_model = engine()
    assert "Linear4bit" in {type(m).__name__ for m in lm.modules()}
    assert {p.dtype for p in lm.parameters() if p.requires_grad} == {torch.float32}
    assert torch.uint8 in {p.dtype for p in lm.parameters() if not p.requires_grad}  # packed 4-bit weights
    plain = AutoModelForCausalLM.from_pretrained(tiny_hf)
    assert counts(peft_model)[1] - counts(peft_model)[0] == sum(p.numel() for p in plain.parameters())
    want = run(whole, bs, 2)
    assert all(torch.isfinite(torch.tensor(want)).flatten()) and want[-1][0] < want[0][0]
    first = engine()[0]
    run(first, bs[:4], 2)
    ckpt.save(first, str(tmp_path / "c"), 0, {"loop": {"step": 2}}, frozen=True)
    again = engine()[0]
    assert ckpt.load(again, str(tmp_path / "c"), 0, frozen=True)["loop"] == {"step": 2}
    assert run(again, bs[4:], 2) == want[2:]
    trained = {n: p for n, p in whole.module.named_parameters() if p.requires_grad}
    resumed = {n: p for n, p in again.module.named_parameters() if p.requires_grad}
    assert trained.keys() == resumed.keys() and all(torch.equal(trained[n], resumed[n]) for n in trained)
    save_adapter(peft_model, None, record_of(tiny_hf), str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_hf), str(tmp_path / "adapter"))
    b = {
        n.replace(".default", "").removeprefix("base_model.model."): p
        for n, p in loaded.named_parameters()
        if "lora_" in n
    }
    a = {n.replace(".default", "").removeprefix("lm."): p for n, p in trained.items()}
    assert b.keys() == a.keys(), (list(a)[:2], list(b)[:2])
    assert all(torch.equal(b[n].cpu(), a[n].detach().cpu()) for n in b)


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


def test_adapters_add_no_pass_over_the_activations_under_autocast():
    """Under bf16 autocast (``apply_lora(..., autocast=True)``, what the trainer does), an adapter
    costs its two small products and nothing over the activations: peft's forward copies each
    adapted linear's input to fp32 (its A's dtype) before autocast casts it back to bf16, then scales
    B's output and adds it (two more passes over the output); ours reads the input as it comes and
    adds the scaled update in the second product's epilogue (``addmm``). Counted at the dispatcher
    in a forward (passes over activation-sized tensors) and a backward (fp32 copies), against the
    base alone; the logits and adapter gradients agree with peft's to bf16's precision."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from cerbero_ray.config.train import LORA_TARGETS, LoraConfig
    from cerbero_ray.models import tiny
    from cerbero_ray.train.lora import apply_lora

    seq = 48
    base = tiny(dtype="bfloat16").eval()
    base.requires_grad_(False)
    hidden = base.config.hidden_size
    passes = (torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor, torch.ops.aten._to_copy.default)

    class Count(TorchDispatchMode):  # ops writing an activation-sized tensor: (elementwise passes, fp32 copies)
        def __init__(self):
            super().__init__()
            self.passes = self.copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() >= seq * hidden:
                self.passes += func in passes
                self.copies += func is torch.ops.aten._to_copy.default and out.dtype == torch.float32
            return out

    ids = torch.randint(3, 32000, (1, seq), generator=torch.Generator().manual_seed(0))
    got = {}
    for ours in (None, False, True):  # None: the base alone (its RMSNorms and the loss pass and copy anyway)
        pm = copy.deepcopy(base)
        if ours is not None:
            pm = apply_lora(pm, LoraConfig(r=4, dropout=0.0, target_modules=list(LORA_TARGETS)), 0, ours)
        else:
            pm.model.embed_tokens.weight.requires_grad_(True)  # a backward through every layer, as LoRA's
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with Count() as fwd:
                logits = pm(input_ids=ids).logits
            with Count() as bwd:
                logits.float().logsumexp(-1).mean().backward()
        grads = {n: p.grad.float().clone() for n, p in pm.named_parameters() if p.requires_grad}
        got[ours] = ((fwd.passes, fwd.copies, bwd.copies), logits.detach().float(), grads)
    layers = base.config.num_hidden_layers
    (p0, c0, b0), (p1, c1, b1), (p2, c2, b2) = (got[k][0] for k in (None, False, True))
    # peft: an fp32 copy, a cast back, a scale and an add per adapted linear; ours: the base's own
    assert p1 - p0 >= 3 * 7 * layers and p2 == p0, (p0, p1, p2)
    assert c1 - c0 >= 7 * layers and c2 == c0, (c0, c1, c2)
    assert b2 <= b0 < b1, (b0, b1, b2)  # backward: the base's own copies (and its embedding's gradient)
    torch.testing.assert_close(got[True][1], got[False][1], rtol=2e-2, atol=2e-2)
    for k in got[False][2]:
        a, b = got[False][2][k], got[True][2][k]
        assert (a - b).norm() <= 3e-2 * a.norm() + 1e-6, k
