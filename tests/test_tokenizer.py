import json
import os

import numpy as np
import pytest

from cerbero_ray.chat import SYSTEM_LINE, chat_template
from cerbero_ray.tokenizer import build_tokenizer, mistral_v1_model_file, tokenizer_hash

CONV = [
    {"role": "user", "content": "Ciao!"},
    {"role": "assistant", "content": "Ciao, come posso aiutarti?"},
    {"role": "user", "content": "Dove si trova Roma?"},
    {"role": "assistant", "content": "In Italia."},
]


def test_real_vocab_and_special_tokens(tok):
    assert len(tok) == 32000
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok("ciao").input_ids[0] == 1  # BOS added, as Mistral's tokenizer does


def test_matches_sentencepiece(tok):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=mistral_v1_model_file())
    texts = [
        json.loads(line)["text"]
        for line in open(os.path.join(os.path.dirname(__file__), "..", "data", "samples", "novels_it_sample.jsonl"))
    ]
    texts += ["Questa è una conversazione.\n[|Umano|] Perché? Così!", "àèìòù «citazione» — fine"]
    for t in texts:
        assert tok(t, add_special_tokens=False).input_ids == sp.encode(t)
    # runs of spaces split differently (a known HF-vs-sentencepiece difference, shared by the
    # released Mistral tokenizer.json) but still round-trip exactly
    for t in ["Perché?  Così!", "a   b"]:
        assert tok.decode(tok(t, add_special_tokens=False).input_ids) == t


def test_template_renders_cerbero_format(tok):
    text = tok.apply_chat_template(CONV, tokenize=False)
    assert text == (
        f"<s>{SYSTEM_LINE}\n[|Umano|] Ciao!\n[|AI|] Ciao, come posso aiutarti?\n"
        "[|Umano|] Dove si trova Roma?\n[|AI|] In Italia.\n</s>"
    )
    prompt = tok.apply_chat_template(CONV[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"<s>{SYSTEM_LINE}\n[|Umano|] Ciao!\n[|AI|]"


def test_assistente_tag_and_system_override():
    tok = build_tokenizer(None, "Assistente")
    sys_conv = [{"role": "system", "content": "Rispondi in breve."}] + CONV[:2]
    assert tok.apply_chat_template(sys_conv, tokenize=False) == (
        "<s>Rispondi in breve.\n[|Umano|] Ciao!\n[|Assistente|] Ciao, come posso aiutarti?\n</s>"
    )
    with pytest.raises(ValueError, match="assistant_tag"):
        chat_template("Bot")


def test_assistant_mask_is_exactly_the_answers(tok):
    enc = tok.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = np.array(enc["input_ids"]), np.array(enc["assistant_masks"], dtype=bool)
    trained = tok.decode(ids[mask])
    assert trained.replace(" ", "") == "Ciao,comepossoaiutarti?\nInItalia.\n</s>".replace(" ", "")
    untrained = tok.convert_ids_to_tokens(ids[~mask].tolist())
    assert "</s>" not in untrained and untrained[0] == "<s>"
    # the tag tokens of every turn are masked: "[|AI|]" appears twice, "[|Umano|]" twice, none trained
    assert tok.decode(ids[~mask]).count("[|AI|]") == 2 and tok.decode(ids[mask]).count("[|") == 0
    # the whole-conversation tokens are the same either way: one implementation
    assert ids.tolist() == tok(tok.apply_chat_template(CONV, tokenize=False), add_special_tokens=False).input_ids


def test_hash_tracks_template():
    assert tokenizer_hash(build_tokenizer()) == tokenizer_hash(build_tokenizer())
    assert tokenizer_hash(build_tokenizer(None, "AI")) != tokenizer_hash(build_tokenizer(None, "Assistente"))


def test_hf_folder_roundtrip(tmp_path, tok):
    tok.save_pretrained(tmp_path)
    again = build_tokenizer(str(tmp_path))
    assert again.apply_chat_template(CONV, tokenize=False) == tok.apply_chat_template(CONV, tokenize=False)
    assert again("Buongiorno a tutti").input_ids == tok("Buongiorno a tutti").input_ids
