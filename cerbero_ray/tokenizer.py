"""The Mistral-7B tokenizer with the cerbero chat template: one implementation for every stage.

The tokenizer is the real Mistral-7B v0.1 sentencepiece model (32,000 tokens) that the
`mistral-common` package ships as ``data/tokenizer.model.v1``, converted offline to a HF fast
tokenizer. Its ``chat_template`` is :func:`cerbero_ray.chat.chat_template` (the format, its loss
mask and the stop string are described there): the trainer, the labeler, the evaluator and the
server all go through it, never through a re-implementation.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile

from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

from cerbero_ray.chat import SYSTEM_LINE, chat_template


def mistral_v1_model_file() -> str:
    """Path of the Mistral-7B v0.1 sentencepiece model shipped inside `mistral-common`."""
    import mistral_common

    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is the mistral-common package installed?")
    return path


@functools.lru_cache(maxsize=8)
def build_tokenizer(
    path: str | None = None, assistant_tag: str = "AI", system_line: str = SYSTEM_LINE
) -> PreTrainedTokenizerBase:
    """The HF fast tokenizer with the cerbero chat template.

    ``path=None`` converts mistral-common's ``tokenizer.model.v1``; otherwise ``path`` is a local or
    remote HF directory (a checkpoint of ours, which already carries the template, or any Mistral
    tokenizer, which gets it). Cached per process: workers build it once.
    """
    spm = None  # the sentencepiece model behind the tokenizer, when there is one: saved beside it
    if path is None:
        spm = mistral_v1_model_file()
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(spm, os.path.join(tmp, "tokenizer.model"))
            # legacy=True prepends "▁" after special tokens too, as sentencepiece and the released
            # Mistral tokenizer do: "<s>Questa" -> ["<s>", "▁Qu", "esta"].
            tok = LlamaTokenizer.from_pretrained(tmp, legacy=True, add_bos_token=True)
    else:
        from cerbero_ray.storage import local_copy

        local = local_copy(path)
        tok = AutoTokenizer.from_pretrained(local, trust_remote_code=False)
        spm = os.path.join(local, "tokenizer.model") if os.path.isfile(os.path.join(local, "tokenizer.model")) else None
    tok.sentencepiece_file = spm
    if not tok.is_fast:
        raise ValueError(f"tokenizer at {path!r} has no fast (Rust) implementation")
    tok.chat_template = chat_template(assistant_tag, system_line)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token  # Mistral has no pad token; padding is always label -100
    return tok


def save_tokenizer(tok: PreTrainedTokenizerBase, directory: str) -> None:
    """``save_pretrained`` (``tokenizer.json``, the chat template), plus ``tokenizer.model`` when the
    tokenizer came from a sentencepiece model, so that converters that want it (llama.cpp's, ours
    for GGUF) find it."""
    tok.save_pretrained(directory)
    spm = getattr(tok, "sentencepiece_file", None)
    if spm and os.path.isfile(spm) and not os.path.exists(os.path.join(directory, "tokenizer.model")):
        shutil.copy(spm, os.path.join(directory, "tokenizer.model"))


def tokenizer_hash(tok: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary, merges, special tokens and chat template."""
    h = hashlib.sha256(tok.backend_tokenizer.to_str().encode())
    h.update((tok.chat_template or "").encode())
    return h.hexdigest()[:16]
