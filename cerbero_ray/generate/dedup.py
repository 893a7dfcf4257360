"""Near-duplicate removal, two ways (``generate.self_chat.dedup``):

- ``ngram``: word n-gram sets; MinHash signatures and LSH bands find candidate pairs, the exact
  Jaccard similarity of the two sets decides (:func:`near_duplicates`);
- ``embedding``: mean-pooled hidden states of a model (:func:`embed`); random-hyperplane (SimHash)
  LSH bands find candidate pairs, the exact cosine similarity decides
  (:func:`near_duplicates_cosine`).

Either way, of each group of texts at or above the threshold the first (in input order) is kept,
and a text is matched only against kept ones. LSH finds nearly every pair above the threshold
(the bands are chosen for >= 95% at the threshold itself, more above it) without comparing all
pairs. Pure numpy, but for ``embed`` (torch).
"""

from __future__ import annotations

import hashlib

import numpy as np

PRIME = (1 << 31) - 1  # a × x + b stays below 2**63 for 32-bit x: exact in uint64


def shingles(text: str, n: int) -> set[int]:
    words = text.lower().split()
    grams = [" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))]
    return {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little") for g in grams if g}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _bands_rows(threshold: float, num_perm: int) -> tuple[int, int]:
    """The (bands, rows) split whose LSH S-curve threshold (1/b)^(1/r) is nearest ``threshold``."""
    best = min(
        ((b, num_perm // b) for b in range(1, num_perm + 1) if num_perm % b == 0),
        key=lambda br: abs((1 / br[0]) ** (1 / br[1]) - threshold * 0.9),
    )
    return best


def near_duplicates(
    texts: list[str], *, n: int = 5, threshold: float = 0.8, num_perm: int = 64, seed: int = 0
) -> list[int | None]:
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
    keys = [[(band, tuple(sig[band * rows : (band + 1) * rows])) for band in range(bands)] for sig in sigs]
    return _keep_first(keys, lambda i, cands: next((j for j in cands if jaccard(sets[i], sets[j]) >= threshold), None))


def _keep_first(keys: list[list], match) -> list[int | None]:
    """The LSH pass both methods share. ``keys[i]``: row ``i``'s band keys; rows sharing a key with
    it are its candidates, and ``match(i, candidates)`` (sorted, all earlier and kept) returns the
    one it duplicates, or None. Only kept rows are put in the buckets, so a row is matched only
    against kept ones."""
    buckets: dict = {}
    dup: list[int | None] = []
    for i, ks in enumerate(keys):
        candidates = sorted({j for k in ks for j in buckets.get(k, ())})
        dup.append(match(i, candidates) if candidates else None)
        if dup[i] is None:
            for k in ks:
                buckets.setdefault(k, []).append(i)
    return dup


def embed(model, tok, texts: list[str], *, max_tokens: int = 512, batch_size: int = 16) -> np.ndarray:
    """``[len(texts), hidden]`` float32: the mean of the last hidden states over each text's tokens
    (the first ``max_tokens``). ``model`` is a base model returning ``last_hidden_state`` (a causal
    LM's ``.model``, or an encoder loaded with ``AutoModel``)."""
    import torch

    from cerbero_ray.tokenizer import encode_plain

    dev = next(model.parameters()).device
    out = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            ids = [x[:max_tokens] or [pad] for x in encode_plain(tok, texts[i : i + batch_size])]
            width = max(len(x) for x in ids)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=dev)
            x = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=dev)
            h = model(input_ids=x, attention_mask=mask).last_hidden_state.float()
            out.append(((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def _simhash_bands(threshold: float, bands: int) -> int:
    """Bits per band: the most (fewest chance candidates) that still finds >= 95% of the pairs at
    cosine ``threshold`` (a random hyperplane splits two vectors with probability angle / pi)."""
    p = 1 - np.arccos(np.clip(threshold, -1, 1)) / np.pi
    for rows in (24, 20, 16, 12, 10, 8, 6, 4, 2, 1):
        if 1 - (1 - p**rows) ** bands >= 0.95:
            return rows
    return 1


def near_duplicates_cosine(
    emb: np.ndarray, *, threshold: float = 0.9, center: bool = False, seed: int = 0
) -> list[int | None]:
    """For each row of ``emb``, the index of the earlier row it duplicates (cosine >= ``threshold``),
    or None. ``center`` subtracts the rows' mean first: a language model's raw hidden states all
    point much the same way (cosines near 1 whatever the text); centred, they spread out. Rows equal
    to the mean (identical texts in a run of only those) count as identical to each other."""
    x = np.asarray(emb, dtype=np.float64)
    if len(x) == 0:
        return []
    if center:
        x = x - x.mean(0)
    norm = np.linalg.norm(x, axis=1)
    flat = norm <= 1e-6 * max(float(norm.max()), 1e-12)
    x[flat] = 0
    x[flat, 0] = 1  # one shared direction for the rows with nothing left after centring
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    bands = 32
    rows = _simhash_bands(threshold, bands)
    planes = np.random.default_rng(seed).standard_normal((x.shape[1], bands * rows))
    bits = (x @ planes) > 0

    def match(i, cands):
        hit = np.flatnonzero(x[cands] @ x[i] >= threshold - 1e-9)
        return cands[int(hit[0])] if len(hit) else None

    return _keep_first(
        [[(b, bits[i, b * rows : (b + 1) * rows].tobytes()) for b in range(bands)] for i in range(len(x))], match
    )
