"""Near-duplicate removal by word n-gram similarity: MinHash signatures, LSH bands to find candidate
pairs, then the exact Jaccard similarity of the two n-gram sets decides. Pure numpy.

Of each group of texts with Jaccard ≥ ``threshold`` the first (in input order) is kept.
"""

from __future__ import annotations

import hashlib

import numpy as np

PRIME = (1 << 31) - 1  # a × x + b stays below 2**63 for 32-bit x: exact in uint64


def shingles(text: str, n: int) -> set[int]:
    words = text.lower().split()
    grams = [" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))]
    return {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little") for g in grams if g}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _bands_rows(threshold: float, num_perm: int) -> tuple[int, int]:
    """The (bands, rows) split whose LSH S-curve threshold (1/b)^(1/r) is nearest ``threshold``."""
    best = min(((b, num_perm // b) for b in range(1, num_perm + 1) if num_perm % b == 0),
               key=lambda br: abs((1 / br[0]) ** (1 / br[1]) - threshold * 0.9))
    return best


def near_duplicates(texts: list[str], *, n: int = 5, threshold: float = 0.8, num_perm: int = 64,
                    seed: int = 0) -> list[int | None]:
    """For each text, the index of the earlier text it duplicates, or None."""
    sets = [shingles(t, n) for t in texts]
    rng = np.random.default_rng(seed)
    a = rng.integers(1, PRIME, num_perm, dtype=np.uint64)[:, None]
    b = rng.integers(0, PRIME, num_perm, dtype=np.uint64)[:, None]
    sigs = []
    for s in sets:
        x = np.fromiter(s, dtype=np.uint64, count=len(s)) if s else np.zeros(1, dtype=np.uint64)
        sigs.append(((a * x[None, :] + b) % PRIME).min(1))
    bands, rows = _bands_rows(threshold, num_perm)
    buckets: dict = {}
    dup: list[int | None] = [None] * len(texts)
    for i, sig in enumerate(sigs):
        candidates = set()
        for band in range(bands):
            key = (band, tuple(sig[band * rows:(band + 1) * rows]))
            candidates.update(buckets.get(key, ()))
        for j in sorted(candidates):
            if dup[j] is None and jaccard(sets[i], sets[j]) >= threshold:
                dup[i] = j
                break
        if dup[i] is None:  # only kept texts are matched against
            for band in range(bands):
                buckets.setdefault((band, tuple(sig[band * rows:(band + 1) * rows])), []).append(i)
    return dup
