"""Each exported file, checked by llama.cpp itself before it counts as written.

llama.cpp loads the file in a child process (:mod:`cerbero_ray.llamacpp`) and runs one forward pass
on the seed's prompt; transformers runs the same prompt on the checkpoint once. A file passes when
llama.cpp tokenizes the prompt as transformers does and its logits are finite and within a bound of
transformers' (the largest difference relative to the largest logit: tight for the float types,
loose for the quantized ones, whose error is expected). The report gives, per file: the tokens
agree, the greedy next token of both, the largest logit difference. A crash (a signal) fails the
file with the signal and the build flag named.
"""

from __future__ import annotations

import numpy as np

from cerbero_ray import llamacpp
from cerbero_ray.chat import seed_prompt

# the largest |llama.cpp - transformers| logit difference, relative to the largest |logit|, that a
# sound file stays under. Measured on the test model (tests/test_export.py): f32 2.8e-4, f16 5.2e-4,
# bf16 4.1e-3, q8_0 9.2e-3, Q4_K_M 0.23; the bounds leave room for other models and say "broken"
# (a wrong permutation or type gives differences of the size of the logits themselves).
BOUND = {"f32": 1e-2, "f16": 1e-2, "bf16": 5e-2, "q8_0": 0.1}
QUANT_BOUND = 1.0  # K-quants


def reference(folder: str, tag: str) -> dict:
    """transformers on the seed's prompt (with BOS): its tokens and every position's logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = seed_prompt(tag)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(prompt, add_special_tokens=False).input_ids
    if tok.bos_token_id is not None:
        ids = [tok.bos_token_id] + ids
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
    del model
    return {"prompt": prompt, "tokens": ids, "logits": logits, "decode": tok.decode}


def verify(path: str, out_type: str, ref: dict, threads: int = 0, lora: str | None = None) -> dict:
    """llama.cpp's check of one file (with the LoRA file ``lora`` applied, checked against the
    merged model's ``ref``) against ``ref``: a dict with ``ok`` and the figures (or ``error``)."""
    try:
        got = llamacpp.call("check", path=path, prompt=ref["prompt"], threads=threads, lora=lora)
    except llamacpp.NativeCrash as e:
        return {"ok": False, "signal": e.signal, "error": str(e)}
    except RuntimeError as e:
        return {"ok": False, "error": str(e)}
    if got["tokens"] != ref["tokens"]:
        return {
            "ok": False,
            "tokens_match": False,
            "error": f"llama.cpp tokenizes the seed's prompt as {len(got['tokens'])} tokens, "
            f"transformers as {len(ref['tokens'])}; first difference at position "
            f"{next((i for i, (a, b) in enumerate(zip(got['tokens'], ref['tokens'])) if a != b), 0)}",
        }
    ours, theirs = got["logits"].astype(np.float64), ref["logits"].astype(np.float64)
    finite = bool(np.isfinite(ours).all())
    diff = float(np.abs(ours - theirs).max()) if finite else float("inf")
    rel = diff / max(float(np.abs(theirs).max()), 1e-12)
    bound = BOUND.get(out_type, QUANT_BOUND)
    res = {
        "ok": finite and rel <= bound,
        "tokens_match": True,
        "tokens": len(ref["tokens"]),
        "greedy": int(ours[-1].argmax()) if finite else None,
        "greedy_transformers": int(theirs[-1].argmax()),
        "max_logit_diff": round(diff, 6),
        "max_logit_diff_rel": round(rel, 6),
        "bound_rel": bound,
    }
    if not finite:
        res["error"] = "llama.cpp's logits are not all finite"
    elif rel > bound:
        res["error"] = f"the largest logit difference is {rel:.3g} of the largest logit (bound {bound})"
    return res


def describe(check: dict, decode) -> str:
    """One line for the console."""
    if "tokens_match" not in check or not check["tokens_match"] or check.get("greedy") is None:
        return f"llama.cpp check FAILED: {check['error']}"
    same = (
        "same" if check["greedy"] == check["greedy_transformers"] else f"transformers: {check['greedy_transformers']}"
    )
    verdict = "ok" if check["ok"] else f"FAILED: {check['error']}"
    return (
        f"llama.cpp check {verdict}: the same {check['tokens']} tokens as transformers, greedy next token "
        f"{check['greedy']} {decode([check['greedy']])!r} ({same}), largest logit difference "
        f"{check['max_logit_diff']:.4g} ({100 * check['max_logit_diff_rel']:.2g}% of the largest logit)"
    )
