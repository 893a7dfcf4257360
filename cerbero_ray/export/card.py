"""The card (``README.md``) of an export folder, as the Hugging Face Hub reads a GGUF repository: its
metadata (``huggingface_hub.ModelCardData``: language, the checkpoint card's license, ``gguf``
tags), each file with llama.cpp's check of it, the chat format and the code that opens a file. It is
written from ``export.json`` (every file in the folder, kept ones too) at the end of each run."""

from __future__ import annotations

from cerbero_ray.cards import CARD, RECORD, chat_and_use, data_checks, data_of, front_matter  # noqa: F401 (CARD: named here too)

SHOWN = {"lora": "LoRA adapter (f32)", "base-f16": "f16, the adapter's base"}  # an adapter's pair, by its record's type


def check_line(rec: dict) -> str:
    """What llama.cpp's check of a file found, in a table cell."""
    c = rec.get("check")
    if rec.get("status") != "checked":
        return "not checked (`export.verify=false`, or no llama-cpp-python)"
    if not c:
        return "checked"
    greedy = "the same" if c["greedy_same"] else "another"
    return (
        f"the same {c['tokens']} tokens as transformers; {greedy} greedy next token; largest logit "
        f"difference {c['max_logit_diff']:.3g} ({100 * c['max_logit_diff_rel']:.2g}% of the largest)"
    )


def gguf_card(name: str, checkpoint: str, records: dict, snippet: str, prompt: str, source: dict) -> str:
    """The export folder's card: ``records`` ``export.json``'s files, ``snippet`` the code that
    opens one (its path the file's name: the folder is what gets published), ``prompt`` the seed's
    prompt in the chat format, ``source`` the checkpoint card's metadata (:func:`cerbero_ray.cards.card_metadata`:
    its license and the training data's record are the files' too)."""
    meta = dict(
        language=["it"],
        license=source.get("license"),
        pipeline_tag="text-generation",
        tags=["cerbero-ray", "italian", "mistral", "gguf", "llama.cpp", "conversational"],
    )
    if (data := data_of(source)) is not None:  # what the checkpoint's data was checked against
        meta[RECORD] = {"data": data}
    rows = [
        f"| `{f}` | {SHOWN.get(r.get('type'), r.get('type'))} | {(r.get('bytes') or 0) / 2**20:,.1f} MiB "
        f"| {check_line(r)} |"
        for f, r in sorted(records.items())
        if r.get("status") != "failed"
    ]
    pair = [f for f, r in records.items() if r.get("type") == "lora"]
    lines = [
        *front_matter(**meta),
        f"# {name} (GGUF)",
        "",
        f"GGUF files of `{checkpoint}` for llama.cpp, written by cerbero-ray's export stage. Each was loaded "
        "by llama.cpp and run on the cerbero-7b prompt beside transformers before it took its name.",
        "",
        "| file | type | size | llama.cpp's check |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    if pair:
        lines += [
            f"`{pair[0]}` is a LoRA adapter: llama.cpp applies it at load time to the base file beside it "
            "(`Llama(model_path=<the -base- file>, lora_path=<the -LORA- file>)`), checked as a pair.",
            "",
        ]
    lines += [
        *chat_and_use("", prompt, [snippet]),
        "llama.cpp's own tools open the same files (`llama-cli -m <file>`, `llama-server -m <file>`).",
        "",
    ]
    if checks := data_checks((data or {}).get("dedup")):
        lines += ["## Training data", "", "As the checkpoint's card records it:", "", "| | |", "|---|---|", *checks, ""]
    if meta["license"] is None:
        lines += ["License: the checkpoint's card gives none: its base model's terms and its data's decide it.", ""]
    return "\n".join(lines)
