"""Constrained decoding: a request's output held to a JSON schema, any JSON object, a regular
expression or a list of choices, token by token. The grammars are llguidance's (the Rust library
behind vLLM's and SGLang's ``guidance`` backend; CPU, no GPU needed): a constraint becomes a
grammar once per process (:func:`grammar`, cached), a request gets its own matcher
(:class:`Matcher`), and before each token the matcher's bitmask of allowed tokens is applied to
that row's logits, on the device where the engine runs (:func:`mask_logits`). Rows without a
constraint pay nothing. The Mistral tokenizer's byte-fallback tokens and SentencePiece spaces are
llguidance's to handle (``llguidance.hf.from_tokenizer``). What a constraint is, and the grammar
it becomes (one space allowed before the text), is :mod:`cerbero_ray.config.constraint`.

A constraint that cannot compile (an unsupported schema keyword, an invalid regex, an empty
choice list) is a ``ValueError`` saying why, before the request is queued.
"""

from __future__ import annotations

import functools

import torch

from cerbero_ray.config.constraint import KINDS, grammar, llg

__all__ = ["KINDS", "grammar", "check", "Matcher", "fill_rows", "bitmask", "mask_logits"]


def _llg():
    return llg("hf", "torch")


@functools.lru_cache(maxsize=8)
def _tokenizer(tok):
    return _llg().hf.from_tokenizer(tok)


def check(tok, g: str) -> None:
    """``ValueError`` with llguidance's own words if grammar ``g`` cannot run (an unsupported
    schema feature, say), so a server answers 400 before the request is queued."""
    Matcher(tok, g)


class Matcher:
    """One request's position in its grammar: which tokens may come next, and whether it may end.
    A grammar that cannot run is a ``ValueError`` (the first line of llguidance's reason)."""

    def __init__(self, tok, g: str):
        llg = _llg()
        self._tok = _tokenizer(tok)
        self.m = llg.LLMatcher(self._tok, g)
        if self.m.is_error():
            err = (self.m.get_error() or "").strip()
            raise ValueError(f"unsupported constraint: {err.splitlines()[0] if err else 'rejected by the compiler'}")
        self.words = (self._tok.vocab_size + 31) // 32

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 words, CPU); tokens past the
        tokenizer's vocabulary (a model's padded embedding rows) are never allowed."""
        own = torch.empty((1, self.words), dtype=torch.int32)
        _llg().torch.fill_next_token_bitmask(self.m, own, 0)
        bitmask[row] = 0
        n = min(self.words, bitmask.shape[1])
        bitmask[row, :n] = own[0, :n]

    def consume(self, token: int) -> None:
        if not self.m.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.m.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar allows nothing more (the output is complete)."""
        return self.m.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.m.is_accepting()


@functools.lru_cache(maxsize=1)
def _executor():
    return _llg().LLExecutor()


def fill_rows(bits: torch.Tensor, pairs: list[tuple[Matcher, int]]) -> None:
    """Each matcher's allowed next tokens into its row of ``bits``, the rows computed in parallel
    (llguidance's thread pool) when the bitmask is exactly the tokenizer's width."""
    if not pairs:
        return
    if all(m.words == bits.shape[1] for m, _ in pairs) and bits.is_contiguous():
        _llg().torch.fill_next_token_bitmask_par(_executor(), [(m.m, row) for m, row in pairs], bits)
    else:
        for m, row in pairs:
            m.fill(bits, row)


def bitmask(rows: int, vocab: int) -> torch.Tensor:
    """An all-allowed bitmask ``[rows, ceil(vocab / 32)]`` (int32, CPU)."""
    return torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)


@functools.lru_cache(maxsize=8)
def _forbid(dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: for each byte of a bitmask, its eight tokens' additive mask (0 allowed, -inf not)."""
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
    return torch.zeros(256, 8, dtype=dtype).masked_fill(bits == 0, float("-inf"))


def mask_logits(logits: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``logits`` with every token a row's bitmask forbids at -inf (``bits`` on the logits' device).
    On a GPU, tensor ops of static shapes (it runs inside a captured step); on the CPU, each byte of
    the bitmask looks up its eight tokens' additive mask (0.5 ms for 32 rows of 32,000, against
    5 ms for numpy's ``unpackbits`` and a ``masked_fill``)."""
    vocab = logits.shape[-1]
    if logits.device.type == "cpu":
        rows = logits.shape[0]
        add = _forbid(logits.dtype).index_select(0, bits.contiguous().view(torch.uint8).flatten().int())
        return logits + add.view(rows, -1)[:, :vocab]
    idx = torch.arange(vocab, device=logits.device)
    allowed = (bits[:, idx // 32] >> (idx % 32)) & 1
    return logits.masked_fill(allowed == 0, float("-inf"))
