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
cache is contiguous per slot (:class:`~cerbero_ray.inference.slots.SlotModel`), so the slots hold
only as many prefixes as there are slots. The idle ones serve as a cache of their own: a newcomer
takes a slot among the rows the decode steps compute, and what that slot held moves to an idle slot
past them (one device copy; the least recently used prefix there goes first), so at a light load a
chat's next turn still finds its conversation. A prefix no slot can keep can be kept in host
memory (:class:`HostPrefixes`, ``prefix_store_bytes``, off by default): a chat client whose slot
others took while it typed its next turn gets its conversation copied back into a slot instead of
prefilled again (vLLM's KV offloading, SGLang's hierarchical
cache, in their simplest form: whole prefixes, least recently used evicted first).
"""

from __future__ import annotations

from collections import OrderedDict


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


def block_chain(tokens: list[int], block: int) -> list[int]:
    """The hashes of ``tokens``' whole blocks of ``block`` tokens, each covering its block and every
    one before (vLLM's block hashes): two token lists share their first ``j`` blocks exactly when
    their chains share their first ``j`` hashes (but for a hash collision)."""
    out, h = [], 0
    for a in range(0, len(tokens) - block + 1, block):
        h = hash((h, tuple(tokens[a : a + block])))
        out.append(h)
    return out


class SlotPrefixes:
    """Which tokens each cache slot holds the keys and values of, under which key: what must be
    equal for them to be shared (the engine's: the adapter and the cache salt).

    For choosing which prefix to give up, it also counts, per 16-token block, how many records hold
    it and every block before it under the same key (hashes, as :class:`HostPrefixes` finds its
    entries), kept as records change: :meth:`unique` is then a few lookups, however many slots."""

    BLOCK = 16

    def __init__(self, num_slots: int):
        self.held: list[tuple[object, list[int]] | None] = [None] * num_slots
        self._chains: list[list] = [[] for _ in range(num_slots)]
        self._count: dict[tuple, int] = {}

    def set(self, slot: int, key, tokens: list[int]) -> None:
        """``tokens``: kept as given (the engine passes slices of its own, never changed after)."""
        for c in self._chains[slot]:
            if self._count[c] == 1:
                del self._count[c]
            else:
                self._count[c] -= 1
        self.held[slot] = (key, tokens) if tokens else None
        self._chains[slot] = [(key, h) for h in block_chain(tokens, self.BLOCK)]
        for c in self._chains[slot]:
            self._count[c] = self._count.get(c, 0) + 1

    def drop(self, slot: int) -> None:
        self.set(slot, None, [])

    def clear(self) -> None:
        self.held = [None] * len(self.held)
        self._chains = [[] for _ in self.held]
        self._count = {}

    def unique(self, slot: int) -> int:
        """How many of the tokens ``slot`` holds no other slot holds under the same key (past the
        whole 16-token blocks another record starts with too); 0 if it holds none."""
        if self.held[slot] is None:
            return 0
        chain, lo, hi = self._chains[slot], 0, len(self._chains[slot])
        while lo < hi:  # the leading blocks another record shares: a prefix of the chain
            mid = (lo + hi) // 2
            if self._count[chain[mid]] > 1:
                lo = mid + 1
            else:
                hi = mid
        return len(self.held[slot][1]) - lo * self.BLOCK

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


def covers(records, key, tokens: list[int]) -> bool:
    """Whether one of ``records`` (``(key, tokens)`` pairs or None) holds ``tokens`` whole under ``key``."""
    return any(
        rec is not None and rec[0] == key and len(rec[1]) >= len(tokens) and rec[1][: len(tokens)] == tokens
        for rec in records
    )


class HostPrefixes:
    """Prefixes that left the cache slots, their keys and values in host memory: a pool of pages of
    ``page_tokens`` positions allocated once (pinned beside a GPU, so that copies both ways are
    asynchronous, and never more than the budget), an entry ``(key, tokens, pages)`` holding its
    tokens' keys and values in its pages, in order. The least recently saved or used entry goes
    first. The pool and the copies are the model's (:meth:`SlotModel.host_pool`,
    :meth:`SlotModel.save_prefix`); this class only keeps the books.

    An entry is found through blocks of ``block`` tokens (16, vLLM's block size; an entry is one
    block at least): each whole block of its tokens has a hash of that block and every one before
    it (vLLM's block hashes), so a lookup walks the prompt's blocks and compares tokens only with
    the entries that share the most blocks, however many entries there are."""

    def __init__(self, pages: int, page_tokens: int, block: int = 16):
        self.pages, self.page_tokens, self.block = pages, page_tokens, block
        self.free = list(range(pages - 1, -1, -1))  # popped from the end: page 0 first
        self.entries: OrderedDict[int, tuple] = OrderedDict()  # entry: (key, tokens, pages, chain)
        self.index: dict[tuple, set[int]] = {}  # (key, hash of pages 0..j): the entries that hold them
        self.saved = self.hits = 0  # entries saved and entries copied back into a slot, for the record
        self.pool = None  # the pages' memory, set by the engine
        self._next = 0

    def chain(self, tokens: list[int]) -> list[int]:
        """The hashes of ``tokens``' whole blocks, each covering its block and every one before."""
        return block_chain(tokens, self.block)

    def _deepest(self, key, chain: list[int]) -> tuple[int, set[int]]:
        """(blocks, entries): the most whole blocks of ``chain`` some entries hold, and those entries."""
        depth, found = 0, set()
        for j, h in enumerate(chain):
            hit = self.index.get((key, h))
            if not hit:
                break
            depth, found = j + 1, hit
        return depth, found

    def find(self, ids: list[int], key, limit: int) -> tuple[int, int]:
        """(entry, n): the entry that shares the longest prefix with ``ids`` under ``key``, at most
        ``limit`` tokens (the most recent among equals); (-1, 0) if none shares a whole block."""
        depth, found = self._deepest(key, self.chain(ids[:limit]))
        best, at = 0, -1
        for i in sorted(found, reverse=True):
            n = min(common_prefix(self.entries[i][1], ids), limit)
            if n > best:
                best, at = n, i
        return at, best

    def holds(self, key, tokens: list[int]) -> bool:
        """Whether an entry holds ``tokens`` whole under ``key``."""
        chain = self.chain(tokens)
        if not chain:
            return False
        found = self.index.get((key, chain[-1]), ())
        return any(
            len(self.entries[i][1]) >= len(tokens) and self.entries[i][1][: len(tokens)] == tokens for i in found
        )

    def _pages_for(self, n: int) -> int:
        return -(-n // self.page_tokens)

    def fits(self, n: int) -> bool:
        return self._pages_for(n) <= self.pages

    @property
    def used(self) -> int:
        """Pages held by entries."""
        return self.pages - len(self.free)

    @property
    def held_bytes(self) -> int:
        """What the entries' pages take of the pool."""
        return self.used * self.pool[0].nbytes

    def add(self, key, tokens: list[int], keep: int | None = None) -> list[int] | None:
        """Make room for ``tokens`` (a block at least) and return the pages to copy their keys and
        values into: entries they extend (the same key, a prefix of them) are dropped, then the
        least recently used until enough pages are free; never entry ``keep`` (None if there is
        no room without it)."""
        chain = self.chain(tokens)
        if not chain:
            raise ValueError(f"an entry is a block at least ({self.block} tokens), got {len(tokens)}")
        need = self._pages_for(len(tokens))
        if keep is not None and need > self.pages - len(self.entries[keep][2]):
            return None
        for i in list(self.index.get((key, chain[0]), ())):
            e = self.entries[i]
            if (
                i != keep
                and len(e[1]) <= len(tokens)
                and e[3][-1] == chain[len(e[3]) - 1]
                and e[1] == tokens[: len(e[1])]
            ):
                self._drop(i)
        while len(self.free) < need:
            self._drop(next(i for i in self.entries if i != keep))
        pages = [self.free.pop() for _ in range(need)]
        i = self._next
        self._next += 1
        self.entries[i] = (key, tokens, pages, chain)
        for h in chain:
            self.index.setdefault((key, h), set()).add(i)
        self.saved += 1
        return pages

    def take(self, entry: int) -> list[int]:
        """The pages of an entry about to be copied back (it becomes the most recently used)."""
        self.entries.move_to_end(entry)
        self.hits += 1
        return self.entries[entry][2]

    def _drop(self, entry: int) -> None:
        key, _, pages, chain = self.entries.pop(entry)
        self.free.extend(reversed(pages))
        for h in chain:
            hit = self.index[(key, h)]
            hit.discard(entry)
            if not hit:
                del self.index[(key, h)]

    def clear(self) -> None:
        for i in list(self.entries):
            self._drop(i)
