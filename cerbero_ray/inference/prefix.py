"""Prefix reuse for the continuous engine: a new request starts from the keys and values a cache
slot already holds for the first tokens of its prompt, instead of computing them again.

Every slot remembers which tokens its cache holds, position by position from 0: a live request's
prompt as far as it is prefilled; a finished one's prompt and its answer but the last token (the
last may never have been fed back). Those positions stay valid until the slot is given to another
request, so a prompt that starts like one of them (the same system prompt, a few-shot block, the
turns of a chat so far, another of ``n`` choices) skips that part of its prefill: the engine copies
it from the slot that holds it (one device copy per cache tensor) or takes that slot when it is
free, and prefills the rest as a continuing chunk. Keys and values depend on the LoRA adapter too,
so a slot only serves requests for the adapter that wrote it; and a request with a cache salt
(vLLM's ``cache_salt``: a tenant's own) only those with the same salt, so one tenant cannot learn
from another's time to first token what prompts the other sent.

This is vLLM's automatic prefix caching and SGLang's radix cache without their page tables: the
cache is contiguous per slot (:class:`~cerbero_ray.inference.slots.SlotModel`), so what can be
reused is what the slots hold now, not an unbounded store.
"""

from __future__ import annotations


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share (slice comparisons, at C speed)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class SlotPrefixes:
    """Which tokens each cache slot holds the keys and values of, under which key: what must be
    equal for them to be shared (the engine's: the adapter and the cache salt)."""

    def __init__(self, num_slots: int):
        self.held: list[tuple[object, list[int]] | None] = [None] * num_slots

    def set(self, slot: int, key, tokens: list[int]) -> None:
        """``tokens``: kept as given (the engine passes slices of its own, never changed after)."""
        self.held[slot] = (key, tokens) if tokens else None

    def drop(self, slot: int) -> None:
        self.held[slot] = None

    def clear(self) -> None:
        self.held = [None] * len(self.held)

    def tokens(self, slot: int) -> list[int]:
        return self.held[slot][1] if self.held[slot] is not None else []

    def best(self, ids: list[int], key, limit: int, held=None) -> tuple[int, int]:
        """(slot, n): the slot whose held tokens share the longest prefix with ``ids`` under
        ``key``, at most ``limit`` tokens (the lowest slot among equals); (-1, 0) if none.
        ``held``: other records to search, ``{slot: (key, tokens)}`` (default: the slots')."""
        best, at = 0, -1
        records = enumerate(self.held) if held is None else sorted(held.items(), key=lambda x: x[0])
        for slot, rec in records:
            if rec is None or rec[0] != key or best >= min(limit, len(rec[1])):
                continue
            n = min(common_prefix(rec[1], ids), limit)
            if n > best:
                best, at = n, slot
        return at, best
