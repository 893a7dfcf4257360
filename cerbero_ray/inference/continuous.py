"""Continuous batching: requests join and leave a running decode batch between steps. Plain
PyTorch, no Ray (a serving replica runs one :class:`ContinuousBatcher`; benchmarks drive it bare).

Each step of the loop thread:
  1. decode one token for every live slot, each at its own position (:class:`SlotModel`);
  2. admit waiting requests into free cache slots (lowest first, so the live slots stay packed at
     the front) and prefill them together, up to ``prefill_tokens`` prompt tokens per step;
  3. sample per request (its own temperature, top-p and, when it has one, seeded random stream, so
     a seeded request gives the same text whatever else is in the batch), detokenize incrementally,
     hand the new text to the request's callback, and free the slots of finished requests.

A short request never waits for a long one, a new request waits at most one step, and streaming
and non-streaming requests share the same batch. With LoRA adapters loaded
(:mod:`cerbero_ray.inference.multilora`), requests for different adapters (and the base) share it
too: each slot's adapter is a row of a table the model's adapted layers gather from.

A request ends at the end-of-sequence token, at one of its stop strings (cut from the text) or at
``max_new_tokens``; text that could be the start of a stop string, or an incomplete UTF-8
character, is held back until it is decided.

With ``Sampling.logprobs`` set (``k``), each token's log-probability under the model (before
temperature and top-p, as OpenAI reports them) and the ``k`` most likely tokens ride along: a
stream's text pieces are :class:`Piece` strings carrying the entries of the tokens they hold, and
the final dict has them all (``logprobs``: ``{"id", "logprob", "top": [(id, logprob), …]}``).
"""

from __future__ import annotations

import queue
import random
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable, Iterator

import torch

from cerbero_ray.inference.sampling import Sampling, cut_at_stop
from cerbero_ray.inference.slots import SlotModel
from cerbero_ray.tokenizer import encode_prompts


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


