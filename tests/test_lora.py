"""LoRA: the config checks, adapter folders every consumer loads, and many adapters in one batch.

The mixed-batch tests run the continuous engine on a tiny base with two adapters of different
ranks and target modules (random A and B, so each changes the greedy text): each adapter's greedy
output in a batch mixed with the other and with the base equals that adapter served alone, and
equals peft's merged model on the same engine; a base request in the mixed batch is unaffected."""

import copy
import json
import os

import pytest
import torch

from cerbero_ray import adapters
from cerbero_ray.config import check, compose, to_container
from cerbero_ray.inference.sampling import Sampling

GREEDY = Sampling(max_new_tokens=12, temperature=0.0, stop=[])
PROMPTS = ["Ciao, come stai?", "Il gatto dorme sul divano.", "Roma è la capitale d'Italia.", "Buongiorno a tutti"]


# ── config ──────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.method=adapter", "train.method"),
        ("train.lora.r=0", "train.lora.r"),
        ("train.lora.dropout=1.0", "train.lora.dropout"),
        ("train.lora.target_modules=[q_proj,attn]", r"train.lora.target_modules\[\]"),
        ("train.lora.train_in_full=[norm]", r"train.lora.train_in_full\[\]"),
        ("train.lora.train_in_full=[lm_head]", "choose one"),
    ],
)
def test_bad_lora_config_names_the_key(override, match, tmp_path):
    c = to_container(compose("train", [f"paths.output_dir={tmp_path}", "train.method=lora", override]))
    with pytest.raises(ValueError, match=match):
        check("train", c)


def test_lora_config_defaults_and_the_one_gpu_preset(tmp_path):
    from cerbero_ray.config.train import LoraConfig

    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert LoraConfig().target_modules == projections  # the schema's default: attention + MLP
    t = check("train", compose("train", [f"paths.output_dir={tmp_path}", "train.method=lora"])).train
    assert t.lora.target_modules == [*projections, "lm_head"]  # the random-init demo adds the head
    assert not t.lora.merge and not t.lora.qlora
    full = check("train", compose("train", [f"paths.output_dir={tmp_path}"])).train
    assert full.method == "full"  # the recipe stays a full fine-tune
    one = to_container(compose("train", [f"paths.output_dir={tmp_path}", "train=lora_1xh100", "model=mistral_7b"]))
    assert one["train"]["method"] == "lora" and one["train"]["num_workers"] == 1 and one["train"]["use_gpu"]
    assert one["train"]["lora"]["target_modules"] == projections


def test_the_main_job_with_lora_hands_the_adapter_to_every_later_stage(tmp_path):
    """``jobs/recipe.py train.method=lora``: label, export and evaluate read ``<run>/adapter``; a full
    fine-tune's read ``<run>/hf`` (the whole run is the slow tier's test_recipe LoRA test)."""
    for method, folder in (("lora", "adapter"), ("full", "hf")):
        c = to_container(compose("recipe", [f"paths.output_dir={tmp_path}", f"train.method={method}"]))
        run = os.path.join(c["train"]["output_dir"], c["train"]["name"])
        want = os.path.join(run, folder)
        assert c["label"]["checkpoint"] == c["export"]["checkpoint"] == want
        assert c["evaluate"]["checkpoints"]["trained"] == want


def test_serve_adapters_are_checked_before_ray(tiny_hf, tiny_adapters, tmp_path):
    ok = [f"serve.checkpoint={tiny_hf}"] + [f"+serve.adapters.{n}={p}" for n, p in tiny_adapters.items()]
    assert set(check("serve", compose("serve", ok)).serve.adapters) == set(tiny_adapters)
    assert check("serve", compose("serve", [*ok, "serve.fast_decode=true"])).serve.fast_decode  # adapters run in it
    a = tiny_adapters["sentiment-it"]
    for over, match in (
        ([f"+serve.adapters.cerbero={a}"], "serve.adapters.cerbero: a name"),
        ([f"+serve.adapters.x={tiny_hf}"], "serve.adapters.x: no LoRA adapter"),
        ([f"+serve.adapters.x={a}", "serve.engine=hf"], "serve.engine=continuous"),
        ([f"+serve.adapters.x={tmp_path}/nothing"], "serve.adapters.x: no LoRA adapter"),
    ):
        with pytest.raises(ValueError, match=match):
            check("serve", compose("serve", [f"serve.checkpoint={tiny_hf}", *over]))


