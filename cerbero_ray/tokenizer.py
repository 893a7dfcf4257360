"""The Mistral-7B tokenizer with the cerbero chat template: one implementation for every stage.

The tokenizer is the real Mistral-7B v0.1 sentencepiece model (32,000 tokens) that the
`mistral-common` package ships as ``data/tokenizer.model.v1``, converted offline to a HF fast
tokenizer. Its ``chat_template`` is :func:`cerbero_ray.chat.chat_template` (the format, its loss
mask and the stop string are described there): the trainer, the labeler, the evaluator and the
server all go through it, never through a re-implementation.

Text becomes token ids here only, by three functions: :func:`encode_plain` (content),
:func:`encode_prompts` (rendered prompts, with the truncation that keeps the system line) and
:func:`encode_chats` (whole conversations, with the loss mask). In all three a special-token string
inside text — ``<s>`` or ``</s>`` in web text (HTML strike-through) or in a user's message — stays
plain text; BOS and EOS are only ever the ids the format puts there.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import os
import re
import shutil
import tempfile
import threading

# AutoTokenizer only where a folder is read: its import loads torch (~1 s, ~175 MB per process), which
# the data stage's packing actors never need
from transformers import LlamaTokenizer, PreTrainedTokenizerBase

from cerbero_ray.chat import ASSISTANT_TAGS, SYSTEM_LINE, USER_TAG, chat_template


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
        from transformers import AutoTokenizer

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


# Writes to a Rust tokenizer's settings (padding, truncation, encode_special_tokens) take it
# mutably: on tokenizers < 0.23 one made while another thread encodes with it (a server's requests)
# raises "RuntimeError: Already borrowed". So they are made only when a setting is wrong, which after
# a tokenizer's first use it is not, and one at a time.
_SETTING = threading.Lock()


def plain_backend(tok: PreTrainedTokenizerBase, special_as_text: bool = False):
    """``tok``'s Rust tokenizer with padding and truncation off (and ``encode_special_tokens`` on
    when ``special_as_text``).

    Both are state on the backend that every user of the tokenizer shares: a padded or truncating
    ``tok(...)`` call leaves them on (transformers sets them per call, for its own calls), and a
    checkpoint's ``tokenizer.json`` may carry them. Read through the backend directly, they would
    pad or cut every text after them, in whatever process made that one call: silently wrong ids.
    Turning them off is what transformers' own next unpadded call does."""
    backend = tok.backend_tokenizer

    def wrong():
        return (
            backend.padding is not None
            or backend.truncation is not None
            or (special_as_text and not backend.encode_special_tokens)
        )

    if wrong():
        with _SETTING:
            if backend.padding is not None:
                backend.no_padding()
            if backend.truncation is not None:
                backend.no_truncation()
            if special_as_text and not backend.encode_special_tokens:
                backend.encode_special_tokens = True
    return backend


def save_tokenizer(tok: PreTrainedTokenizerBase, directory: str) -> None:
    """``save_pretrained`` (``tokenizer.json``, the chat template), plus ``tokenizer.model`` when the
    tokenizer came from a sentencepiece model, so that converters that want it (llama.cpp's, ours
    for GGUF) find it. The file holds no padding or truncation (:func:`plain_backend`)."""
    if tok.is_fast:
        plain_backend(tok)
    tok.save_pretrained(directory)
    spm = getattr(tok, "sentencepiece_file", None)
    if spm and os.path.isfile(spm) and not os.path.exists(os.path.join(directory, "tokenizer.model")):
        shutil.copy(spm, os.path.join(directory, "tokenizer.model"))


def tokenizer_hash(tok: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary, merges, special tokens and chat template (not of the padding
    or truncation a call left on: :func:`plain_backend`)."""
    h = hashlib.sha256(plain_backend(tok).to_str().encode())
    h.update((tok.chat_template or "").encode())
    return h.hexdigest()[:16]


def render_chat(tok: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    """A chat as the prompt the model answers: the turns and the assistant's tag. An assistant
    message last is a prefill: its turn is left open (no newline, no end of text) and the answer
    continues it."""
    if messages and messages[-1]["role"] == "assistant":
        head = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        return head + " " + messages[-1]["content"]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_plain(tok: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` as plain text: no BOS/EOS added, special-token strings kept as text.

    The Rust backend directly (no offsets, no Python-side encodings: 1.5x faster than ``tok()``),
    with padding and truncation off (:func:`plain_backend`). Its ``encode_special_tokens`` flag is
    state shared by every caller of the tokenizer; every encode in this project sets it on (here,
    or through transformers' ``split_special_tokens=True``), so it never goes off under a concurrent
    call, and it is written only when it is off (concurrent calls never write: see ``_SETTING``).
    """
    if not texts:
        return []
    if not tok.is_fast:  # a Python tokenizer (an encoder for dedup embeddings, say)
        return tok(list(texts), add_special_tokens=False, split_special_tokens=True).input_ids
    backend = plain_backend(tok, special_as_text=True)
    return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]


