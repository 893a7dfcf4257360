"""``train.kernels=liger``: Liger Kernel's Triton kernels (RMSNorm, SwiGLU, rope, the fused linear
cross-entropy as the loss). They have no CPU path: on CPU the plain path runs, said once, with
the plain path's very losses; a missing package and a bad value are named. On CUDA (``gpu`` tier,
with liger-kernel installed) the fused step gives the plain step's losses to bf16's precision and
the fused loss equals the chunked one. The engines are built by the trainer's own functions.

Where triton and liger-kernel are installed (``pip install triton '.[liger]'``; CI has neither),
the kernels also run on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, which also lets
the trainer apply them on CPU): the patched model gives the plain model's loss and gradients,
with and without LoRA adapters over it, in fp32 (the interpreter computes bf16 on its raw bits:
Liger's SwiGLU and rope give NaN there, not on a GPU), and Liger's patching of the modeling
module stays with the model it patched; in the slow tier, the trainer's own engine with Liger
on trains with the plain path's losses and resumes exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

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


@pytest.fixture
def rope_kept(monkeypatch):
    """The modeling module's rope function as it is, put back after the test (Liger's stays patched
    in it for the patched model's sake, and on CUDA would serve the models of later tests)."""
    from transformers.models.mistral import modeling_mistral

    monkeypatch.setattr(modeling_mistral, "apply_rotary_pos_emb", modeling_mistral.apply_rotary_pos_emb)


@pytest.mark.parametrize("device", DEVICES)
def test_liger_kernels_train_as_the_plain_path(one_rank, rope_kept, device):
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
    kinds = {m._get_name() for m in e.module.modules()}  # Liger patches instances: their classes stay
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
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton runs on CPU then: the trainer applies Liger
    with pytest.raises(ValueError, match="train.kernels=liger needs the liger-kernel package"):
        engine("cpu", "liger")
    with pytest.raises(ValueError, match="train.kernels must be one of"):
        check("train", compose("train", ["paths.output_dir=/tmp/unused", "train.kernels=unsloth"]))


@pytest.mark.parametrize("interpret", [False, True, "fails"])
def test_what_liger_patches_in_the_modeling_module_stays_with_its_model(monkeypatch, rope_kept, interpret):
    """Without liger-kernel (CI): a stand-in patching as Liger does (the instance's forward, the
    module's classes and rope) shows what :func:`apply_liger` puts back: the classes, and the rope
    for tensors Triton cannot take (CPU, unless under its interpreter); a patch that fails midway (a
    liger-kernel that does not know this transformers) is named and leaves the module as it was."""
    import types

    from transformers.models.mistral import modeling_mistral as mm

    from cerbero_ray.models import tiny
    from cerbero_ray.train.modeling import apply_liger

    own, calls = mm.apply_rotary_pos_emb, []

    def liger_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        calls.append(q.device.type)
        return own(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    def apply_to_mistral(rope, rms_norm, swiglu, cross_entropy, fused_linear_cross_entropy, model):
        mm.apply_rotary_pos_emb, mm.MistralRMSNorm, mm.MistralMLP = liger_rope, nn.Identity, nn.Identity
        model.model.norm._get_name = lambda: "LigerRMSNorm"
        if interpret == "fails":
            raise AttributeError("'MistralModel' object has no attribute 'norm_f'")

    patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"mistral": apply_to_mistral}
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", patch)
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
    classes = mm.MistralRMSNorm, mm.MistralMLP
    lm = tiny()
    if interpret == "fails":
        with pytest.raises(ValueError, match=r"train.kernels=liger: Liger Kernel could not patch this mistral model"):
            apply_liger(lm)
        assert (mm.apply_rotary_pos_emb, mm.MistralRMSNorm, mm.MistralMLP) == (own, *classes)
        return
    apply_liger(lm)
    apply_liger(lm)  # twice: still one level of dispatch to the module's own rope
    assert mm.apply_rotary_pos_emb._liger_plain is own
    assert (mm.MistralRMSNorm, mm.MistralMLP) == classes and lm.model.norm._get_name() == "LigerRMSNorm"
    later = tiny()
    assert {type(m) for m in later.modules()} >= set(classes)
    ids = torch.arange(3, 19)[None]
    for model in (lm, later):
        calls.clear()
        model(ids)
        assert calls == (["cpu"] * model.config.num_hidden_layers if interpret else []), calls


# Triton's interpreter (3.6-3.9) passes float arguments as Python floats, which Liger's RMSNorm
# kernel casts (``eps.to``), and gives no interpreted ``libdevice.rsqrt``: two shims, for these checks only.
SHIMS = """
import json, os, sys
import numpy as np
import torch
import triton.language as tl
import triton.runtime.interpreter as interpreter
import liger_kernel.ops.rms_norm

cvt = interpreter._implicit_cvt
f32 = lambda v: tl.tensor(interpreter.TensorHandle(np.array(v, dtype=np.float32), tl.float32), tl.float32)
interpreter._implicit_cvt = lambda a: f32(a) if isinstance(a, float) else cvt(a)
liger_kernel.ops.rms_norm.rsqrt = lambda x: 1.0 / tl.sqrt(x)
"""

