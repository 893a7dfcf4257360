"""GGUF export: the file's keys and tensor shapes as llama.cpp's ``llama`` expects them (read back
with the gguf package), errors before anything is written, no partial file under the final name;
and, with llama-cpp-python (which compiles llama.cpp), llama.cpp itself loads each file, tokenizes
Italian as the HF tokenizer does, gives the HF model's logits within stated tolerances, continues
greedily as transformers does, and stops the seed's chat prompt at ``[|Umano|]``."""

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from cerbero_ray import llamacpp
from cerbero_ray.chat import plain_template
from cerbero_ray.config import compose
from cerbero_ray.export.gguf import convert, permute_qk
from cerbero_ray.models import tiny
from cerbero_ray.tokenizer import build_tokenizer, save_tokenizer
from conftest import PATHS

# big enough for real K-quant blocks (rows of 256): hidden 256, 4 heads of 64, 2 KV heads (GQA)
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
SEED_PROMPT = "Questa è una conversazione tra un umano ed un assistente AI.\n[|Umano|] Come stai?\n[|AI|]"
CHAT = SEED_PROMPT + " Bene, grazie! E tu?\n[|Umano|] Anch'io, grazie."  # learnt by the test model
SENTENCES = [
    "Qual è la capitale d'Italia? È Roma, città eterna.",
    "L'anno scorso, nell'aprile del 1973, c'erano 25.000 persone all'università.",
    "[|Umano|] Perché l'ho detto? Così è più facile: sì, però... «citazione» — fine!",
    "Dell'amicizia e dell’amore: àèéìòù ÀÈ 3,14 100% #hashtag @utente",
    CHAT,
]
# llama.cpp vs transformers on the logits of an Italian sentence: (max |difference| relative to the
# largest |logit|, mean KL(transformers || llama.cpp) per position in nats, top-1 agreement).
# Measured on the test model (two sentences): f32 2.8e-4 / 3e-7 / 1.00, f16 5.2e-4 / 5e-7 / 1.00,
# bf16 4.1e-3 / 1.1e-5 / 1.00, q8_0 9.2e-3 / 1.8e-4 / 1.00, Q4_K_M 0.23 / 1.8e-2 / 0.97.
TOLERANCE = {
    "f32": (1e-3, 1e-5, 1.0),
    "f16": (2e-3, 1e-5, 1.0),
    "bf16": (2e-2, 1e-4, 0.95),
    "q8_0": (5e-2, 1e-3, 0.95),
    "q4_k_m": (0.6, 0.1, 0.85),
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Mistral trained for a few steps on Italian (so greedy decoding is not a flat argmax),
    saved as the trainer does: safetensors, tokenizer.json, tokenizer.model, the chat template."""
    d = str(tmp_path_factory.mktemp("export_hf"))
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = tiny(overrides=SHAPE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = tok(SENTENCES + [CHAT] * 4, return_tensors="pt", padding=True).input_ids
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(d)
    save_tokenizer(tok, d)
    return d


def test_tokenizer_model_is_saved_beside_tokenizer_json(hf_dir):
    assert {"tokenizer.json", "tokenizer.model", "config.json", "model.safetensors"} <= set(os.listdir(hf_dir))


def test_permutation_pairs_rotary_halves():
    # one head of 4 rows: rotate-half order [x0, x1, y0, y1] -> interleaved [x0, y0, x1, y1]
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    assert permute_qk(w, 1)[:, 0].tolist() == [0, 4, 2, 6]


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_keys_and_shapes(hf_dir, tmp_path, out_type):
    from gguf import GGUFReader

    from cerbero_ray.cards import GGUF_KEY, gguf_data

    data = {"dedup": {"mode": "exact", "evaluation_sets": {"squad.json": 2}, "evaluation_sha256": {"squad.json": "f"}}}
    template = plain_template(build_tokenizer().chat_template)
    r = convert(hf_dir, str(tmp_path / "m.gguf"), out_type, chat_template=template, data=data)
    assert r["vocabulary"] == "tokenizer.model" and r["tensors"] == 3 + 9 * SHAPE["num_hidden_layers"]
    g = GGUFReader(str(tmp_path / "m.gguf"))

    def val(key):
        f = g.fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()

    assert val("general.architecture") == "llama" and val("llama.block_count") == 2
    assert val("llama.attention.head_count") == 4 and val("llama.attention.head_count_kv") == 2
    assert val("llama.embedding_length") == 256 and val("llama.rope.dimension_count") == 64
    assert val("tokenizer.ggml.model") == "llama" and len(val("tokenizer.ggml.tokens")) == 32000
    assert val("tokenizer.ggml.bos_token_id") == 1 and val("tokenizer.ggml.eos_token_id") == 2
    assert "[|Umano|]" in val("tokenizer.chat_template") and "{%- generation %}" not in val("tokenizer.chat_template")
    # the training data's record: JSON, before the vocabulary (read from the file's first MiB)
    assert json.loads(val(GGUF_KEY)) == data == gguf_data(str(tmp_path / "m.gguf"))
    keys = list(g.fields)
    assert keys.index(GGUF_KEY) < keys.index("tokenizer.ggml.tokens")
    shapes = {t.name: (t.shape.tolist(), t.tensor_type.name) for t in g.tensors}
    q = "F16" if out_type == "f16" else "Q8_0"
    assert shapes["token_embd.weight"] == ([256, 32000], q) and shapes["output_norm.weight"] == ([256], "F32")
    assert shapes["blk.1.attn_k.weight"] == ([256, 128], q) and shapes["blk.0.ffn_down.weight"] == ([512, 256], q)


def test_errors_come_before_any_file(hf_dir, tmp_path):
    for name, change in (("arch", {"model_type": "gpt2"}), ("vocab", {"vocab_size": 32001})):
        bad = tmp_path / name
        shutil.copytree(hf_dir, bad)
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match="model_type 'gpt2'|must agree"):
            convert(str(bad), str(tmp_path / f"{name}.gguf"), "f16")
        assert not list(tmp_path.glob(f"{name}.gguf*"))
    notok = tmp_path / "notok"
    shutil.copytree(hf_dir, notok)
    for f in ("tokenizer.model", "tokenizer.json"):
        os.remove(notok / f)
    with pytest.raises(ValueError, match="no tokenizer"):
        convert(str(notok), str(tmp_path / "n.gguf"), "f16")
    assert not list(tmp_path.glob("n.gguf*"))


def test_config_errors_name_the_key(hf_dir, tmp_path):
    compose("export", [f"export.checkpoint={hf_dir}", "export.types=[f16]"], checked=True)
    for over, key in (
        (["export.types=[q3]"], "export.types"),
        ([f"export.checkpoint={tmp_path}"], "export.checkpoint"),
    ):
        with pytest.raises(ValueError, match=key):
            compose("export", [f"export.checkpoint={hf_dir}", *over], checked=True)
    # into the checkpoint's own folder (however it is written): the files and their card would change it
    for same in (hf_dir, hf_dir + "/", os.path.relpath(hf_dir)):
        with pytest.raises(ValueError, match=r"export.output_dir is export.checkpoint .*: the GGUF files and their"):
            compose("export", [f"export.checkpoint={hf_dir}", f"export.output_dir={same}"], checked=True)
    with pytest.raises(ValueError, match=r"export.output_dir is export.checkpoint \(s3://b/run/hf/\)"):
        compose("export", ["export.checkpoint=s3://b/run/hf/", "export.output_dir=s3://b/run/hf"], checked=True)
    # or inside it (its file list, what label and generate runs record of it, would change too)
    for inside in (f"{hf_dir}/gguf", "s3://b/run/hf/gguf"):
        ck = "s3://b/run/hf" if inside.startswith("s3") else hf_dir
        with pytest.raises(ValueError, match=r"export.output_dir lies in export.checkpoint "):
            compose("export", [f"export.checkpoint={ck}", f"export.output_dir={inside}"], checked=True)
    compose("export", [f"export.checkpoint={hf_dir}", f"export.output_dir={hf_dir}-gguf"], checked=True)  # beside


# ── llama.cpp itself (always in a child process: a native crash fails a test, not the suite) ──────


needs_llama_cpp = pytest.mark.skipif(
    not llamacpp.available(), reason="llama-cpp-python is not installed: pip install -e '.[gguf]' (builds llama.cpp)"
)


@pytest.fixture(scope="module")
def exported(hf_dir, tmp_path_factory):
    if not llamacpp.available():
        pytest.skip("llama-cpp-python is not installed: pip install -e '.[gguf]' (builds llama.cpp)")
    from cerbero_ray.export import run_export

    out = str(tmp_path_factory.mktemp("gguf"))
    res = run_export(
        {
            "paths": PATHS,
            "export": {
                "checkpoint": hf_dir,
                "output_dir": out,
                "name": "tiny",
                "types": ["f32", "f16", "bf16", "q8_0", "q4_k_m"],
                "threads": 2,
                "overwrite": False,
                "verify": True,
                "base": None,
                "lora": True,
            },
        }
    )
    assert "fallback_tensors" not in res["files"]["q4_k_m"]  # 256-wide rows: every tensor is a K-quant
    return {"res": res, **{t: r["path"] for t, r in res["files"].items()}}


@needs_llama_cpp
def test_llama_cpp_build_has_no_amx_kernels():
    """llama.cpp's AMX kernels die with SIGILL on CPUs whose kernel gates AMX per thread: the build
    the README makes (deploy/llama_cpp.cmake) has none, whatever this machine's CPU."""
    info = llamacpp.call("system_info")["info"]
    assert "CPU" in info and "AMX_INT8 = 1" not in info, info


_STUB_TOP = """cmake_minimum_required(VERSION 3.21)
project(llama_cpp C)
option(LLAVA_BUILD "" ON)
set(LLAMA_BUILD_COMMON ON CACHE BOOL "" FORCE)
add_subdirectory(vendor)
"""
_STUB_LLAMA = """cmake_minimum_required(VERSION 3.14...3.28)
project("llama.cpp" C)
option(LLAMA_BUILD_COMMON "" OFF)
if (LLAMA_BUILD_COMMON)
  message(STATUS "STUB: common built")
endif()
get_directory_property(opts COMPILE_OPTIONS)
message(STATUS "STUB: options ${opts}")
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake on this machine")
def test_the_build_include_skips_common_without_llava_and_takes_amx_out(tmp_path):
    """deploy/llama_cpp.cmake on a stub shaped like llama-cpp-python's build (its top project forces
    LLAMA_BUILD_COMMON=ON, then adds llama.cpp's, which builds common when that is on): with
    -DLLAVA_BUILD=OFF common is not built, with the multimodal library on it is; the AMX flags reach
    llama.cpp's directory either way (on x86-64 with a compiler that takes them)."""
    (tmp_path / "src" / "vendor").mkdir(parents=True)
    (tmp_path / "src" / "CMakeLists.txt").write_text(_STUB_TOP)
    (tmp_path / "src" / "vendor" / "CMakeLists.txt").write_text(_STUB_LLAMA)
    include = os.path.join(os.path.dirname(__file__), "..", "deploy", "llama_cpp.cmake")
    said = {}
    for llava in ("OFF", "ON"):
        r = subprocess.run(
            ["cmake", "-S", tmp_path / "src", "-B", tmp_path / llava, f"-DLLAVA_BUILD={llava}",
             f"-DCMAKE_PROJECT_INCLUDE={include}"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        said[llava] = r.stdout
    assert "STUB: common built" not in said["OFF"] and "common library not built" in said["OFF"]
    assert "STUB: common built" in said["ON"] and "common library not built" not in said["ON"]
    if os.uname().machine == "x86_64":
        for out in said.values():
            assert "-mno-amx-int8;-mno-amx-bf16;-mno-amx-tile" in out, out


def test_a_native_crash_is_a_finding_not_the_end(monkeypatch):
    """The child dies from SIGILL (the drill): the caller gets an error naming the signal and the
    build flag, and this process (the test suite) goes on."""
    monkeypatch.setenv(llamacpp.FAULT_ENV, "SIGILL")
    with pytest.raises(llamacpp.NativeCrash, match="SIGILL in system_info.*llama_cpp.cmake") as e:
        llamacpp.call("system_info")
    assert e.value.signal == "SIGILL"
    monkeypatch.setenv(llamacpp.FAULT_ENV, "SIGSEGV")
    with pytest.raises(llamacpp.NativeCrash, match="SIGSEGV in check on m.gguf"):
        llamacpp.call("check", path="m.gguf", prompt="x")


@needs_llama_cpp
def test_a_session_keeps_one_child_and_survives_a_crash(monkeypatch, tmp_path):
    """Evaluation's llama.cpp session: many calls, one child (the model loads once); an error is the
    call's; a child killed by a signal is a NativeCrash and the next call gets a fresh child."""
    with llamacpp.Session() as s:
        assert "CPU" in s.call("system_info")["info"]
        pid = s.proc.pid
        with pytest.raises(RuntimeError, match="llama.cpp metadata on .*missing.gguf: .*Error"):
            s.call("metadata", path=str(tmp_path / "missing.gguf"))
        assert "CPU" in s.call("system_info")["info"] and s.proc.pid == pid  # the same child
        monkeypatch.setenv(llamacpp.FAULT_ENV, "SIGSEGV")
        s.close()  # the drill applies to the next child
        with pytest.raises(llamacpp.NativeCrash, match="SIGSEGV in system_info"):
            s.call("system_info")
        monkeypatch.delenv(llamacpp.FAULT_ENV)
        assert "CPU" in s.call("system_info")["info"] and s.proc.pid != pid
    assert s.proc is None


def test_an_error_in_the_child_names_the_operation(tmp_path):
    with pytest.raises(RuntimeError, match="llama.cpp check on .*missing.gguf: .*Error"):
        llamacpp.call("check", path=str(tmp_path / "missing.gguf"), prompt="x")


def test_the_export_reports_each_files_check(exported):
    """Each file was loaded by llama.cpp and run on the seed's prompt before it took its name."""
    for t in ("f32", "f16", "bf16", "q8_0", "q4_k_m"):
        info = exported["res"]["files"][t]
        c = info["check"]
        assert info["status"] == "checked" and c["ok"] and c["tokens_match"] and c["tokens"] > 10, (t, c)
        assert c["max_logit_diff_rel"] <= c["bound_rel"] and isinstance(c["greedy"], int)
        assert os.path.exists(exported[t]) and not os.path.exists(exported[t] + ".unverified")
    assert exported["res"]["failed"] == []
    assert (
        exported["res"]["files"]["f16"]["check"]["greedy"]
        == exported["res"]["files"]["f16"]["check"]["greedy_transformers"]
    )


@needs_llama_cpp
def test_the_folder_s_card_gives_each_file_s_check_and_its_code_runs_there(exported):
    """``README.md`` beside the files, for the Hub: GGUF metadata, a row per file with what llama.cpp's
    check found, the chat format, and code that opens a file by its name in the folder."""
    import re
    import subprocess
    import sys

    from huggingface_hub import ModelCard

    folder = os.path.dirname(exported["f16"])
    assert exported["res"]["card"] == os.path.join(folder, "README.md")
    card = ModelCard.load(os.path.join(folder, "README.md"))
    assert card.data.language == ["it"] and {"gguf", "llama.cpp"} <= set(card.data.tags)
    for t in ("f32", "f16", "bf16", "q8_0", "q4_k_m"):
        c = exported["res"]["files"][t]["check"]
        name = os.path.basename(exported[t])
        row = next(line for line in card.text.splitlines() if line.startswith(f"| `{name}` | {t} |"))
        assert f"the same {c['tokens']} tokens as transformers; the same greedy next token" in row, row
        assert f"largest logit difference {c['max_logit_diff']:.3g} " in row
    from cerbero_ray.chat import seed_prompt

    assert seed_prompt("AI") in card.text  # the chat format, as the seed's prompt
    code = re.search(r"## Use\n\n```python\n(.*?)```", card.text, re.S)[1]
    assert 'model_path="tiny-Q4_K_M.gguf"' in code  # the folder is what gets published
    r = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.endswith("\n"), r.stderr[-3000:]  # it printed the answer


def test_the_snippet_opens_a_local_file_and_names_a_buckets_copy(tmp_path):
    """llama-cpp-python opens local files only: the snippet of a file in a bucket says how to copy
    it and opens the copy; both are Python a user can paste."""
    import ast

    from cerbero_ray.export.pipeline import _snippet

    here = _snippet(f"file://{tmp_path}/m-F16.gguf", "AI")
    assert f'model_path="{tmp_path}/m-F16.gguf"' in here and "copy" not in here
    there = _snippet("s3://b/run/export/m-Q4_K_M.gguf", "AI")
    assert "aws s3 cp s3://b/run/export/m-Q4_K_M.gguf ." in there and 'model_path="m-Q4_K_M.gguf"' in there
    for code in (here, there):
        ast.parse(code)


@needs_llama_cpp
def test_a_file_that_crashes_llama_cpp_is_failed_not_written(hf_dir, tmp_path, monkeypatch, caplog):
    from cerbero_ray.export import run_export

    caplog.set_level(logging.INFO, logger="cerbero_ray")
    monkeypatch.setenv(llamacpp.FAULT_ENV, "SIGILL")
    x = {"checkpoint": hf_dir, "output_dir": str(tmp_path), "name": "m", "types": ["f16"], "threads": 2}
    res = run_export({"paths": PATHS, "export": {**x, "overwrite": False, "verify": True, "base": None, "lora": True}})
    info = res["files"]["f16"]
    assert res["failed"] == ["f16"] and info["status"] == "failed" and info["check"]["signal"] == "SIGILL"
    assert not (tmp_path / "m-F16.gguf").exists() and (tmp_path / "m-F16.gguf.failed").exists()
    rec = next(r for r in caplog.records if "SIGILL" in r.getMessage())
    line = rec.getMessage()
    assert (
        rec.levelno == logging.WARNING
        and line.startswith("[export] f16: llama.cpp check FAILED")
        and "m-F16.gguf" in line
    )
    assert "llama_cpp.cmake" in line and not res["snippet"]
    monkeypatch.delenv(llamacpp.FAULT_ENV)  # the same command, on a working llama.cpp: written and checked
    res = run_export({"paths": PATHS, "export": {**x, "overwrite": False, "verify": True, "base": None, "lora": True}})
    assert res["failed"] == [] and res["files"]["f16"]["status"] == "checked" and (tmp_path / "m-F16.gguf").exists()


def test_quantizer_fallbacks_are_one_line(exported, tmp_path, caplog):
    """The default tiny model's rows (64 wide) are no multiple of the K-quant block: llama.cpp gives
    those tensors a simpler type and warns once per tensor. The export says so in one line instead."""
    from cerbero_ray.export import run_export

    tiny().save_pretrained(tmp_path / "hf")
    save_tokenizer(build_tokenizer(), str(tmp_path / "hf"))
    caplog.set_level(logging.INFO, logger="cerbero_ray")
    said, warned = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(warned):
        res = run_export(
            {
                "paths": PATHS,
                "export": {
                    "checkpoint": str(tmp_path / "hf"),
                    "output_dir": str(tmp_path / "gguf"),
                    "name": "tiny64",
                    "types": ["q4_k_m"],
                    "threads": 2,
                    "overwrite": False,
                    "verify": False,
                    "base": None,
                    "lora": True,
                },
            }
        )
    info = res["files"]["q4_k_m"]
    assert 0 < info["fallback_tensors"] <= info["tensors"]
    assert "not divisible" not in warned.getvalue() and "fallback" not in warned.getvalue()
    lines = [r.getMessage() for r in caplog.records if "simpler type" in r.getMessage()]
    assert lines == [
        f"[export] q4_k_m: {info['fallback_tensors']} of {info['tensors']} tensors kept a simpler type (q5_0/q8_0): "
        "their rows are not a multiple of the K-quant block (256), as in tiny test models"
    ]
    assert not list((tmp_path / "gguf").glob("*F16*"))  # the f16 file made for the quantizer is gone


def test_llama_cpp_tokenizes_as_hf(exported):
    tok = build_tokenizer()
    got = llamacpp.call("tokenize", path=exported["f16"], texts=SENTENCES)["tokens"]
    for s, ids in zip(SENTENCES, got):
        assert ids == tok(s, add_special_tokens=False).input_ids, s
    bos = llamacpp.call("tokenize", path=exported["f16"], texts=SENTENCES[:1], add_bos=True)["tokens"][0]
    assert bos[0] == tok.bos_token_id


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0", "q4_k_m"])
def test_llama_cpp_logits_match_transformers(exported, hf_dir, out_type):
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    ids = [tok.bos_token_id] + tok(SENTENCES[1], add_special_tokens=False).input_ids
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(hf_dir).eval()(torch.tensor([ids])).logits[0].numpy()
    got = llamacpp.call("logits", path=exported[out_type], ids=ids, threads=2)["logits"].astype(np.float64)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    lp_ref, lp_got = (torch.log_softmax(torch.tensor(x, dtype=torch.float64), -1).numpy() for x in (ref, got))
    kl = (np.exp(lp_ref) * (lp_ref - lp_got)).sum(-1).mean()
    top1 = (got.argmax(-1) == ref.argmax(-1)).mean()
    max_err, max_kl, min_top1 = TOLERANCE[out_type]
    assert err < max_err and kl < max_kl and top1 >= min_top1, f"{out_type}: {err:.2e} {kl:.2e} {top1:.2f}"


def test_a_session_scores_a_longer_prompt_after_a_shorter_one(exported):
    """An evaluation's llama.cpp session keeps its model loaded between batches and loads it again
    for a longer context. A first batch that asks for 550 positions gets a context llama.cpp rounds
    up to 768, but token and logit arrays of 550: the next batch's 700-token prompt overflowed them
    ("could not broadcast input array from shape (46,) into shape (33,)", the README's main job on
    its Q4_K_M file). The answer equals a fresh session's."""
    tok = build_tokenizer()
    text = " ".join(SENTENCES * 40)
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids
    assert len(ids) > 700
    conts = {"yes": tok("sì", add_special_tokens=False).input_ids, "no": tok(" no", add_special_tokens=False).input_ids}
    short, longer = [ids[:540]], [ids[:700], ids[:120]]
    with llamacpp.Session() as s:
        s.call("score_many", path=exported["f16"], prompts=short, continuations=conts)
        got = s.call("score_many", path=exported["f16"], prompts=longer, continuations=conts)["logprobs"]
    with llamacpp.Session() as fresh:
        want = fresh.call("score_many", path=exported["f16"], prompts=longer, continuations=conts)["logprobs"]
    assert len(got) == 2 and all(np.isfinite(r[k]) for r in got for k in conts)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-4, abs=1e-4)


def test_scoring_runs_a_shared_prefix_once_and_answers_as_a_fresh_session(exported):
    """Prompts with the same few-shot examples (an EVALITA unit's) share a long prefix: a prompt runs
    only past what it shares with the tokens the cache holds, its last token always (its logits).
    Every answer equals that prompt scored alone in a fresh session (within llama.cpp's rounding: a
    batch of another size sums in another order): a prompt that diverges early, a shorter one that
    the cache holds whole, the same prompt again."""
    tok = build_tokenizer()
    shots = [tok.bos_token_id] + tok(" ".join(SENTENCES * 8), add_special_tokens=False).input_ids
    tail = [tok(f" Testo {i}: {s}", add_special_tokens=False).input_ids for i, s in enumerate(SENTENCES)]
    prompts = [shots + tail[0], shots + tail[1], shots[:40] + tail[2], shots + tail[1], shots + tail[1], shots[:30]]
    conts = {"yes": tok("sì", add_special_tokens=False).input_ids, "no": tok(" no", add_special_tokens=False).input_ids}
    with llamacpp.Session() as s:
        got = s.call("score_many", path=exported["f16"], prompts=prompts, continuations=conts)
    want_evaluated, held = 0, []  # the first runs whole; each next one past what it shares with the last
    for p in prompts:
        same = next((i for i, (a, b) in enumerate(zip(held, p)) if a != b), min(len(held), len(p)))
        want_evaluated += len(p) - min(same, len(p) - 1)
        held = p + conts["no"][:-1]  # the cache ends with the last label's continuation but its last token
    assert got["prompt_tokens"] == want_evaluated < sum(map(len, prompts)) / 2
    for p, g in zip(prompts, got["logprobs"]):
        with llamacpp.Session() as fresh:
            want = fresh.call("score_many", path=exported["f16"], prompts=[p], continuations=conts)
        assert want["prompt_tokens"] == len(p)
        assert g == pytest.approx(want["logprobs"][0], rel=1e-4, abs=1e-4)
    # the same prompt again, run from the shared examples' end, from token 40, from its last token
    assert got["logprobs"][3] == pytest.approx(got["logprobs"][1], rel=1e-4, abs=1e-4)
    assert got["logprobs"][4] == pytest.approx(got["logprobs"][1], rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("slots", [3, 16])
def test_batched_generation_gives_the_one_at_a_time_tokens(exported, slots):
    """Greedy generation with ``slots`` prompts decoded together (a KV stream each, a finished row's
    slot taking the next prompt, a shared prefix copied from the slot that holds it) gives the tokens
    of one prompt at a time: stop strings and the token limit end the same rows at the same token."""
    tok = build_tokenizer()
    shots = [tok.bos_token_id] + tok(" ".join(SENTENCES * 3), add_special_tokens=False).input_ids
    chat = tok(
        tok.apply_chat_template(
            [{"role": "user", "content": "Ciao, come stai?"}], tokenize=False, add_generation_prompt=True
        ),
        add_special_tokens=False,
    ).input_ids
    tails = [tok(f" {s}", add_special_tokens=False).input_ids for s in SENTENCES]
    prompts = [shots + t for t in tails] + [chat, shots[:20], shots + tails[0], chat] + [shots[:5] + t for t in tails]
    with llamacpp.Session() as s:
        for max_tokens, stop in [(12, []), (40, ["\n"]), (24, ["grazie", "[|Umano|]"])]:
            kw = {"path": exported["f16"], "prompts": prompts, "max_tokens": max_tokens, "stop": stop}
            one = s.call("generate_many", **kw)["tokens"]
            many = s.call("generate_many", **kw, slots=slots)["tokens"]
            assert many == one, (max_tokens, stop)
            assert all(0 < len(t) <= max_tokens for t in one)
            if stop:  # some row ends early at a stop string
                assert any(len(t) < max_tokens for t in one), stop


def test_batched_generation_takes_the_slots_whose_kv_cache_fits_half_the_free_memory():
    """The slots' KV caches are allocated up front: a 7B's 16 slots of 2,048 positions are 4 GiB,
    so slots are cut to what half the free memory holds (fewer than 2: one prompt at a time)."""
    from cerbero_ray.llamacpp import _fit_slots, _kv_bytes_per_cell

    mistral_7b = {
        "llama.block_count": "32",
        "llama.embedding_length": "4096",
        "llama.attention.head_count": "32",
        "llama.attention.head_count_kv": "8",
    }
    cell = _kv_bytes_per_cell(mistral_7b)
    assert cell == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    assert _kv_bytes_per_cell({**mistral_7b, "llama.attention.key_length": "64"}) == cell // 2
    assert _kv_bytes_per_cell({"llama.block_count": "2"}) == 0  # unknown: no cut
    gib = 1 << 30
    assert _fit_slots(16, 2048, cell, 16 * gib) == 16  # 4 GiB of 8
    assert _fit_slots(16, 2048, cell, 4 * gib) == 8  # 2 GiB: 8 slots of 256 MiB
    assert _fit_slots(16, 2048, cell, 300 << 20) == 1
    assert _fit_slots(16, 2048, 0, 300 << 20) == _fit_slots(16, 2048, cell, None) == 16


def test_greedy_continuation_is_identical_for_f16(exported, hf_dir):
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    ids = [tok.bos_token_id] + tok("L'anno scorso, nell'aprile", add_special_tokens=False).input_ids
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :].tolist()
    ours = llamacpp.call("generate", path=exported["f16"], ids=ids, max_tokens=16, threads=2)["tokens"]
    assert ours == hf[: len(ours)] and len(ours) == min(16, len(hf))


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0", "q4_k_m"])
def test_the_seeds_snippet_stops_at_the_user_tag(exported, out_type):
    """Every exported type answers the seed's snippet, as a user runs it, and stops at ``[|Umano|]``."""
    kw = dict(path=exported[out_type], prompt=SEED_PROMPT, max_tokens=24, temperature=0.0)
    free = llamacpp.call("complete", **kw)["text"]
    assert "[|Umano|]" in free, free  # the test model learnt to hand the turn back
    out = llamacpp.call("complete", **kw, stop=["[|Umano|]"])
    assert out["text"] == free[: free.index("[|Umano|]")] and out["finish_reason"] == "stop"


def test_an_adapter_exports_merged_and_as_a_llama_cpp_lora(hf_dir, tmp_path):
    """A LoRA adapter as the checkpoint: the merged model's file, the adapter's own LoRA GGUF and
    its base, llama.cpp loading the pair (the adapter applied at run time) within f16's bound of
    transformers on the merged model; the base alone is not (the check sees a missing adapter)."""
    pytest.importorskip("llama_cpp")
    from cerbero_ray.config import check, to_container
    from cerbero_ray.export import verify
    from cerbero_ray.export.pipeline import run_export
    from conftest import make_adapter

    # all seven projections; the query and key ones need their B rows permuted as the weights are
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = make_adapter(hf_dir, str(tmp_path / "adapter"), 8, targets, 7, build_tokenizer(), b_scale=1.0)
    out = tmp_path / "gguf"
    c = check(
        "export",
        to_container(
            compose("export", [f"export.checkpoint={adapter}", f"export.output_dir={out}", "export.types=[f16]"])
        ),
    )
    res = run_export(c)
    assert not res["failed"], res
    files = res["files"]
    assert set(files) == {"f16", "lora", "base-f16"} and all(f["status"] == "checked" for f in files.values())
    assert sorted(os.listdir(out)) == [
        "README.md",
        "cerbero-F16.gguf",
        "cerbero-LORA-F32.gguf",
        "cerbero-base-F16.gguf",
        "export.json",
    ]
    said = open(out / "README.md").read()  # the pair, named as such in the folder's card
    assert (
        "`cerbero-LORA-F32.gguf` is a LoRA adapter" in said
        and "| `cerbero-base-F16.gguf` | f16, the adapter's base |" in said
    )
    made = json.load(open(out / "export.json"))["files"]["cerbero-LORA-F32.gguf"]["made_from"]
    assert made["checkpoint"] == adapter and made["base"] == hf_dir and made["base_version"]
    pair = files["lora"]["check"]
    assert pair["tokens_match"] and pair["max_logit_diff_rel"] < 1e-2
    # the same reference without the adapter applied fails: the check does see the adapter
    from cerbero_ray.export.pipeline import _merge  # noqa: F401  (the merged folder the reference used)

    merged = tmp_path / "merged"
    from cerbero_ray.models import load_adapted

    m = load_adapted(adapter, "float32")
    m.save_pretrained(merged)
    save_tokenizer(build_tokenizer(), str(merged))
    ref = verify.reference(str(merged), "AI")
    alone = verify.verify(str(out / "cerbero-base-F16.gguf"), "f16", ref)
    assert not alone["ok"] and alone["max_logit_diff_rel"] > 10 * pair["max_logit_diff_rel"]
    with_lora = verify.verify(str(out / "cerbero-base-F16.gguf"), "f16", ref, lora=str(out / "cerbero-LORA-F32.gguf"))
    assert with_lora["ok"]
    # the LoRA file's header: an adapter of the llama architecture with peft's scale as alpha / r
    import gguf

    r = gguf.GGUFReader(str(out / "cerbero-LORA-F32.gguf"))
    kv = {f.name: f for f in r.fields.values()}
    assert bytes(kv["general.type"].parts[-1]).decode() == "adapter"
    assert float(kv["adapter.lora.alpha"].parts[-1][0]) == 16.0  # lora_alpha 2r: scale 2 = 16 / 8
    assert len(r.tensors) == 2 * 7 * SHAPE["num_hidden_layers"]


def test_an_adapter_llama_cpp_cannot_hold_exports_merged_and_a_rerun_keeps_it(hf_dir, tmp_path, caplog):
    """An adapter with a module trained in full (``modules_to_save``) has no llama.cpp LoRA file:
    only the merged model's, said in one line. A rerun keeps that file without merging again (it
    looked for the pair it never writes, and merged on every rerun)."""
    pytest.importorskip("llama_cpp")
    import logging

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cerbero_ray.config import check, to_container
    from cerbero_ray.export.pipeline import run_export
    from cerbero_ray.train.lora import make_record, save_adapter

    torch.manual_seed(3)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir), cfg)
    adapter = str(tmp_path / "adapter")
    save_adapter(pm, build_tokenizer(), make_record(hf_dir, hf_dir), adapter)
    out = tmp_path / "gguf"
    overrides = [f"export.checkpoint={adapter}", f"export.output_dir={out}", "export.types=[f16]"]
    c = check("export", to_container(compose("export", overrides)))
    caplog.set_level(logging.INFO, logger="cerbero_ray.export.pipeline")
    for status in ("checked", "kept"):
        caplog.clear()
        res = run_export(c)
        assert not res["failed"] and set(res["files"]) == {"f16"}, res
        assert res["files"]["f16"]["status"] == status
        said = [r.getMessage() for r in caplog.records]
        assert sum("no LoRA file" in m and "modules trained in full" in m for m in said) == 1, said
        assert sum("merged into" in m for m in said) == (status == "checked"), said
        assert sorted(os.listdir(out)) == ["README.md", "cerbero-F16.gguf", "export.json"]


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_file_is_kept_only_when_made_from_what_the_checkpoint_holds_now(
    tiny_hf, tmp_path, request, where, monkeypatch
):
    """A rerun keeps a GGUF file only when ``export.json`` says it was made from the checkpoint as
    it is now: not one of another checkpoint exported to the same name (whose files may be older
    than the GGUF: times decide nothing), not one of an earlier training under the same path."""
    from cerbero_ray import storage
    from cerbero_ray.export import run_export

    other = tmp_path / "other"
    shutil.copytree(tiny_hf, other)
    tiny(seed=1).save_pretrained(other)  # same shapes and sizes, other weights
    for f in os.listdir(other):  # files older than any GGUF written below
        os.utime(other / f, (1e9, 1e9))
    root = request.getfixturevalue("bucket") if where == "bucket" else str(tmp_path)
    a, b = tiny_hf, str(other)
    if where == "bucket":
        a, b = storage.upload_folder(a, f"{root}/a"), storage.upload_folder(b, f"{root}/b")
    out = f"{root}/gguf"

    def export(ckpt, dest=out):
        x = {"checkpoint": ckpt, "output_dir": dest, "name": "m", "types": ["f16"], "threads": 2}
        res = run_export(
            {"paths": PATHS, "export": {**x, "overwrite": False, "verify": False, "base": None, "lora": True}}
        )
        return res["files"]["f16"]["status"]

    def gguf_bytes(dest=out):
        fs, p = storage.resolve(f"{dest}/m-F16.gguf")
        with fs.open_input_stream(p) as f:
            return f.read()

    assert export(a) == "unchecked" and export(a) == "kept"
    of_a = gguf_bytes()
    assert export(b) == "unchecked"  # another checkpoint to the same name: made again
    assert (
        gguf_bytes() != of_a
        and export(b, f"{root}/gguf-b") == "unchecked"
        and gguf_bytes() == gguf_bytes(f"{root}/gguf-b")
    )
    made = storage.read_json(f"{out}/export.json")["files"]["m-F16.gguf"]["made_from"]
    assert made["checkpoint"] == b and made["version"] == storage.version(b)
    with monkeypatch.context() as m:  # every file kept: nothing downloaded, merged or loaded
        m.setattr(storage, "local_copy", lambda *a, **k: pytest.fail("the checkpoint was copied"))
        assert export(b) == "kept"
    for junk in (b"[1, 2]", b'{"files": [1]}', b'{"files": {"m-F16.gguf": 3}}', b"{cut"):  # not ours: made again
        storage.write_bytes(f"{out}/export.json", junk)
        assert export(b) == "unchecked" and export(b) == "kept"
    # b trained again under its path: made again
    again = tmp_path / "again"
    tiny(seed=2).save_pretrained(again)
    shutil.copy(again / "model.safetensors", other / "model.safetensors")
    if where == "bucket":
        storage.upload_folder(str(other), b)
    assert export(b) == "unchecked" and gguf_bytes() != of_a
    assert export(a) == "unchecked" and gguf_bytes() == of_a
    # the folder's card lists its file, unchecked here; a license the checkpoint's own card gives
    from huggingface_hub import ModelCard

    def card(dest=out):
        fs, p = storage.resolve(f"{dest}/README.md")
        with fs.open_input_stream(p) as f:
            return ModelCard(f.read().decode())

    assert "| `m-F16.gguf` | f16 | " in card().text and "not checked (`export.verify=false`" in card().text
    assert card().data.license is None and "the checkpoint's card gives none" in card().text
    licensed = tmp_path / "licensed"
    shutil.copytree(tiny_hf, licensed)
    # as a training run writes it: a license, and the record of what its data was checked against
    from cerbero_ray.cards import RECORD, data_record, front_matter

    record = data_record({"mode": "exact", "evaluation_sets": {"/d/squad.json": 4}, "ngram": 13, "min_words": 8})
    (licensed / "README.md").write_text("\n".join([*front_matter(license="mit", cerbero_ray=record), "# a", ""]))
    c = storage.upload_folder(str(licensed), f"{root}/c") if where == "bucket" else str(licensed)
    assert export(c, f"{root}/gguf-c") == "unchecked"
    made = card(f"{root}/gguf-c")
    assert made.data.license == "mit" and "gives none" not in made.text
    # the files carry the record (the evaluate stage reads it for a GGUF file) and say it
    assert made.data.to_dict()[RECORD] == record and "## Training data" not in card().text
    assert "| decontamination | checked against `squad.json` (4 dropped)" in made.text
    from cerbero_ray.tracking import training_data_of

    assert training_data_of(f"{root}/gguf-c/m-F16.gguf") == record["data"]