class Piece(str):
    """A piece of streamed text with the log-probability entries of the tokens it holds."""

    logprobs: list[dict]

    def __new__(cls, text: str, logprobs: list[dict]):
        p = super().__new__(cls, text)
        p.logprobs = logprobs
        return p


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row: greedy where ``temperature <= 0``, else the nucleus (``top_p``) of the
    tempered distribution sampled by inverse CDF at the row's uniform draw ``u``. ``temperature``,
    ``top_p`` and ``u`` may stay on the CPU next to GPU logits: which rows sample is then known
    without waiting for the GPU, and an all-greedy batch moves nothing to it."""
    out = logits.argmax(-1)
    rows = (temperature > 0).nonzero()[:, 0]
    if len(rows):  # the vocabulary sort only for the rows that sample
        dev = logits.device
        rows_d, temp, p, draw = (x.to(dev) for x in (rows, temperature[rows], top_p[rows], u[rows]))
        probs = torch.softmax(logits[rows_d] / temp[:, None], -1)
        sp, si = probs.sort(-1, descending=True)
        keep = (sp.cumsum(-1) - sp) < p[:, None]  # the most likely token is always kept
        cum = (sp * keep).cumsum(-1)
        k = torch.searchsorted(cum, (draw * cum[:, -1])[:, None]).clamp(max=logits.shape[-1] - 1)
        out[rows_d] = si.gather(1, k)[:, 0]
    return out


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
        lock: threading.Lock | None = None,
        adapters=None,
    ):
        self.tok = tok
        self.adapters = adapters  # an AdapterSet: requests name theirs, mixed in every step
        self.slots = SlotModel(model, num_slots, max_prompt_tokens + max_new_tokens, adapters)
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
        threading.Thread(target=self._loop, name="continuous-batcher", daemon=True).start()

    # ── the public side (any thread) ────────────────────────────────────────
    def encode(self, prompts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of rendered prompts within ``max_prompt_tokens`` (:func:`encode_prompts`)."""
        return encode_prompts(self.tok, prompts, self.max_prompt_tokens)

    def submit(
        self, ids: list[int], s: Sampling, emit: Callable[[object], None], truncated: bool = False, adapter: int = 0
    ) -> _Request:
        if adapter and (self.adapters is None or not 0 <= adapter < len(self.adapters.names)):
            raise ValueError(f"no adapter {adapter} is loaded")
        if not ids:
            raise ValueError("an empty prompt")
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(f"{len(ids)} prompt tokens; at most {self.max_prompt_tokens} (encode with encode())")
        if not 1 <= s.max_new_tokens <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens must be within 1..{self.max_new_tokens}, got {s.max_new_tokens}")
        r = _Request(
            ids,
            s,
            emit,
            truncated=truncated,
            rng=random.Random(s.seed) if s.seed is not None else random.Random(),
            adapter=adapter,
        )
        with self._cv:
            self.waiting.append(r)
            self._cv.notify()
        return r

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
        for x, c, it, q in zip(ids, cut, items, done):
            adapter = it[2] if len(it) > 2 else 0
            self.submit(x, it[1], lambda item, q=q: q.put(item) if isinstance(item, dict) else None, c, adapter)
        out = [q.get() for q in done]
        for r in out:
            if "error" in r:
                raise RuntimeError(r["error"])
        return out

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

    async def agenerate(self, prompt: str, s: Sampling, ids: list[int] | None = None, adapter: int = 0) -> dict:
        """One request from an event loop (a server handler): no thread waits for it. ``ids``: the
        prompt already encoded (off the loop, within ``max_prompt_tokens``), so it is not done twice."""
        import asyncio

        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def emit(item):
            if isinstance(item, dict):
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(item))

        (ids,), (cut,) = ([ids], [False]) if ids is not None else self.encode([prompt])
        r = self.submit(ids, s, emit, cut, adapter)
        try:
            out = await fut
        finally:
            self.cancel(r)  # a no-op when it finished; frees the slot when the caller was cancelled
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    async def astream(
        self, prompt: str, s: Sampling, ids: list[int] | None = None, adapter: int = 0
    ) -> AsyncIterator[str | dict]:
        """:meth:`stream` for an event loop: no thread per open stream (``ids`` as in :meth:`agenerate`)."""
        import asyncio

        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        (ids,), (cut,) = ([ids], [False]) if ids is not None else self.encode([prompt])
        r = self.submit(ids, s, lambda item: loop.call_soon_threadsafe(q.put_nowait, item), cut, adapter)
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
                while not self.live and not self.waiting:
                    self._cv.wait()
            try:
                with self.lock:
                    self.step()
            except Exception as e:  # a failed step fails its requests, not the replica
                with self._cv:
                    failed = list(self.live.values()) + list(self.waiting)
                    self.live.clear()
                    self.waiting.clear()
                for r in failed:
                    r.emit({"error": f"generation failed: {e!r}"})

    def step(self) -> None:
        """Decode one token for every live request, admit and prefill new ones, emit, free."""
        for slot in [s for s, r in self.live.items() if r.cancelled]:
            del self.live[slot]
        old = list(self.live.values())
        if old:
            n = max(r.slot for r in old) + 1
            ids, pos = [0] * n, [-1] * n  # -1: a free slot, not decoded
            for r in old:
                ids[r.slot], pos[r.slot] = r.out[-1], len(r.ids) + len(r.out) - 1
            logits = self.slots.decode(torch.tensor(ids), torch.tensor(pos), graphs=self.graphs)
            self._advance(old, logits[torch.tensor([r.slot for r in old], device=logits.device)])
        new = self._admit()
        if new:
            logits = self.slots.prefill([r.ids for r in new], [r.slot for r in new])
            self._advance(new, logits)
        self.steps += 1

    def _admit(self) -> list[_Request]:
        new, tokens = [], 0
        free = [s for s in range(self.slots.num_slots) if s not in self.live]
        with self._cv:
            while free and self.waiting:
                r = self.waiting[0]
                if new and tokens + len(r.ids) > self.prefill_tokens:
                    break
                self.waiting.popleft()
                if r.cancelled:
                    continue
                r.slot = free.pop(0)
                self.live[r.slot] = r
                self.slots.set_adapter(r.slot, r.adapter)
                new.append(r)
                tokens += len(r.ids)
        return new

    def _advance(self, reqs: list[_Request], logits: torch.Tensor) -> None:
        temp = torch.tensor([r.sampling.temperature for r in reqs], dtype=torch.float32)  # on the CPU: see sample
        top_p = torch.tensor([r.sampling.top_p for r in reqs], dtype=torch.float32)
        u = torch.tensor([r.rng.random() for r in reqs], dtype=torch.float32)
        tokens = sample(logits, temp, top_p, u).tolist()
        self._logprobs(reqs, logits, tokens)
        for r, t in zip(reqs, tokens):
            r.out.append(t)
            r.starts.append(len(r.text))
            self._emit(r)

    @staticmethod
    def _logprobs(reqs: list[_Request], logits: torch.Tensor, tokens: list[int]) -> None:
        """Each sampled token's log-probability (and the top ones) for the requests that ask."""
        rows = [i for i, r in enumerate(reqs) if r.sampling.logprobs is not None]
        if not rows:
            return
        lp = torch.log_softmax(logits[torch.tensor(rows, device=logits.device)].float(), -1)
        k = max(reqs[i].sampling.logprobs for i in rows)
        top_v, top_i = lp.topk(k, -1) if k else (lp[:, :0], lp[:, :0].long())
        chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=lp.device))[:, 0].tolist()
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, i in enumerate(rows):
            n = reqs[i].sampling.logprobs
            top = list(zip(top_i[j][:n], top_v[j][:n]))
            reqs[i].lps.append({"id": tokens[i], "logprob": chosen[j], "top": top})

    def _emit(self, r: _Request) -> None:
        s = r.sampling
        eos = r.out[-1] == self.eos
        if not eos:
            r.text += self._detokenize(r)
        cut, stopped = cut_at_stop(r.text, s.stop)
        done = eos or stopped or len(r.out) >= s.max_new_tokens
        hold = 0 if done else max((len(x) for x in s.stop), default=1) - 1
        safe = len(cut) - hold
        if safe > r.sent:
            r.emit(self._piece(r, cut[r.sent : safe], safe))
            r.sent = safe
        if done:
            r.text = cut
            del self.live[r.slot]  # before the last emit: whoever waits on it sees the slot free
            end = {
                "finish_reason": "stop" if eos or stopped else "length",
                "prompt_tokens": len(r.ids),
                "new_tokens": len(r.out),
                "truncated": r.truncated,
                "text": cut.strip(),
            }
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