INTERPRETED = (
    SHIMS
    + """
from transformers.models.mistral import modeling_mistral
from cerbero_ray.config.train import LORA_TARGETS, LoraConfig
from cerbero_ray.models import tiny
from cerbero_ray.train.lora import apply_lora
from cerbero_ray.train.modeling import PackedCausalLM, apply_liger
from test_train_kernels import batches

classes = modeling_mistral.MistralRMSNorm, modeling_mistral.MistralMLP
plain, fused = tiny(seed=0), tiny(seed=0)
apply_liger(fused)
later = tiny(seed=0)  # built after the patch
b = batches(1, "cpu")[0]
ids, labels, pos = b["input_ids"], b["labels"], b["position_ids"]
out = {}
for name, lm in (("plain", plain), ("fused", fused), ("later", later)):
    loss, n = PackedCausalLM(lm, fused_loss=name == "fused")(ids, labels, pos)
    loss.backward()
    out[name], out[name + "_n"] = float(loss), int(n)
    out[name + "_names"] = sorted({m._get_name() for m in lm.modules()})
# LoRA on the patched base (the trainer applies Liger first, then the adapters over its projections)
for name in ("plain_lora", "fused_lora"):
    lm = tiny(seed=0).requires_grad_(False)
    if name == "fused_lora":
        apply_liger(lm)
    peft_model = apply_lora(lm, LoraConfig(target_modules=list(LORA_TARGETS)), seed=0)
    for p in peft_model.parameters():  # B starts at zero: give the adapters a say in the loss
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
    loss, n = PackedCausalLM(lm, fused_loss=name == "fused_lora")(ids, labels, pos)
    loss.backward()
    out[name] = float(loss)
    out[name + "_grad"] = torch.cat([p.grad.flatten() for p in peft_model.parameters() if p.requires_grad])
a, b = out.pop("plain_lora_grad"), out.pop("fused_lora_grad")
out["lora_grad_diff"], out["lora_grad_max"] = float((a - b).abs().max()), float(a.abs().max())
out["grad_diff"] = max(float((a.grad - b.grad).abs().max()) for a, b in zip(plain.parameters(), fused.parameters()))
out["grad_max"] = max(float(a.grad.abs().max()) for a in plain.parameters())
out["classes_kept"] = (modeling_mistral.MistralRMSNorm, modeling_mistral.MistralMLP) == classes
json.dump(out, sys.stdout)
"""
)

# the trainer's own path (build_engine, train_step, DeepSpeed ZeRO-1 on one gloo rank) with Liger on,
# through this file's engine() and losses(), on test_train_compile's batches()
TRAINED = (
    SHIMS
    + """
import tempfile
import torch.distributed as dist
from test_train_compile import batches  # packed rows of three documents
from test_train_kernels import engine, losses

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
bs = batches(4)
out = {"plain": losses(engine("cpu", "none"), bs, "cpu")}
whole = engine("cpu", "liger")
out["fused_loss"] = whole.module.fused_loss
out["names"] = sorted({m._get_name() for m in whole.module.modules()})
out["fused"] = losses(whole, bs, "cpu")
first = engine("cpu", "liger")
losses(first, bs[:2], "cpu")
with tempfile.TemporaryDirectory() as d:
    first.save_checkpoint(d, tag="step2")
    again = engine("cpu", "liger")
    again.load_checkpoint(d, tag="step2")
out["resumed"] = losses(again, bs[2:], "cpu")
a, b = whole.module.state_dict(), again.module.state_dict()
out["weights_equal"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
json.dump(out, sys.stdout)
"""
)


def interpreted(script: str, *args: str) -> dict:
    """What ``script`` prints last (JSON), run by a child under Triton's interpreter."""
    import numpy as np
    from packaging.version import Version

    triton = pytest.importorskip("triton", reason="needs triton (pip install triton '.[liger]')")
    pytest.importorskip("liger_kernel", reason="needs liger-kernel (pip install triton '.[liger]')")
    if Version(triton.__version__) < Version("3.9") and Version(np.__version__) >= Version("2.4"):
        pytest.skip(
            f"Triton {triton.__version__}'s interpreter takes int() of 1-element arrays, which NumPy >= 2.4 refuses"
        )
    here = Path(__file__).parent  # the repository and this folder: the scripts call this file's helpers
    path = os.pathsep.join([str(here.parent), str(here), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    run = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_liger_kernels_under_tritons_interpreter_give_the_plain_loss_and_stay_with_their_model():
    out = interpreted(INTERPRETED)
    assert {"LigerRMSNorm", "LigerSwiGLUMLP"} <= set(out["fused_names"]), out["fused_names"]
    assert out["fused"] == pytest.approx(out["plain"], rel=1e-5) and out["fused_n"] == out["plain_n"] > 100
    assert out["grad_diff"] <= 1e-4 * out["grad_max"], out
    assert out["fused_lora"] == pytest.approx(out["plain_lora"], rel=1e-5) and out["fused_lora"] != out["plain"]
    assert out["lora_grad_diff"] <= 1e-4 * out["lora_grad_max"], out
    # the model built after the patch is of the plain modules (its rope: Liger's under the interpreter)
    assert out["classes_kept"] and "LigerRMSNorm" not in out["later_names"], out["later_names"]
    assert out["later"] == pytest.approx(out["plain"], rel=1e-5)


@pytest.mark.slow  # ~3 minutes: Liger's fused loss over a 32,000-word vocabulary, interpreted
def test_the_trainer_runs_liger_under_tritons_interpreter_as_the_plain_path_and_resumes_exactly():
    """``train.kernels=liger`` through ``build_engine`` on CPU when Triton's interpreter is on: the
    fused model and loss train with the plain path's losses, and a run resumed from its DeepSpeed
    checkpoint continues exactly as the uninterrupted one."""
    from conftest import free_port

    out = interpreted(TRAINED, str(free_port()))
    assert out["fused_loss"] and {"LigerRMSNorm", "LigerSwiGLUMLP"} <= set(out["names"]), out
    assert out["fused"] == pytest.approx(out["plain"], rel=1e-4) and out["fused"] != out["plain"]
    assert out["resumed"] == out["fused"][2:] and out["weights_equal"]
