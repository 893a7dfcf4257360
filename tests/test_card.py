"""The model card a training run writes into ``hf/`` and ``adapter/`` (cerbero_ray.train.card): Hub
metadata that the Hub's own parser reads back, ``train.card`` checked before Ray starts, and a
"Use" section whose code runs as written on the folder it sits in. The cards of real runs: the main
job's (tests/test_recipe.py) and a LoRA run's (tests/test_train.py)."""

import os
import re
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from cerbero_ray.cards import RECORD, data_checks, data_record
from cerbero_ray.config import check, compose
from cerbero_ray.train.card import CARD, EXAMPLE, card_text

MANIFEST = {
    "documents": 107,
    "documents_by_source": {"chat": 107},
    "rows": 67,
    "seq_len": 512,
    "tokens": 33524,
    "loss_tokens": 26896,
    "loss_on": "assistant",
    "dedup": {"mode": "exact", "documents": 109, "duplicates": 2, "near_duplicates": 0, "contaminated": 0},
}


def summary(**extra):
    return {
        "steps": 8,
        "first_loss": 10.41,
        "final_loss": 7.25,
        "eval_losses": [10.4, 8.1, 7.3],
        "train_s": 12.5,
        "tokens_per_s_median": 2100.0,
        "total_params": 4_718_592,
        **extra,
    }


def config(tmp_path, *over):
    return OmegaConf.to_object(
        compose("train", [f"paths.output_dir={tmp_path}", f"train.data_dir={tmp_path}", "train.name=demo", *over])
    )


@pytest.mark.parametrize(
    "over, says",
    [
        ("train.card.license='Apache 2.0'", r"train.card.license: 'Apache 2.0' is not a Hub license id"),
        ("train.card.base_model=/ckpts/mistral-7b", r"train.card.base_model: '/ckpts/mistral-7b' is not a Hub model"),
        ("train.card.base_model=s3://b/mistral", r"train.card.base_model: 's3://b/mistral' is not a Hub model"),
        ("train.card.base_model=a/../b", r"train.card.base_model: 'a/../b' is not a Hub model"),
    ],
)
def test_a_card_setting_the_hub_would_not_read_is_named_before_ray_starts(tmp_path, over, says):
    with pytest.raises(ValueError, match=says):
        check("train", compose("train", [f"paths.output_dir={tmp_path}", over]))
    ok = ["train.card.license=cc-by-nc-sa-4.0", "train.card.base_model=mistralai/Mistral-7B-v0.1"]
    check("train", compose("train", [f"paths.output_dir={tmp_path}", *ok]))


def _use(card: str) -> str:
    """The card's "Use" code."""
    return re.search(r"## Use\n\n```python\n(.*?)```", card, re.S)[1]


def _run_in(folder: str, code: str) -> int:
    """Runs ``code`` in ``folder``; how many tokens its ``model.generate`` added."""
    code += '\nprint("NEW", out.shape[1] - ids.shape[1])\n'
    r = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return int(r.stdout.rsplit("NEW ", 1)[1])


def test_the_card_s_metadata_reads_back_and_its_code_runs_on_its_folder(tmp_path, tiny_hf, tok):
    from huggingface_hub import ModelCard

    folder = str(tmp_path / "hf")
    shutil.copytree(tiny_hf, folder)
    c = config(tmp_path, "train.card.license=apache-2.0", "train.card.base_model=mistralai/Mistral-7B-v0.1")
    prompt = tok.apply_chat_template(EXAMPLE, tokenize=False, add_generation_prompt=True)
    text = card_text(c, summary(), MANIFEST, prompt)
    open(os.path.join(folder, CARD), "w").write(text)
    data = ModelCard.load(os.path.join(folder, CARD)).data  # the Hub's parser
    assert data.language == ["it"] and data.license == "apache-2.0" and data.library_name == "transformers"
    assert data.base_model == "mistralai/Mistral-7B-v0.1" and data.pipeline_tag == "text-generation"
    assert {"cerbero-ray", "full-fine-tune"} <= set(data.tags)
    assert prompt.rstrip("\n") in text  # the chat format, as the template writes it
    assert "| method | full fine-tune, DeepSpeed ZeRO-1 |" in text
    assert "| data | 107 documents (`chat` (107)) packed into 67 rows of 512 tokens" in text
    assert "| training | 10.4100 | 7.2500 |" in text
    # what the data stage checked: whether a benchmark figure of this model means something
    assert "| deduplication | `exact`: 2 exact duplicate(s) of 109 documents dropped |" in text
    assert "| decontamination | none: the data was not checked against any evaluation set |" in text
    counts = {"mode": "near", "documents": 109, "duplicates": 2, "near_duplicates": 3, "ngram": 13, "min_words": 8}
    checked = {**counts, "evaluation_sets": {"s3://b/evals/squad.json": 4, "/data/evalita/ironita.csv": 0}}
    checked["evaluation_sha256"] = {
        "s3://b/evals/squad.json": "0123456789012345",
        "/data/evalita/ironita.csv": "ab" * 8,
    }
    text = card_text(c, summary(), {**MANIFEST, "dedup": checked}, prompt)
    assert "| deduplication | `near`: 2 exact and 3 near duplicate(s) of 109 documents dropped |" in text
    # the same in the metadata, for the evaluate stage wherever the folder goes: each file by its name
    # (no bucket or folder of the user's in a card), its contents' hash (a string, though all digits)
    record = ModelCard(text).data.to_dict()[RECORD]["data"]["dedup"]
    assert record == {
        **counts,
        "evaluation_sets": {"squad.json": 4, "ironita.csv": 0},
        "evaluation_sha256": {"squad.json": "0123456789012345", "ironita.csv": "ab" * 8},
    }
    assert "s3://" not in text.split("---")[1]
    twins = {"evaluation_sets": {"s3://b/x/a/test.json": 1, "/data/b/test.json": 2, "/data/a/test.json": 3}}
    assert data_record(twins)["data"]["dedup"][
        "evaluation_sets"
    ] == {  # one name twice: with their folders (as many as tell them all apart)
        "x/a/test.json": 1,
        "data/b/test.json": 2,
        "data/a/test.json": 3,
    }
    twin_row = "checked against `x/a/test.json` (1 dropped), `data/b/test.json` (2 dropped), `data/a/test.json` (3"
    assert twin_row in data_checks(twins)[-1]  # the card's row tells them apart as the record does
    assert twin_row in data_checks(data_record(twins)["data"]["dedup"])[-1]  # the GGUF card: from the record
    assert (
        data_record(None) is None
        and RECORD not in ModelCard(card_text(c, summary(), MANIFEST | {"dedup": None}, prompt)).data.to_dict()
    )
    assert (
        "| decontamination | checked against `squad.json` (4 dropped), `ironita.csv` (0 dropped): a document "
        "sharing a 13-word passage or a whole text of 8+ words with one is dropped |" in text
    )
    text = card_text(c, summary(), {**MANIFEST, "dedup": {"mode": "none"}}, prompt)
    assert "| deduplication | none (`data.dedup=none`) |" in text and "| decontamination | none:" in text
    assert "| deduplication" not in card_text(c, summary(), {**MANIFEST, "dedup": None}, prompt)  # an older manifest
    assert f"| held-out ({c.train.eval_rows} rows never trained on) | 10.4000 | 7.3000 |" in text
    assert "License: not set" not in text
    assert 0 < _run_in(folder, _use(text)) <= 64  # loads the folder and answers

    bare = card_text(config(tmp_path), summary(), None, prompt)  # no train.card, no manifest
    data = ModelCard(bare).data
    assert data.license is None and data.base_model is None
    assert "License: not set (`train.card.license`)" in bare and "| data | 0 documents (–)" in bare