def encode_chats(
    tok: PreTrainedTokenizerBase, conversations: list[list[dict]], *, add_generation_prompt: bool = False
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and assistant masks (1 where the loss goes) of whole conversations in the chat format.

    The template is rendered with empty BOS/EOS strings and the text encoded plain; the ids of BOS
    (mask 0) and of the EOS that ends a conversation's last answer (mask 1, inside the answer) are
    then put where the template writes them. The ids equal the template's own tokenization whenever
    the content holds no special-token string.
    """
    if not conversations:
        return [], []
    enc = tok.apply_chat_template(
        conversations,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        add_generation_prompt=add_generation_prompt,
        bos_token="",
        eos_token="",
        tokenizer_kwargs={"split_special_tokens": True},
    )
    bos, ids_out, masks_out = _bos(tok), [], []
    for conv, ids, mask in zip(conversations, enc["input_ids"], enc["assistant_masks"]):
        ends = not add_generation_prompt and conv and conv[-1].get("role") == "assistant"
        ids_out.append([*bos, *ids, *([tok.eos_token_id] if ends else [])])
        masks_out.append([0] * len(bos) + [*mask, *([1] if ends else [])])
    return ids_out, masks_out


def _bos(tok: PreTrainedTokenizerBase) -> list[int]:
    """``[bos_token_id]``, or ``[]`` for a tokenizer without one (the template writes none then)."""
    return [] if tok.bos_token_id is None else [tok.bos_token_id]


_TURN = re.compile("\n(?=" + "|".join(re.escape(t) for t in (USER_TAG, *ASSISTANT_TAGS.values())) + ")")


def encode_prompts(
    tok: PreTrainedTokenizerBase, prompts: list[str], max_tokens: int | None = None
) -> tuple[list[list[int]], list[bool]]:
    """Token ids of rendered prompts, and whether each was truncated.

    Every prompt starts with BOS (when the tokenizer has one): a leading ``bos_token`` string (the
    chat template writes one) is that BOS; the rest is plain text (:func:`encode_plain`). A prompt
    over ``max_tokens`` keeps its head (BOS and the system line) and drops whole exchanges (a user
    turn and its answer) from its start — the oldest, few-shot examples first — until it fits;
    should the last user turn alone not fit, the head is followed by the prompt's last tokens
    (where the answer starts).
    """
    bos = tok.bos_token or ""
    bodies = [p[len(bos) :] if bos and p.startswith(bos) else p for p in prompts]
    head = _bos(tok)
    ids = [[*head, *x] for x in encode_plain(tok, bodies)]
    cut = [max_tokens is not None and len(x) > max_tokens for x in ids]
    for i in (i for i, c in enumerate(cut) if c):
        ids[i] = [*head, *_fit(tok, bodies[i], max_tokens - len(head))]
    return ids, cut


def _fit(tok: PreTrainedTokenizerBase, body: str, budget: int) -> list[int]:
    """``body``'s tokens within ``budget``: the head up to the first turn, then the exchanges from the
    latest user turn that fits on (without the head when only that fits), else the head and the last
    tokens."""
    enc = tok(body, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    ids, starts = enc.input_ids, [a for a, _ in enc.offset_mapping]
    turns = [(bisect.bisect_left(starts, m.end()), body.startswith(USER_TAG, m.end())) for m in _TURN.finditer(body)]
    first = turns[0][0] if turns else 0
    for head in dict.fromkeys((first, 0)):
        for t in (t for t, user in turns if user and t > head):  # a user turn: its answer goes with it
            if head + len(ids) - t <= budget:
                return ids[:head] + ids[t:]
    head = first if first <= budget // 2 else 0
    return ids[:head] + ids[len(ids) - (budget - head) :]


CUT_MARGIN = 64  # tokens past the budget whose text a head or a tail keeps


@functools.lru_cache(maxsize=8)
def longest_piece(tok: PreTrainedTokenizerBase) -> int:
    """The most characters one token of ``tok`` stands for (its longest vocabulary entry: a byte
    token's ``<0x0A>`` or a byte-level BPE entry is longer than what it decodes to, never shorter)."""
    return max(map(len, tok.get_vocab()))


def cut_chars(max_tokens: int, tok: PreTrainedTokenizerBase) -> int:
    """Characters that hold more than ``max_tokens`` tokens of any text: ``(max_tokens +
    CUT_MARGIN) * longest_piece`` (no token stands for more characters)."""
    return (max_tokens + CUT_MARGIN) * longest_piece(tok)


def text_head(text: str, max_tokens: int, tok: PreTrainedTokenizerBase) -> str:
    """The start of ``text`` that holds its first ``max_tokens`` tokens and more (:func:`cut_chars`),
    cut at the last whitespace of its second half, where the tokenizers' words end (the tokens before
    a word's end are those of the whole text)."""
    budget = cut_chars(max_tokens, tok)
    if len(text) <= budget:
        return text
    cut = text[:budget]
    end = max(cut.rfind(c) for c in " \n\t")
    return cut[:end] if end > budget // 2 else cut


def text_tail(text: str, max_tokens: int, tok: PreTrainedTokenizerBase) -> str:
    """The end of ``text`` that holds its last ``max_tokens`` tokens and more (:func:`text_head`'s
    mirror, cut at the first whitespace of its first half): what a prompt cut to its last tokens
    keeps (:func:`encode_prompts`) is the same from it as from the text."""
    budget = cut_chars(max_tokens, tok)
    if len(text) <= budget:
        return text
    cut = text[-budget:]
    start = min((i for i in (cut.find(c) for c in " \n\t") if i >= 0), default=-1)
    return cut[start + 1 :] if 0 <= start < budget // 2 else cut
