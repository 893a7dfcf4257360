"""Continuous batching: requests join and leave a running decode batch between steps. Plain
PyTorch, no Ray (a serving replica runs one :class:`ContinuousBatcher`; benchmarks drive it bare).

Each step of the loop thread:
  1. decode one token for every live slot, each at its own position (:class:`SlotModel`);
  2. admit waiting requests into free cache slots (among the rows the decode steps compute anyway,
     so the live slots stay packed at the front) and prefill them together, up to
     ``prefill_tokens`` prompt tokens per step;
  3. sample per request (its own temperature, top-p and, when it has one, seeded random stream, so
     a seeded request gives the same text whatever else is in the batch), detokenize incrementally,
     hand the new text to the request's callback, and free the slots of finished requests.

A short request never waits for a long one, a new request waits at most one step, and streaming
and non-streaming requests share the same batch. With LoRA adapters loaded
(:mod:`cerbero_ray.inference.multilora`), requests for different adapters (and the base) share it
too: each slot's adapter is a row of a table the model's adapted layers gather from.

OpenAI's frequency and presence penalties (``Sampling``) lower the logits of the tokens a request
has generated (its own counts, kept per slot on the device), the repetition penalty those of the
tokens its prompt or answer holds, and its logit bias is added to every token's logits; a step
with such a request applies them to every row (a row without any is unchanged; a captured step
takes its sampling variant, greedy or not), a step without skips them.

A request ends at the end-of-sequence token, at one of its stop strings (cut from the text) or at
``max_new_tokens``; text that could be the start of a stop string, or an incomplete UTF-8
character, is held back until it is decided.

With ``Sampling.logprobs`` set (``k``), each token's log-probability under the model (before
temperature and top-p, as OpenAI reports them) and the ``k`` most likely tokens ride along: a
stream's text pieces are :class:`Piece` strings carrying the entries of the tokens they hold, and
the final dict has them all (``logprobs``: ``{"id", "logprob", "top": [(id, logprob), …]}``).
"""

from __future__ import annotations

import atexit
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable, Iterator

import torch

from cerbero_ray.config.sampling import check_token_ids
from cerbero_ray.inference.prefix import HostPrefixes, SlotPrefixes, covers
from cerbero_ray.inference.sampling import Sampling, cut_at_stop, sample  # noqa: F401 (sample: re-exported)
from cerbero_ray.inference.slots import CACHE_SHARE, SlotModel, free_memory
from cerbero_ray.tokenizer import encode_prompts

# prefix reuse (:mod:`cerbero_ray.inference.prefix`): a newcomer waits a step for a prompt being
# prefilled when it would then reuse at least this many more tokens, and takes the free slot that
# holds its prefix (when the decode steps compute its row anyway; else it copies it) from this many;
# a prefix is kept (moved to an idle slot, or to the host store) when this many of its tokens would be lost
DEFER_FOR = 32
TAKE_SLOT_FROM = 32
# the host prefix store's page: its prefixes take whole pages of this many positions
STORE_PAGE = 64


@dataclass(eq=False)
class _Request:
    ids: list[int]
    sampling: Sampling
    emit: Callable[[object], None]  # text pieces (str), then one final dict
    truncated: bool = False
    slot: int = -1
    out: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    offsets: tuple[int, int] = (0, 0)  # incremental detokenization: (prefix start, read start)
    rng: random.Random | None = None
    cancelled: bool = False
    lps: list[dict] = field(default_factory=list)  # per token, with Sampling.logprobs
    starts: list[int] = field(default_factory=list)  # per token: the text's length before it
    lp_sent: int = 0
    adapter: int = 0  # the LoRA adapter this request's rows use (0: the base; AdapterSet indices)
    chained: bool = False  # a chain's next request (:meth:`ContinuousBatcher.chains`): queued first
    salt: str | None = None  # its cache salt: it shares cached prefixes only with the same salt
    launched: int = 0  # tokens asked of the device (prefill's first, then one per decode step)
    prefilled: int = 0  # prompt tokens in its cache slot so far (a long prompt: a chunk per step)
    cached: int = 0  # of them, reused from what a slot held (prefix reuse), not computed
    matcher: object = None  # a constrained request's grammar.Matcher
    done: bool = False  # ended (or cancelled): a step still in flight for it is ignored
    t0: float = field(default_factory=time.perf_counter)  # submitted
    first: float | None = None  # seconds from submission to its first token

    @property
    def key(self) -> tuple:
        """What another request must share for this one's cached prefix to serve it (.prefix)."""
        return (self.adapter, self.salt)


@dataclass(eq=False)
class _Launch:
    """A decode step in flight: the requests it decodes, its tokens (and logprob tensors) as they
    will land in host memory, and the event that says they have."""

    rows: list
    tokens: torch.Tensor
    lp: list
    event: object


def _host(t: torch.Tensor) -> torch.Tensor:
    """An asynchronous copy of ``t`` in pinned host memory (the tensor itself on the CPU)."""
    if t.device.type != "cuda":
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


class Piece(str):
    """A piece of streamed text with the log-probability entries of the tokens it holds."""

    logprobs: list[dict]

    def __new__(cls, text: str, logprobs: list[dict]):
        p = super().__new__(cls, text)
        p.logprobs = logprobs
        return p