# ── adapter folders ─────────────────────────────────────────────────────────────────────────────


def test_adapter_is_a_checkpoint_with_its_base_recorded(tiny_hf, tiny_adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cerbero_ray.checkpoints import check_checkpoint, model_type
    from cerbero_ray.models import load_for_inference

    a = tiny_adapters["sentiment-it"]
    check_checkpoint(a, "label.checkpoint")
    assert model_type(a) == "mistral" and adapters.base_of(a) == tiny_hf
    model, tok = load_for_inference(a, "float32")
    assert tok.chat_template  # the adapter's own tokenizer
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_hf), a).eval()
    ids = torch.tensor([[1, 400, 500, 600, 700]])
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()(ids).logits
    assert (got - want).abs().max() < 1e-4 < (got - base).abs().max()
    # the adapter without a tokenizer takes its base's
    b = tiny_adapters["toxicity-it"]
    assert load_for_inference(b, "float32")[1].chat_template
    # its adapted lm_head is A and B only: the frozen base head is not copied into the adapter
    from safetensors import safe_open

    with safe_open(os.path.join(b, "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any("lm_head.lora_A" in n for n in names) and all("lora_" in n for n in names)

    # another base than the recorded one is refused, by fingerprint
    other = tmp_path / "other"
    from cerbero_ray.models import tiny

    tiny(seed=5).save_pretrained(other)
    for f in os.listdir(tiny_hf):
        if f.startswith("tokenizer"):
            (other / f).write_bytes(open(os.path.join(tiny_hf, f), "rb").read())
    with pytest.raises(ValueError, match="is not the base the adapter"):
        load_for_inference(a, "float32", base=str(other))
    # a cut-short adapter and a missing base are named
    cut = tmp_path / "cut"
    os.makedirs(cut)
    for f in os.listdir(a):
        if os.path.isfile(os.path.join(a, f)):
            (cut / f).write_bytes(open(os.path.join(a, f), "rb").read())
    w = cut / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ValueError, match="label.checkpoint: .* is incomplete: adapter_model.safetensors is"):
        check_checkpoint(str(cut), "label.checkpoint")  # by its complete marker
    from cerbero_ray.storage import COMPLETE

    (cut / COMPLETE).unlink()  # a peft folder from elsewhere: by the safetensors header
    with pytest.raises(ValueError, match="label.checkpoint: .* is cut short"):
        check_checkpoint(str(cut), "label.checkpoint")
    rec = json.loads((cut / "cerbero_base.json").read_text())
    (cut / "cerbero_base.json").write_text(json.dumps({**rec, "base": str(tmp_path / "gone")}))
    with pytest.raises(ValueError, match="holds no HF model here"):
        adapters.base_of(str(cut), key="label.checkpoint")


# ── many adapters in one batch ──────────────────────────────────────────────────────────────────


def _engine(model, tok, adapter_set=None, fast=None):
    from cerbero_ray.inference.continuous import ContinuousBatcher

    return ContinuousBatcher(
        model, tok, num_slots=8, max_prompt_tokens=64, max_new_tokens=16, adapters=adapter_set, fast_decode=fast
    )


@pytest.mark.parametrize("fast", [False, True])
def test_mixed_batch_equals_each_adapter_alone_and_peft_merged(tiny_hf, tiny_adapters, tok, fast):
    """The module path and the fast decode step (fused QKV and gate/up, the adapters' deltas added
    per group of projections; on CPU uncompiled): each row's text is its adapter's merged model's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cerbero_ray.inference.multilora import AdapterSet

    base = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    served = copy.deepcopy(base)
    aset = AdapterSet(served, dict(tiny_adapters), "cerbero")
    assert aset.names == ["cerbero", "sentiment-it", "toxicity-it"] and aset.rank == 8
    eng = _engine(served, tok, aset, fast)
    assert eng.slots.fast == fast
    items = [(p, GREEDY, i % 3) for i, p in enumerate(PROMPTS * 2)]  # base, a, b, base, a, b, …
    mixed = [r["text"] for r in eng.run(items)]
    alone = [eng.run([it])[0]["text"] for it in items]
    assert mixed == alone
    # each adapter: peft's merged model served on its own (the same engine, no adapters loaded)
    for k, (name, path) in enumerate(tiny_adapters.items(), 1):
        merged = PeftModel.from_pretrained(copy.deepcopy(base), path).merge_and_unload().eval()
        want = [r["text"] for r in _engine(merged, tok).run([(p, GREEDY) for p, _, a in items if a == k])]
        assert [t for t, (_, _, a) in zip(mixed, items) if a == k] == want, name
    # the base rows: the base model served with no adapters at all
    want = [r["text"] for r in _engine(copy.deepcopy(base), tok).run([(p, GREEDY) for p, _, a in items if a == 0])]
    assert [t for t, (_, _, a) in zip(mixed, items) if a == 0] == want
    # the adapters do change the text (else the equalities above prove nothing)
    assert len({mixed[0], mixed[1], mixed[2]}) == 3


@pytest.mark.parametrize("segments", [True, False])
def test_mixed_batch_logits_match_peft(tiny_hf, tiny_adapters, tok, segments):
    """One prefill of rows for three models at once against peft's unmerged model per row, the
    adapters by segments of one adapter (the CPU's form) and in the dense masked form (a GPU's)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cerbero_ray.inference.multilora import AdapterSet
    from cerbero_ray.inference.slots import SlotModel

    base = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    served = copy.deepcopy(base)
    aset = AdapterSet(served, dict(tiny_adapters))
    slots = SlotModel(served, 4, 64, aset)
    assert slots.prefill_segments  # on CPU
    slots.prefill_segments = segments
    prompts = [tok(p, add_special_tokens=True).input_ids for p in PROMPTS[:3]]
    for s, a in enumerate((2, 0, 1)):
        slots.set_adapter(s, a)
    got = slots.prefill(prompts, [0, 1, 2])
    refs = [copy.deepcopy(base)] + [
        PeftModel.from_pretrained(copy.deepcopy(base), p).eval() for p in tiny_adapters.values()
    ]
    with torch.no_grad():
        for row, a in enumerate((2, 0, 1)):
            want = refs[a](torch.tensor([prompts[row]])).logits[0, -1]
            assert torch.allclose(got[row], want, atol=1e-4), (row, a, (got[row] - want).abs().max())


def test_adapters_come_from_config_alone(tiny_hf, tiny_adapters, tok):
    """Adding or removing an adapter is a config change: the engine serves what it is given, by
    name, and refuses what it is not."""
    from cerbero_ray.serve.engine import ServeEngine

    one = ServeEngine(tiny_hf, "float32", adapters={"sentiment-it": tiny_adapters["sentiment-it"]}, model_name="m")
    two = ServeEngine(tiny_hf, "float32", adapters=dict(tiny_adapters), model_name="m")
    assert one.adapters.names == ["m", "sentiment-it"] and two.adapters.names == ["m", *tiny_adapters]
    with pytest.raises(KeyError):
        one.adapter_index("toxicity-it")
    assert one.adapter_index(None) == one.adapter_index("m") == 0
    a1 = one.batcher.run([(PROMPTS[0], GREEDY, one.adapter_index("sentiment-it"))])[0]["text"]
    a2 = two.batcher.run([(PROMPTS[0], GREEDY, two.adapter_index("sentiment-it"))])[0]["text"]
    assert a1 == a2
    with pytest.raises(KeyError):
        ServeEngine(tiny_hf, "float32").adapter_index("sentiment-it")


def test_label_scores_with_the_named_adapter(tiny_hf, tiny_adapters):
    from cerbero_ray.config.label_task import get_task
    from cerbero_ray.inference.batch import Labeler
    from cerbero_ray.serve.engine import ServeEngine

    task = get_task("sentiment")
    eng = ServeEngine(tiny_hf, "float32", {"sentiment": task}, adapters=dict(tiny_adapters), model_name="m")
    texts = ["Che bella giornata!", "Un servizio pessimo."]
    out = eng.label([("sentiment", texts, 1), ("sentiment", texts, 0)])
    want = Labeler(tiny_adapters["sentiment-it"], task, "float32").scorer.score(texts)
    base = Labeler(tiny_hf, task, "float32").scorer.score(texts)
    for got, ref in ((out[0], want), (out[1], base)):
        for g, r in zip(got, ref):
            assert g["label"] == r["label"]
            assert all(abs(g["logprobs"][k] - r["logprobs"][k]) < 1e-3 for k in r["logprobs"])
    assert any(abs(a["logprobs"][k] - b["logprobs"][k]) > 0.1 for a, b in zip(want, base) for k in a["logprobs"])


def test_unsupported_adapters_are_refused(tiny_hf, tmp_path):
    from transformers import AutoModelForCausalLM

    from cerbero_ray.inference.multilora import AdapterSet
    from conftest import make_adapter

    a = make_adapter(tiny_hf, str(tmp_path / "dora"), 4, ["q_proj"], 3)
    cfg = json.load(open(os.path.join(a, "adapter_config.json")))
    json.dump({**cfg, "use_dora": True}, open(os.path.join(a, "adapter_config.json"), "w"))
    with pytest.raises(ValueError, match="DoRA"):
        AdapterSet(AutoModelForCausalLM.from_pretrained(tiny_hf), {"x": a})
    with pytest.raises(ValueError, match="adapter name"):
        AdapterSet(AutoModelForCausalLM.from_pretrained(tiny_hf), {"bad name": a})


def test_decode_kernels_agree(tiny_hf, tiny_adapters, tok):
    """The decode step's dense form (every adapter, rows masked) and the per-row gather give the
    same logits for a mixed batch, and base rows get the base model's exactly."""
    from transformers import AutoModelForCausalLM

    from cerbero_ray.inference.multilora import AdapterSet
    from cerbero_ray.inference.slots import SlotModel

    base = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    out = {}
    for kernel in ("auto", "gather"):
        m = copy.deepcopy(base)
        aset = AdapterSet(m, dict(tiny_adapters))
        aset.kernel = kernel
        slots = SlotModel(m, 4, 64, aset)
        prompts = [tok(p).input_ids for p in PROMPTS[:4]]
        for s, a in enumerate((0, 1, 2, 1)):
            slots.set_adapter(s, a)
        first = slots.prefill(prompts, [0, 1, 2, 3]).argmax(-1)
        pos = torch.tensor([len(p) for p in prompts])
        out[kernel] = slots.decode(first, pos)
    assert torch.allclose(out["auto"], out["gather"], atol=1e-4, rtol=1e-5)
    plain = SlotModel(copy.deepcopy(base), 4, 64)  # the same rows, no adapters loaded
    first = plain.prefill(prompts, [0, 1, 2, 3]).argmax(-1)
    ref = plain.decode(first, pos)
    assert torch.equal(out["auto"][0], ref[0]) and not torch.allclose(out["auto"][1], ref[1], atol=1e-3)


def test_a_packed_prefill_runs_its_adapters_by_segments(tiny_hf, tiny_adapters):
    """Chunks with one adapter in a row run as one segment; the base's rows add nothing; the
    segments are gone after the forward."""
    from transformers import AutoModelForCausalLM

    from cerbero_ray.inference.multilora import AdapterSet

    aset = AdapterSet(AutoModelForCausalLM.from_pretrained(tiny_hf), dict(tiny_adapters))
    with aset.per_segment([1, 1, 0, 2, 2, 1], [2, 3, 1, 2, 2, 4]):
        assert aset.segments == [(1, 0, 5), (2, 6, 10), (1, 10, 14)]
    assert aset.segments is None
