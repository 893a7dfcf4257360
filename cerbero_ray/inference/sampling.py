"""Stop strings and the token sampler for the engines; the settings themselves are
:class:`Sampling`, a config schema (:mod:`cerbero_ray.config.sampling`), importable from here too."""

from __future__ import annotations

import torch

from cerbero_ray.config.sampling import Sampling, check_sampling

__all__ = ["Sampling", "check_sampling", "cut_at_stop", "penalize", "sample"]


def cut_at_stop(text: str, stop) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def penalize(
    logits: torch.Tensor,
    counts: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
    repetition: torch.Tensor | None = None,
    in_prompt: torch.Tensor | None = None,
) -> torch.Tensor:
    """The penalties on each row's logits, in vLLM's order: ``repetition`` first (HF's and vLLM's,
    multiplicative: the logit of a token the prompt (``in_prompt``, bool ``[rows, vocab]``) or the
    answer holds is divided by it where positive, multiplied where not), then OpenAI's
    ``frequency`` times how often each token was generated so far (``counts``, ``[rows, vocab]``)
    and ``presence`` for each token generated at all. A row with repetition 1 and both others 0 is
    unchanged, bit for bit."""
    seen = counts > 0
    if repetition is not None:
        r = repetition[:, None].to(logits.dtype)
        hit = seen | in_prompt if in_prompt is not None else seen
        logits = torch.where(hit, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - counts.to(logits.dtype) * frequency[:, None] - seen.to(logits.dtype) * presence[:, None]


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row: greedy where ``temperature <= 0``, else the nucleus (``top_p``) of the
    tempered distribution sampled by inverse CDF at the row's uniform draw ``u``. Static shapes and
    no host round trip (every row is computed, the greedy ones then take the argmax), so it runs
    inside a captured decode step; each row's result depends on that row alone."""
    dev = logits.device
    temperature, top_p, u = (x.to(dev, non_blocking=True) for x in (temperature, top_p, u))
    greedy = logits.argmax(-1)
    probs = torch.softmax(logits / temperature.clamp(min=1e-6)[:, None], -1)
    sp, si = probs.sort(-1, descending=True)
    keep = (sp.cumsum(-1) - sp) < top_p[:, None]  # the most likely token is always kept
    cum = (sp * keep).cumsum(-1)
    k = torch.searchsorted(cum, (u * cum[:, -1])[:, None]).clamp(max=logits.shape[-1] - 1)
    return torch.where(temperature > 0, si.gather(1, k)[:, 0], greedy)
