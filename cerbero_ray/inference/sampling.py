"""Stop strings for the engines; the settings themselves are :class:`Sampling`, a config schema
(:mod:`cerbero_ray.config.sampling`), importable from here too."""

from __future__ import annotations

from cerbero_ray.config.sampling import Sampling, check_sampling

__all__ = ["Sampling", "check_sampling", "cut_at_stop"]


def cut_at_stop(text: str, stop) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)