def _pieces(first, q) -> tuple[str, dict | None]:
    """What a stream's reader got since its last read (``first`` and whatever else piled up in the
    queue ``q``, a ``queue.Queue`` or an ``asyncio.Queue``): the text as one piece, and the final
    dict if it came."""
    items = [first]
    while not q.empty():
        items.append(q.get_nowait())
    end = next((x for x in items if isinstance(x, dict)), None)
    if end is not None and "error" in end:
        raise RuntimeError(end["error"])
    text = "".join(x for x in items if isinstance(x, str))
    lps = [e for x in items if isinstance(x, Piece) for e in x.logprobs]
    return (Piece(text, lps) if any(isinstance(x, Piece) for x in items) else text), end


class ContinuousBatcher:
    def __init__(
        self,
        model,
        tok,
        *,
        num_slots: int = 16,
        max_prompt_tokens: int = 2048,
        max_new_tokens: int = 512,
        prefill_tokens: int = 8192,
        cuda_graphs: bool | None = None,
        fast_decode: bool | None = None,
        lock: threading.Lock | None = None,
        adapters=None,
        decode_attention: str = "auto",
        graph_batch_sizes=None,
        prefix_cache: bool = True,
        prefix_store_bytes: int = 0,
    ):
        if prefix_store_bytes < 0 or (prefix_store_bytes and not prefix_cache):
            raise ValueError(
                f"a prefix store of {prefix_store_bytes} bytes: it must be >= 0 and needs prefix reuse (prefix_cache)"
            )
        self.tok = tok
        self.adapters = adapters  # an AdapterSet: requests name theirs, mixed in every step
        # the fast step pays inside a captured graph (compiled regions); eager on a GPU it is slower than the
        # HF modules (39 vs 33 ms a step on an H200, bench/probe_decode_gpu.py), so its default follows the graphs
        on_gpu = next(model.parameters()).device.type == "cuda"
        fast = fast_decode if fast_decode is not None else (None if on_gpu and cuda_graphs is not False else False)
        self.slots = SlotModel(
            model,
            num_slots,
            max_prompt_tokens + max_new_tokens,
            adapters,
            fast=fast,
            attention=decode_attention,
            graph_batch_sizes=graph_batch_sizes,
        )
        self.max_prompt_tokens, self.max_new_tokens, self.prefill_tokens = (
            max_prompt_tokens,
            max_new_tokens,
            prefill_tokens,
        )
        # CUDA graphs: on by default on CUDA; elsewhere there are none to capture (the flag is ignored)
        self.graphs = self.slots.device.type == "cuda" and cuda_graphs is not False
        self.lock = lock or threading.Lock()  # held per step: other users of the model run between steps
        self.eos = tok.eos_token_id
        self.waiting: deque[_Request] = deque()
        self.live: dict[int, _Request] = {}
        self._cv = threading.Condition()
        self.steps = 0
        self.pending: _Launch | None = None  # the decode step in flight, its tokens not yet handed out
        self.prefilling: deque[_Request] = deque()  # in a slot, their prompt prefilled a chunk a step
        self.on_step: Callable[[], None] | None = None  # called by the loop after each step (a server's metrics)
        # which tokens each slot's cache holds: a prompt that starts the same way reuses them (.prefix)
        self.prefixes = SlotPrefixes(num_slots) if prefix_cache else None
        # what a slot holds, when a newcomer takes the slot, moves to a free slot past the rows the
        # decode steps compute instead of being lost (:meth:`_park`; False: each newcomer into the
        # lowest free slot, over what it held); each slot's last use, for choosing which goes
        self.park = True
        self._used = [0] * num_slots
        # and, with a budget, what a slot was about to lose, kept in host memory (.prefix.HostPrefixes)
        self.store = None
        if prefix_store_bytes:
            page = STORE_PAGE * self.slots.token_bytes()
            if prefix_store_bytes < page:
                raise ValueError(
                    f"a prefix store of {prefix_store_bytes} bytes holds not one page of {STORE_PAGE} tokens "
                    f"({page} bytes on this model)"
                )
            pages = prefix_store_bytes // page
            free = free_memory(torch.device("cpu"))
            if free is not None and pages * page > CACHE_SHARE * free:
                raise ValueError(
                    f"the host prefix store does not fit: {pages * page / 2**30:.2f} GiB asked "
                    f"(serve.prefix_store_gib), and this host has {free / 2**30:.2f} GiB free, of which it may "
                    f"take {CACHE_SHARE:.0%}"
                )
            self.store = HostPrefixes(pages, STORE_PAGE)
            try:  # pinned beside a GPU: the OS may refuse to lock that much (ulimit -l, a container's limit)
                self.store.pool = self.slots.host_pool(self.store.pages, STORE_PAGE)
            except RuntimeError as e:
                raise ValueError(
                    f"the host prefix store ({pages * page / 2**30:.2f} GiB, serve.prefix_store_gib) could not be "
                    f"allocated: {e}"
                ) from None
        # what a prompt token costs a layer in matrix products (2 x a layer's parameters: the
        # projections and the MLP) and what a query-key pair costs in attention (QK and AV), for
        # _pays: whether reusing a prefix saves more than attending to it as a continuing chunk adds
        cfg = model.config
        self._per_token = 2 * sum(p.numel() for p in model.model.layers[0].parameters())
        self._per_pair = 4 * cfg.num_attention_heads * self.slots.head_dim
        if self.graphs:
            self.slots.warm()  # capture (and compile) before the first request, not during it
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="continuous-batcher", daemon=True)
        self._thread.start()
        # at exit, the loop stops between steps: a daemon thread inside a torch op while the
        # interpreter finalizes can abort the process ("terminate called without an active exception")
        atexit.register(self.close)

    def describe(self) -> str:
        """One line on how this engine decodes (a replica logs it at start-up): slots, the fast step
        and its attention, CUDA graphs with their batch buckets and start-up time, and any fallback."""
        sm = self.slots
        parts = [f"{sm.num_slots} slots of {sm.max_len} tokens", f"{sm.device.type}"]
        parts.append(
            f"fast decode step ({sm.attention} attention{', compiled' if sm.compiled else ''})"
            if sm.fast
            else "HF modules"
        )
        if self.graphs:
            took = f" in {sm.warm_s:.1f} s" if sm.warm_s is not None else ""
            parts.append(f"CUDA graphs for batch sizes {sm.batch_buckets}{took}")
        parts.append("prefix reuse" if self.prefixes is not None else "no prefix reuse")
        if self.store is not None:
            pages = f"{self.store.pages} pages of {STORE_PAGE} tokens"
            parts.append(f"a host prefix store of {self.store.pool.nbytes / 2**30:.2f} GiB ({pages})")
        if sm.graphs_oom:
            rows = sorted({k[2] if isinstance(k[0], str) else k[1] for k in sm.graphs_oom})
            parts.append(f"no graph (out of memory at capture) for batch sizes {rows}")
        for what, why in (
            ("graphs off", sm.graph_error),
            ("compile off", sm.compile_error),
            ("attention", sm.attention_note),
        ):
            if why:
                parts.append(f"{what}: {why}")
        return "continuous engine: " + "; ".join(parts)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop thread after its current step (requests still waiting are failed). A closed
        engine holds no reference from the interpreter's exit hooks: dropped, its cache is freed."""
        atexit.unregister(self.close)
        with self._cv:
            self._closed = True
            left = list(self.live.values()) + list(self.waiting)
            self._cv.notify_all()
        self._thread.join(timeout)
        for r in left:
            if not r.done:
                r.emit({"error": "the engine was closed"})

    # ── the public side (any thread) ────────────────────────────────────────
    def encode(self, prompts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of rendered prompts within ``max_prompt_tokens`` (:func:`encode_prompts`)."""
        return encode_prompts(self.tok, prompts, self.max_prompt_tokens)

    def submit(
        self,
        ids: list[int],
        s: Sampling,
        emit: Callable[[object], None],
        truncated: bool = False,
        adapter: int = 0,
        salt: str | None = None,
    ) -> _Request:
        r = self._request(ids, s, emit, truncated, adapter, salt)
        self._enqueue([r])
        return r

    def _request(self, ids, s: Sampling, emit, truncated: bool, adapter: int, salt: str | None) -> _Request:
        """A checked request, not yet queued (a constraint that cannot run is refused here)."""
        if adapter and (self.adapters is None or not 0 <= adapter < len(self.adapters.names)):
            raise ValueError(f"no adapter {adapter} is loaded")
        if not ids:
            raise ValueError("an empty prompt")
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(f"{len(ids)} prompt tokens; at most {self.max_prompt_tokens} (encode with encode())")
        if not 1 <= s.max_new_tokens <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens must be within 1..{self.max_new_tokens}, got {s.max_new_tokens}")
        check_token_ids(s.logit_bias, self.slots.vocab)
        r = _Request(
            ids,
            s,
            emit,
            truncated=truncated,
            rng=random.Random(s.seed) if s.seed is not None else random.Random(),
            adapter=adapter,
            salt=salt,
        )
        if s.grammar is not None:  # a constraint that cannot run is refused here, before it is queued
            from cerbero_ray.inference.grammar import Matcher

            r.matcher = Matcher(self.tok, s.grammar)
        return r

    def _enqueue(self, rs: list[_Request], first: bool = False) -> None:
        """Queue ``rs`` together: a step admits from all of them or none. ``first`` (a chain's next
        request): ahead of every waiting request but the chains' queued before it."""
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if first:
                at = next((k for k, w in enumerate(self.waiting) if not w.chained), len(self.waiting))
                for k, r in enumerate(rs):
                    r.chained = True
                    self.waiting.insert(at + k, r)
            else:
                self.waiting.extend(rs)
            self._cv.notify()

    def forget(self) -> None:
        """Drop what the slots (and the host store) hold for prefix reuse: the next prompts are computed whole. A batch
        job calls it per chunk, so that a chunk's output depends on the chunk alone (a rerun of a
        lost chunk on a fresh worker gives the same rows) and not on what the worker ran before."""
        if self.prefixes is not None:
            with self.lock:  # between steps
                self.prefixes.clear()
                if self.store is not None:
                    self.store.clear()

    def cancel(self, r: _Request) -> None:
        """The client went away: the request's slot is freed at the next step."""
        r.cancelled = True

    def generate(self, prompts: list[str], s: Sampling, seed: int | None = None, adapter: int = 0) -> list[dict]:
        """Blocking: per prompt ``text`` (stripped), ``finish_reason``, ``prompt_tokens``,
        ``new_tokens``, ``truncated`` — the same results as :class:`Generator.generate`. ``seed``
        (else ``s.seed``) seeds row ``i`` with ``seed * 1_000_003 + i``: the same call, the same text."""
        seed = s.seed if seed is None else seed
        if seed is None:
            return self.run([(p, s, adapter) for p in prompts])
        return self.run([(p, replace(s, seed=seed * 1_000_003 + i), adapter) for i, p in enumerate(prompts)])

    def run(self, items: list[tuple]) -> list[dict]:
        """Blocking: like :meth:`generate`, each prompt with its own sampling settings (and, as a
        third element, its adapter: a mixed batch)."""
        done = [queue.Queue() for _ in items]
        ids, cut = self.encode([it[0] for it in items])
        rs = []
        for x, c, it, q in zip(ids, cut, items, done):
            adapter = it[2] if len(it) > 2 else 0
            emit = lambda item, q=q: q.put(item) if isinstance(item, dict) else None  # noqa: E731
            rs.append(self._request(x, it[1], emit, c, adapter, None))
        self._enqueue(rs)  # at once, so the same call is admitted alike every time
        out = [q.get() for q in done]
        for r in out:
            if "error" in r:
                raise RuntimeError(r["error"])
        return out

    def chains(
        self,
        starts: list[tuple[str, Sampling]],
        follow: Callable[[int, dict], tuple[str, Sampling] | None],
        adapter: int = 0,
    ) -> None:
        """Blocking: sequences of requests where each depends on the one before (a self-chat
        conversation: its next turn's prompt is the conversation so far with the new answer).
        ``starts[i]`` (a prompt and its sampling) begins chain ``i``; when a chain's request ends,
        ``follow(i, end)`` (``end``: the dict :meth:`run` returns for it) gives the chain's next
        ``(prompt, sampling)``, or None to end it. ``follow`` runs on the loop thread between steps,
        so keep it light; the request it gives goes ahead of every waiting one, into the slot its
        predecessor just left, and reuses that slot's cache (the earlier prompt and the answer).
        Unlike :meth:`run` turn by turn, no step waits for a turn's slowest answer, and a chain
        finds its own slot however many chains there are. Raises (after every chain has ended) if
        a request failed or ``follow`` raised."""
        left, errors = threading.Semaphore(0), []

        def emitter(i: int):
            def emit(item) -> None:
                if not isinstance(item, dict):
                    return
                if "error" not in item:
                    try:
                        nxt = follow(i, item)
                        if nxt is not None:
                            (ids,), (cut,) = self.encode([nxt[0]])
                            self._enqueue([self._request(ids, nxt[1], emit, cut, adapter, None)], first=True)
                            return
                    except Exception as e:  # the chain ends; the others go on
                        item = {"error": f"chain {i}: {e!r}"}
                if "error" in item:
                    errors.append(item["error"])
                left.release()

            return emit

        ids, cut = self.encode([p for p, _ in starts])
        self._enqueue(
            [
                self._request(x, s, emitter(i), c, adapter, None)
                for i, (x, c, (_, s)) in enumerate(zip(ids, cut, starts))
            ]
        )
        for _ in starts:
            left.acquire()
        if errors:
            raise RuntimeError(errors[0] if len(errors) == 1 else f"{errors[0]} (and {len(errors) - 1} more)")

    def stream(self, prompt: str, s: Sampling, adapter: int = 0) -> Iterator[str | dict]:
        """Text pieces as they are decided (what piled up since the last read comes as one piece),
        then one dict (``finish_reason``, ``prompt_tokens``, ``new_tokens``, ``truncated``, ``text``).
        Closing the iterator early cancels the request."""
        q: queue.Queue = queue.Queue()
        (ids,), (cut,) = self.encode([prompt])
        r = self.submit(ids, s, q.put, cut, adapter)
        try:
            while True:
                text, end = _pieces(q.get(), q)
                if text:
                    yield text
                if end is not None:
                    yield end
                    return
        finally:
            self.cancel(r)

    async def agenerate(
        self, prompt: str, s: Sampling, ids: list[int] | None = None, adapter: int = 0, salt: str | None = None
    ) -> dict:
        """One request from an event loop (a server handler): no thread waits for it. ``ids``: the
        prompt already encoded (off the loop, within ``max_prompt_tokens``), so it is not done twice;
        ``salt``: its cache salt (a tenant's: prefixes are shared only with the same salt)."""
        import asyncio

        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def emit(item):
            if isinstance(item, dict):
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(item))

        (ids,), (cut,) = ([ids], [False]) if ids is not None else self.encode([prompt])
        r = self.submit(ids, s, emit, cut, adapter, salt)
        try:
            out = await fut
        finally:
            self.cancel(r)  # a no-op when it finished; frees the slot when the caller was cancelled
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    async def astream(
        self, prompt: str, s: Sampling, ids: list[int] | None = None, adapter: int = 0, salt: str | None = None
    ) -> AsyncIterator[str | dict]:
        """:meth:`stream` for an event loop: no thread per open stream (``ids``, ``salt``: as
        :meth:`agenerate`'s)."""
        import asyncio

        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        (ids,), (cut,) = ([ids], [False]) if ids is not None else self.encode([prompt])
        r = self.submit(ids, s, lambda item: loop.call_soon_threadsafe(q.put_nowait, item), cut, adapter, salt)
        try:
            while True:
                text, end = _pieces(await q.get(), q)
                if text:
                    yield text
                if end is not None:
                    yield end
                    return
        finally:
            self.cancel(r)

    # ── the loop thread ─────────────────────────────────────────────────────
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self.live and not self.waiting and self.pending is None and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
            try:
                with self.lock:
                    self.step()
            except Exception as e:  # a failed step fails its requests, not the replica
                with self._cv:
                    failed = list(self.live.values()) + list(self.waiting)
                    self.live.clear()
                    self.waiting.clear()
                    self.prefilling.clear()
                    self.pending = None
                    if self.prefixes is not None:  # what a failed step left in the cache is not trusted
                        self.prefixes.clear()
                try:
                    self.slots.cur_pos.fill_(-1)
                except Exception:  # a broken device: the next step reports it to its requests
                    pass
                for r in failed:
                    r.emit({"error": f"generation failed: {e!r}"})
            if self.on_step is not None:
                try:
                    self.on_step()
                except Exception:  # an observer's problem never stops the loop
                    pass

    def step(self) -> None:
        """One turn of the loop: launch the decode step of every live request that still needs a
        token, then (while the GPU runs it) hand out the previous step's tokens, then admit and
        prefill new requests. The decode step reads and advances the slots' state on the device, so
        its inputs never wait for the host; a request that ended in the previous step was decoded
        once more in this one, and that token is dropped (its slot is not reused before then)."""
        for slot in [s for s, r in self.live.items() if r.cancelled]:
            self._free(self.live[slot])
        rows = [r for r in self.live.values() if 0 < r.launched < r.sampling.max_new_tokens and not r.done]
        launched = self._launch(rows) if rows else None
        if self.pending is not None:
            self._finish(self.pending)
        self.pending = launched
        plan = self._plan()
        if plan:
            try:
                self._prefill(plan)
            except Exception as e:  # out of memory on a big admission: those requests fail, not the live ones
                for r, _, _ in plan:
                    if not r.done:
                        self._free(r)
                        r.emit({"error": f"admission failed: {e!r}"})
                    if self.prefixes is not None:  # its slot's cache was being written
                        self.prefixes.drop(r.slot)
                if self.slots.device.type == "cuda":
                    torch.cuda.empty_cache()
        self.steps += 1

    def _free(self, r: _Request) -> None:
        r.done = True
        self.slots.stop(r.slot)
        self._used[r.slot] = self.steps
        if self.prefixes is not None:  # the slot keeps what it computed: the prompt, the answer but its last token
            whole = r.prefilled == len(r.ids)
            self.prefixes.set(r.slot, r.key, r.ids + r.out[:-1] if whole else r.ids[: r.prefilled])
        self.live.pop(r.slot, None)
        if r in self.prefilling:
            self.prefilling.remove(r)

    def _launch(self, rows: list[_Request]) -> _Launch | None:
        """Start the decode step of ``rows``. A step with a constrained row runs in two halves: the
        forward is launched first, the previous step's tokens (:attr:`pending`) are handed out while
        it runs (each matcher needs its row's newest token), then the bitmasks are computed and the
        rows sampled under them; None if every row ended meanwhile."""
        n = max(r.slot for r in rows) + 1
        length = max(len(r.ids) + r.launched for r in rows)  # the longest row's position + 1
        sampling = any(r.sampling.temperature > 0 for r in rows)
        adjust = any(r.sampling.adjusted for r in rows)  # penalties or a bias: eagerly only then, in graphs always
        masked = any(r.matcher is not None for r in rows)
        if masked:
            logits = self.slots.forward(n, length, self.graphs)
            if self.pending is not None:
                self._finish(self.pending)
                self.pending = None
            rows = [r for r in rows if not r.done]  # the others' rows of this step are dropped
            if not rows:
                return None
            self.slots.set_bits(self._bits([r for r in rows if r.matcher is not None], self.slots.num_slots))
        self._draws(rows, sampling)
        if masked:
            tokens, logits = self.slots.pick(logits, n, length, sampling, self.graphs, adjust)
        else:
            tokens, logits = self.slots.run(n, length, sampling, self.graphs, adjust)
        for r in rows:
            r.launched += 1
            if r.launched >= r.sampling.max_new_tokens:
                self.slots.stop(r.slot)  # its last token is decided: the next steps leave it
        lp = self._logprob_tensors(rows, logits, tokens, max(r.slot for r in rows) + 1)
        cuda = tokens.device.type == "cuda"
        host = [_host(t) for t in (tokens, *lp)]
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        return _Launch(rows, host[0], host[1:], event)

    def _draws(self, rows: list[_Request], sampling: bool) -> None:
        """One uniform draw per sampled token of each request: a seeded request's text is its own."""
        if sampling:
            u = [0.0] * self.slots.num_slots
            for r in rows:
                u[r.slot] = r.rng.random()
            self.slots.set_draws(u)

    def _finish(self, launch: _Launch) -> None:
        """Hand out a launched step's tokens (waiting for them, if the GPU is still at it)."""
        if launch.event is not None:
            launch.event.synchronize()
        tokens = launch.tokens.tolist()
        lp = [x.tolist() for x in launch.lp]
        for r in launch.rows:
            if not r.done:  # else cancelled, or ended a step earlier
                self._accept(r, tokens[r.slot], lp, r.slot)

    def _accept(self, r: _Request, t: int, lp: list, row: int) -> None:
        """Token ``t`` joins request ``r``: its grammar moves on, its logprob entry (row ``row`` of
        the step's logprob lists ``lp``, when it asks) is kept, its text is emitted."""
        if r.first is None:
            r.first = time.perf_counter() - r.t0
        if r.matcher is not None:
            r.matcher.consume(t)
        if lp and r.sampling.logprobs is not None:
            k = r.sampling.logprobs
            r.lps.append({"id": t, "logprob": lp[0][row], "top": list(zip(lp[2][row][:k], lp[1][row][:k]))})
        r.out.append(t)
        r.starts.append(len(r.text))
        self._emit(r)

    @staticmethod
    def _logprob_tensors(reqs: list[_Request], logits: torch.Tensor, tokens: torch.Tensor, n: int) -> tuple:
        """(chosen, top values, top ids) of the first ``n`` rows, on the device, when a request asks
        for logprobs (before temperature, top-p and any grammar's mask, as OpenAI reports them)."""
        ks = [r.sampling.logprobs for r in reqs if r.sampling.logprobs is not None]
        if not ks:
            return ()
        lp = torch.log_softmax(logits[:n].float(), -1)
        top_v, top_i = lp.topk(max(ks), -1)
        return lp.gather(1, tokens[:n, None])[:, 0], top_v, top_i

    def _plan(self) -> list[tuple[_Request, int, int]]:
        """This step's prefill, as (request, start, end) chunks of prompts: the partly prefilled
        requests first, then waiting ones into free slots (:meth:`_victim`). The chunks run packed
        (no padding), so their tokens stay within ``prefill_tokens``; a prompt longer than that
        is prefilled a chunk per step, the live requests decoding in between.

        With prefix reuse, a newcomer starts after the longest beginning of its prompt a slot holds
        (copied into its slot, or that slot itself when it is free and among the rows the decode
        steps compute; :mod:`.prefix`) or, with a host store, that the store holds when it holds
        more (copied back). What the newcomer's slot held moves first to an idle slot past those
        rows (:meth:`_park`), else to the host store, unless held elsewhere. One whose prompt
        shares much more with a prompt prefilled in this step waits a step, a free slot kept for it;
        the requests behind it go ahead into the other free slots."""
        budget, plan = self.prefill_tokens, []

        def take(rest: int) -> int:  # how much of a prompt's rest this step's batch can hold
            if sum(b - a for _, a, b in plan) + rest <= budget:
                return rest
            return 0 if plan else min(rest, budget)

        for r in list(self.prefilling):
            n = take(len(r.ids) - r.prefilled)
            if not n:
                break
            plan.append((r, r.prefilled, r.prefilled + n))
        if len(plan) < len(self.prefilling):  # a partly prefilled prompt waits: no newcomer overtakes it
            return plan
        free = [s for s in range(self.slots.num_slots) if s not in self.live]
        soon = {r.slot: (r.key, r.ids[:b]) for r, _, b in plan}  # what this step's prefill will hold
        deferred = 0  # requests left in the queue for a step, each keeping a free slot for then
        with self._cv:
            while len(free) > deferred and deferred < len(self.waiting):
                r = self.waiting[deferred]
                if r.cancelled:
                    del self.waiting[deferred]
                    continue
                slot, src, reuse, entry = self._victim(free), -1, 0, None
                if self.prefixes is not None:
                    src, reuse = self.prefixes.best(r.ids, r.key, len(r.ids) - 1)
                    if self.store is not None:  # more of it in host memory: copied back (a slot's copy is cheaper)
                        e, n = self.store.find(r.ids, r.key, len(r.ids) - 1)
                        if n > reuse:
                            src, reuse, entry = -1, n, e
                    if not self._pays(reuse, len(r.ids)):
                        src, reuse, entry = -1, 0, None
                    # a prompt being prefilled in this step shares much more: wait a step and copy it then
                    later = self.prefixes.best(r.ids, r.key, len(r.ids) - 1, soon)[1]
                    if later >= reuse + DEFER_FOR and self._pays(later, len(r.ids)):
                        deferred += 1  # the requests behind it that share nothing do not wait with it
                        continue
                    if reuse >= TAKE_SLOT_FROM and src in free and (src < self._bound() or not self.park):
                        slot = src  # no copy, and no more rows for the decode steps than the other choice
                n = take(len(r.ids) - reuse)
                if not n:
                    break
                del self.waiting[deferred]
                free.remove(slot)
                r.slot = slot
                self.live[slot] = r
                self.slots.set_adapter(slot, r.adapter)
                if self.prefixes is not None:
                    pages = self.store.take(entry) if entry is not None else None
                    if src >= 0:
                        self._used[src] = self.steps
                    # what the slot held, before it is overwritten: to an idle slot, else to the host
                    kept = reuse if src == slot else 0
                    if not self._park(slot, kept, free, src, entry) and self.store is not None:
                        self._keep(slot, kept, entry)
                    if pages is not None:
                        self.slots.load_prefix(slot, self.store.pool, pages, reuse)
                    elif reuse and src != slot:
                        self.slots.copy_prefix(src, slot, reuse)  # before this step's prefill writes into src
                    self.prefixes.set(slot, r.key, r.ids[:reuse])
                    soon[slot] = (r.key, r.ids[: reuse + n])
                r.prefilled = r.cached = reuse
                plan.append((r, reuse, reuse + n))
                if reuse + n < len(r.ids):
                    self.prefilling.append(r)
        return plan

    def _worth(self, slot: int) -> tuple[int, int]:
        """What losing what slot ``slot`` holds costs, to compare: (0, 0) when it holds nothing, or
        fewer than ``TAKE_SLOT_FROM`` tokens that no other slot holds under its key (say, a chat's
        earlier turn, its next turn in another slot: :meth:`SlotPrefixes.unique`); else (1, its
        last use)."""
        return (1, self._used[slot]) if self.prefixes.unique(slot) >= TAKE_SLOT_FROM else (0, 0)

    def _bound(self) -> int:
        """The rows the decode steps compute anyway: up to the highest live slot, or as many as the
        live and waiting requests together fill (a burst fills the slots it finds)."""
        return max(max(self.live, default=-1) + 1, min(self.slots.num_slots, len(self.live) + len(self.waiting)))

    def _victim(self, free: list[int]) -> int:
        """The free slot a newcomer takes when it takes none for its prefix: one of the rows the
        decode steps compute anyway (:meth:`_bound`: there is always a free one), the one whose
        prefix is worth least (:meth:`_worth`), the lowest among equals: the live slots stay
        packed at the front, and the prefixes above them are kept."""
        if self.prefixes is None or not self.park:
            return free[0]
        bound = self._bound()
        return min((s for s in free if s < bound), key=lambda s: (self._worth(s), s))

    def _park(self, slot: int, kept: int, free: list[int], src: int, entry: int | None) -> bool:
        """Before a newcomer overwrites all but the first ``kept`` positions of ``slot``, copy what
        the slot holds to a free slot past the rows the decode steps compute (:meth:`_bound`; one
        device copy), the one whose own prefix is worth least, if that is worth less than this one
        and what is lost is long enough to be worth reusing (what that slot held goes to the host
        store, when there is one and it is worth it). The copy keeps its last use: the idle slots
        hold the most recently used prefixes. True if nothing worth keeping is lost (parked, or
        held whole by another slot)."""
        rec = self.prefixes.held[slot]
        if not self.park or rec is None or len(rec[1]) - kept < TAKE_SLOT_FROM:
            return False
        mine = self._worth(slot)
        if mine[0] == 0:
            return True
        bound = self._bound()
        spots = [s for s in free if s >= bound and s not in (slot, src)]
        if not spots:
            return False
        to = min(spots, key=lambda s: (self._worth(s), -s))  # the highest among equals
        if self._worth(to) >= mine:
            return False
        if self.store is not None:  # what the spot held, to the host if worth it (never in place of ``entry``)
            self._keep(to, 0, entry)
        self.slots.copy_prefix(slot, to, len(rec[1]))
        self.prefixes.set(to, *rec)
        self._used[to] = self._used[slot]
        return True

    def _keep(self, slot: int, kept: int, using: int | None) -> None:
        """Copy what ``slot`` holds into the host store before a new request overwrites all of it
        but its first ``kept`` tokens, if what is lost is long enough to be worth reusing and no
        other slot or entry holds it whole (never in place of entry ``using``, about to be copied
        into the slot)."""
        rec = self.prefixes.held[slot]
        if rec is None or len(rec[1]) - kept < TAKE_SLOT_FROM:
            return
        others = [h for s, h in enumerate(self.prefixes.held) if s != slot]
        if not self.store.fits(len(rec[1])) or covers(others, *rec) or self.store.holds(*rec):
            return
        pages = self.store.add(*rec, keep=using)
        if pages is not None:
            self.slots.save_prefix(slot, len(rec[1]), self.store.pool, pages)

    def _pays(self, reuse: int, length: int) -> bool:
        """Whether a prompt of ``length`` tokens computes less when its first ``reuse`` come from a
        slot: the rest then runs as a continuing chunk, whose attention (a mask over the slot's cache)
        computes every query-key pair, where a whole prompt's causal kernel skips the half above the
        diagonal. Reuse saves ``reuse`` tokens' products and adds ``rest x length - length² / 2``
        pairs: on a model whose layers are small beside its attention (the 4 M-parameter test model,
        a 1,400-token prompt) only a prefix of ~40% pays; on a 7B, ~40 tokens do."""
        pairs = length * length / 2 - (length - reuse) * length
        return reuse > 0 and reuse * self._per_token > -pairs * self._per_pair

    def _prefill(self, plan: list[tuple[_Request, int, int]]) -> None:
        """Run this step's prompt chunks into their slots; the requests whose prompt is now whole
        sample their first token and start decoding."""
        logits = self.slots.prefill(
            [r.ids[a:b] for r, a, b in plan], [r.slot for r, _, _ in plan], [a for _, a, _ in plan]
        )
        whole = []
        for i, (r, _, b) in enumerate(plan):
            r.prefilled = b
            if self.prefixes is not None:
                self.prefixes.set(r.slot, r.key, r.ids[:b])
            if b == len(r.ids):
                whole.append(i)
                if r in self.prefilling:
                    self.prefilling.remove(r)
        if whole:
            rows = torch.tensor(whole, device=logits.device) if len(whole) < len(plan) else None
            self._start([plan[i][0] for i in whole], logits if rows is None else logits[rows])

    def _bits(self, reqs: list[_Request], rows: int, by_slot: bool = True) -> torch.Tensor:
        """The bitmask of allowed next tokens of ``rows`` rows: each constrained request's at its
        slot (``by_slot``) or at its index in ``reqs``; every other row all ones."""
        from cerbero_ray.inference.grammar import bitmask, fill_rows

        bits = bitmask(rows, self.slots.vocab)
        fill_rows(bits, [(r.matcher, r.slot if by_slot else i) for i, r in enumerate(reqs) if r.matcher is not None])
        return bits

    def _start(self, new: list[_Request], logits: torch.Tensor) -> None:
        """Sample the first tokens of prompts just prefilled (each under its logit bias and its
        repetition penalty over the prompt; no token generated yet: the other penalties have nothing
        to count), start their slots on the device."""
        temp = [r.sampling.temperature for r in new]
        top_p = [r.sampling.top_p for r in new]
        u = torch.tensor([r.rng.random() for r in new], dtype=torch.float32)
        f32 = torch.float32
        slots = [r.slot for r in new]
        self.slots.set_bias(slots, [r.sampling.logit_bias for r in new])
        self.slots.set_sampling(
            slots,
            temp,
            top_p,
            [r.sampling.frequency_penalty for r in new],
            [r.sampling.presence_penalty for r in new],
            [r.sampling.repetition_penalty for r in new],
        )
        held = logits
        rows = torch.tensor(slots, device=logits.device)  # the new requests' slots, in their order
        repeat = [(r.slot, r.ids) for r in new if r.sampling.repetition_penalty != 1]
        if repeat:  # the first token already pays for the prompt's tokens
            self.slots.set_prompt(*zip(*repeat))
            from cerbero_ray.inference.sampling import penalize

            zero = torch.zeros(len(new), device=logits.device)
            rep, seen = self.slots.rep[rows], self.slots.in_prompt[rows]
            held = penalize(held, torch.zeros_like(held), zero, zero, rep, seen)
        if any(r.sampling.logit_bias for r in new):
            held = held + self.slots.bias[rows]
        if any(r.matcher is not None for r in new):
            from cerbero_ray.inference.grammar import mask_logits

            held = mask_logits(held, self._bits(new, len(new), by_slot=False).to(logits.device))
        tokens = sample(held, torch.tensor(temp, dtype=f32), torch.tensor(top_p, dtype=f32), u)
        going = [i for i, r in enumerate(new) if r.sampling.max_new_tokens > 1]
        if going:
            idx = torch.tensor(going, device=tokens.device)
            self.slots.start([slots[i] for i in going], tokens[idx], [len(new[i].ids) for i in going])
        lp = [x.tolist() for x in self._logprob_tensors(new, logits, tokens, len(new))]
        for i, (r, t) in enumerate(zip(new, tokens.tolist())):
            r.launched = 1
            self._accept(r, t, lp, i)

    def _emit(self, r: _Request) -> None:
        s = r.sampling
        eos = r.out[-1] == self.eos
        if not eos:
            r.text += self._detokenize(r)
        cut, stopped = cut_at_stop(r.text, s.stop)
        complete = r.matcher is not None and r.matcher.done  # the grammar allows nothing more
        done = eos or stopped or complete or len(r.out) >= s.max_new_tokens
        hold = 0 if done else max((len(x) for x in s.stop), default=1) - 1
        safe = len(cut) - hold
        if safe > r.sent:
            r.emit(self._piece(r, cut[r.sent : safe], safe))
            r.sent = safe
        if done:
            r.text = cut
            self._free(r)  # before the last emit: whoever waits on it sees the slot free
            end = {
                "finish_reason": "stop" if eos or stopped or complete else "length",
                "prompt_tokens": len(r.ids),
                "cached_tokens": r.cached,  # of them, reused from a slot's cache (prefix reuse)
                "new_tokens": len(r.out),
                "truncated": r.truncated,
                "text": cut.strip(),
                "first_token_s": r.first,  # from submission to the first token, and to the end
                "seconds": time.perf_counter() - r.t0,
            }
            if r.matcher is not None:  # did the output reach the end of its grammar?
                end["constraint"] = "complete" if (complete or r.matcher.accepting) and not stopped else "incomplete"
            if s.logprobs is not None:  # the tokens of the text (not the stop string's, not EOS)
                end["logprobs"] = [e for e, at in zip(r.lps, r.starts) if at < len(cut)]
            r.emit(end)

    @staticmethod
    def _piece(r: _Request, text: str, upto: int) -> str:
        """``text``, with the entries of the tokens that start before ``upto`` not yet sent."""
        if r.sampling.logprobs is None:
            return text
        n = r.lp_sent
        while n < len(r.starts) and r.starts[n] < upto:
            n += 1
        piece, r.lp_sent = Piece(text, r.lps[r.lp_sent : n]), n
        return piece

    def _detokenize(self, r: _Request) -> str:
        """The text the newest token adds: the last few tokens decoded with and without it (a
        token's leading space and multi-token characters come out right), held while incomplete."""
        start, read = r.offsets
        before = self.tok.decode(r.out[start:read], skip_special_tokens=True)
        after = self.tok.decode(r.out[start:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            r.offsets = (read, len(r.out))
            return after[len(before) :]
        return ""