def test_an_adapter_s_card_loads_it_on_its_base(tmp_path, tiny_hf, tiny_adapters, tok):
    from huggingface_hub import ModelCard

    folder = str(tmp_path / "adapter")
    shutil.copytree(tiny_adapters["sentiment-it"], folder)
    c = config(tmp_path, "train.method=lora", "train.lora.r=4")
    prompt = tok.apply_chat_template(EXAMPLE, tokenize=False, add_generation_prompt=True)
    text = card_text(c, summary(base=tiny_hf), MANIFEST, prompt, kind="adapter")
    open(os.path.join(folder, CARD), "w").write(text)
    data = ModelCard.load(os.path.join(folder, CARD)).data
    assert data.library_name == "peft" and "lora" in data.tags
    assert "| method | LoRA r=4, alpha=32" in text and "a LoRA adapter (rank 4, alpha 32) on a random-init" in text
    assert f'base = "{tiny_hf}"' in _use(text)
    assert 0 < _run_in(folder, _use(text)) <= 64
    merged = card_text(c, summary(base=tiny_hf), MANIFEST, prompt, kind="hf")  # train.lora.merge=true's hf/
    assert ModelCard(merged).data.library_name == "transformers" and "merged into its base" in merged
    assert "PeftModel" not in _use(merged)


def test_the_gguf_card_carries_the_checkpoint_card_s_record_and_ignores_a_junk_one():
    """The export folder's card takes the checkpoint card's license and data record (the evaluate
    stage reads it for a GGUF file); a record of another shape (a hand-edited card) is left out, never
    a crash at the end of an export."""
    from huggingface_hub import ModelCard

    from cerbero_ray.cards import data_of
    from cerbero_ray.export.card import gguf_card

    files = {"m-F16.gguf": {"type": "f16", "bytes": 2**20, "status": "unchecked"}}
    dedup = {"mode": "exact", "documents": 9, "duplicates": 1, "ngram": 13, "min_words": 8}
    good = data_record(
        {**dedup, "evaluation_sets": {"/d/squad.json": 2}, "evaluation_sha256": {"/d/squad.json": "f" * 16}}
    )
    text = gguf_card("m", "/ckpt", files, "print(1)", "<s>", {"license": "mit", RECORD: good})
    assert ModelCard(text).data.license == "mit" and data_of(ModelCard(text).data.to_dict()) == good["data"]
    assert "## Training data" in text and "| decontamination | checked against `squad.json` (2 dropped)" in text
    junk = [
        [1],
        {"data": [1]},
        {"data": {"dedup": "exact"}},
        {"data": {"dedup": {**dedup, "duplicates": "one"}}},
        {"data": {"dedup": {**dedup, "evaluation_sets": {"squad.json": "2"}}}},
        {"data": {"dedup": {**dedup, "evaluation_sha256": ["f" * 16]}}},
    ]
    for bad in junk:
        text = gguf_card("m", "/ckpt", files, "print(1)", "<s>", {RECORD: bad})
        assert RECORD not in ModelCard(text).data.to_dict() and "## Training data" not in text, bad
        assert "| `m-F16.gguf` | f16 | 1.0 MiB |" in text
