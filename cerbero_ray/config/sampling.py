"""Sampling settings: one dataclass for the batch jobs' configs (it is the ``generate.sampling``
schema), the engines and the server, and its check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from cerbero_ray.chat import STOP_STRING


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    stop: List[str] = field(default_factory=lambda: [STOP_STRING])
    seed: Optional[int] = 0  # None: a fresh random draw (the serving default, as OpenAI's API)
    logprobs: Optional[int] = None  # continuous engine: each token's log-probability and this many top ones
    # continuous engine: an llguidance grammar the output must match (cerbero_ray.inference.grammar.grammar
    # builds one from a JSON schema, a regex or a choice list); None: free text
    grammar: Optional[str] = None
    # OpenAI's penalties on the tokens generated so far (not the prompt's), each in [-2, 2]: every
    # candidate's logit loses frequency_penalty times its count and presence_penalty once if it
    # appeared; before temperature and top-p, greedy decoding included
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # HF's and vLLM's: a token the prompt or the answer holds has its logit divided by this where
    # positive, multiplied where not (1: off; > 1 discourages repeating); applied first
    repetition_penalty: float = 1.0
    # OpenAI's logit_bias: token id -> a number in [-100, 100] added to its logit at every token,
    # before temperature and top-p, greedy included (-100 bans the token, 100 all but forces it)
    logit_bias: Optional[Dict[int, float]] = field(default_factory=dict)

    @property
    def adjusted(self) -> bool:
        """Penalties or a logit bias change its logits (the continuous engine's sampling steps apply them)."""
        s = self
        return bool(s.frequency_penalty or s.presence_penalty or s.repetition_penalty != 1 or s.logit_bias)

    def key(self) -> tuple:
        """Hashable: requests with equal keys can share a batched ``generate`` call."""
        s = self
        return (
            s.max_new_tokens,
            s.temperature,
            s.top_p,
            tuple(s.stop),
            s.seed,
            s.logprobs,
            s.grammar,
            s.frequency_penalty,
            s.presence_penalty,
            s.repetition_penalty,
            tuple(sorted((s.logit_bias or {}).items())),
        )


def check_token_ids(bias: dict | None, vocab: int, key: str = "logit_bias", whose: str = "the vocabulary") -> None:
    """``ValueError`` naming ``key`` when a logit bias names a token id outside ``0..vocab - 1``
    (``whose``: the vocabulary the message names)."""
    bad = sorted(t for t in bias or {} if not 0 <= t < vocab)
    if bad:
        raise ValueError(f"{key}: token id(s) {bad[:5]} outside {whose} (0..{vocab - 1})")


def check_sampling(s: Sampling, key: str) -> None:
    """``ValueError`` naming ``key`` for settings no engine can honour."""
    if int(s.max_new_tokens) < 1:
        raise ValueError(f"{key}.max_new_tokens must be >= 1, got {s.max_new_tokens}")
    if float(s.temperature) < 0:
        raise ValueError(f"{key}.temperature must be >= 0, got {s.temperature}")
    if not 0 < float(s.top_p) <= 1:
        raise ValueError(f"{key}.top_p must be in (0, 1], got {s.top_p}")
    for k in ("frequency_penalty", "presence_penalty"):
        v = float(getattr(s, k))
        if not -2 <= v <= 2:  # also NaN
            raise ValueError(f"{key}.{k} must be in [-2, 2] (OpenAI's range), got {getattr(s, k)}")
    if not 0 < float(s.repetition_penalty) <= 10:  # also NaN
        raise ValueError(f"{key}.repetition_penalty must be in (0, 10] (1: off), got {s.repetition_penalty}")
    for t, b in (s.logit_bias or {}).items():
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"{key}.logit_bias: keys are token ids (whole numbers >= 0), got {t!r}")
        if not -100 <= float(b) <= 100:
            raise ValueError(f"{key}.logit_bias.{t} must be in [-100, 100] (OpenAI's range), got {b}")
    if any(not x for x in s.stop):
        raise ValueError(f"{key}.stop: stop strings must be non-empty")
