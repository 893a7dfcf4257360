"""The scoring engine: one forward pass per prompt scores every label. Plain PyTorch, no Ray.

The tokens every prompt of a call starts with (the few-shot examples and the instruction, often
half the prompt) run once; their KV cache is shared by every row. A row of a batch is the rest of
the prompt followed by every label's continuation, each continuation seeing the prompt and itself
only (a 4-D attention mask; positions continue from the prompt's end):

    [ prompt ........ ][ Positivo \\n </s> ][ Negativo \\n </s> ][ Neutro \\n </s> ][pad]

so the prompt is computed once for all labels. A label's score is the sum of the log-probabilities
of its continuation's tokens (multi-token labels summed exactly); probabilities are the softmax of
the scores over the labels. The LM head runs only at the positions that predict a continuation
token. Batches are formed by a token budget after sorting rows by length within a window, which
cuts padding while keeping memory bounded.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging

import numpy as np
import torch

from cerbero_ray.config.label_task import LabelTask
from cerbero_ray.inference.label_prompts import continuations, text_prompts
from cerbero_ray.tokenizer import encode_prompts

log = logging.getLogger(__name__)


def plan_batches(lengths: list[int], extra: int, max_tokens: int, window: int) -> list[list[int]]:
    """Row indices per batch: within each window of ``window`` rows, longest first; a batch grows
    while ``rows × (longest + extra)`` stays within ``max_tokens`` (a lone row is always allowed)."""
    out = []
    for w in range(0, len(lengths), window):
        order = sorted(range(w, min(w + window, len(lengths))), key=lambda i: -lengths[i])
        batch, longest = [], 0
        for i in order:
            width = max(longest, lengths[i] + extra)
            if batch and width * (len(batch) + 1) > max_tokens:
                out.append(batch)
                batch, width = [], lengths[i] + extra
            batch.append(i)
            longest = width
        if batch:
            out.append(batch)
    return out


class Scorer:
    """Scores texts for one task with one causal LM."""

    def __init__(
        self,
        model,
        tok,
        task: LabelTask,
        *,
        max_text_tokens: int = 512,
        max_batch_tokens: int = 16384,
        sort_window: int = 256,
        min_shared_prefix: int = 16,
    ):
        self.model, self.tok, self.task = model, tok, task
        self.max_text_tokens, self.max_batch_tokens, self.sort_window = max_text_tokens, max_batch_tokens, sort_window
        self.min_shared_prefix = min_shared_prefix
        # transformers >= 5.24 calls the KV cache argument `cache`, earlier 5.x `past_key_values`
        self._cache_kw = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
        conts = continuations(task, tok)
        self.labels = list(conts)
        self.cont = [conts[k] for k in self.labels]
        self.tail = sum(len(c) for c in self.cont)
        # the positions whose next-token distribution a continuation token needs: the prompt's last
        # token (shared by every label's first token, so computed once), then each continuation's
        # tokens but its last (`_inner`: their offsets into the continuations); `_which`: per
        # continuation token, the index of its predicting position among those
        which, inner, start = [], [], 0
        for c in self.cont:
            which += [0] + list(range(len(inner) + 1, len(inner) + len(c)))
            inner += range(start, start + len(c) - 1)
            start += len(c)
        self.positions = len(inner) + 1
        self._inner = np.asarray(inner, dtype=np.int64)
        self._which = torch.tensor(which)
        self._targets = torch.tensor([t for c in self.cont for t in c])
        model.config._attn_implementation = "sdpa"  # a custom boolean 4-D mask: SDPA, not flash-attention
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    def encode(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Prompt token ids per text; texts over ``max_text_tokens`` keep their first tokens."""
        prompts, truncated = text_prompts(self.task, self.tok, texts, self.max_text_tokens)
        return encode_prompts(self.tok, prompts)[0], truncated

    def _inputs(self, prompts: list[list[int]], offset: int = 0):
        """Batch tensors for ``prompts`` (the tokens after a shared prefix of ``offset`` tokens)."""
        b, t = len(prompts), max(len(p) for p in prompts) + self.tail
        ids = np.full((b, t), self.tok.pad_token_id or 0, dtype=np.int64)
        pos = np.zeros((b, t), dtype=np.int64)
        seg = np.full((b, t), -1, dtype=np.int64)  # 0 prompt, j+1 continuation j, -1 padding
        tail_ids = np.concatenate([np.asarray(c) for c in self.cont])
        tail_seg = np.concatenate([np.full(len(c), j + 1) for j, c in enumerate(self.cont)])
        tail_off = np.concatenate([np.arange(len(c)) for c in self.cont])
        rows, cols = [], []
        for i, p in enumerate(prompts):
            n = len(p)
            ids[i, :n], pos[i, :n], seg[i, :n] = p, offset + np.arange(n), 0
            ids[i, n : n + self.tail], pos[i, n : n + self.tail], seg[i, n : n + self.tail] = (
                tail_ids,
                offset + n + tail_off,
                tail_seg,
            )
            rows.append(np.full(self.positions, i))
            cols.append(np.concatenate([[n - 1], n + self._inner]))
        seg_t = torch.from_numpy(seg)
        idx = torch.arange(t)
        causal = idx[None, :, None] >= idx[None, None, :]
        allowed = (
            causal & ((seg_t[:, None, :] == 0) | (seg_t[:, :, None] == seg_t[:, None, :])) & (seg_t[:, :, None] >= 0)
        )
        allowed |= torch.eye(t, dtype=torch.bool)[None]  # padding attends to itself (no empty rows)
        # SDPA takes a boolean mask (True: attend) as is; every row sees the whole shared prefix
        mask = torch.cat([torch.ones((b, t, offset), dtype=torch.bool), allowed], 2) if offset else allowed
        dev = self.device
        return (
            torch.from_numpy(ids).to(dev),
            torch.from_numpy(pos).to(dev),
            mask[:, None].to(dev),
            torch.from_numpy(np.concatenate(rows)).to(dev),
            torch.from_numpy(np.concatenate(cols)).to(dev),
        )

    def _shared_prefix(self, prompts: list[list[int]]):
        """The tokens every prompt starts with (the few-shot examples and the instruction), run once;
        returns (their number, their KV cache), or (0, None) when too short to be worth it."""
        n = min(len(p) for p in prompts) - 1  # each row keeps a token to predict its first label token from
        first = prompts[0]
        for p in prompts[1:]:
            k = 0
            while k < n and p[k] == first[k]:
                k += 1
            n = k
        if n < self.min_shared_prefix:
            return 0, None
        ids = torch.tensor([first[:n]], device=self.device)
        out = self.model.model(input_ids=ids, position_ids=torch.arange(n, device=self.device)[None], use_cache=True)
        return n, out.cache if self._cache_kw == "cache" else out.past_key_values

    @torch.no_grad()
    def score_ids(self, prompts: list[list[int]], guard=contextlib.nullcontext) -> np.ndarray:
        """``[rows, labels]`` summed continuation log-probabilities. ``guard()`` is entered around
        each forward pass (the shared prefix, then each batch) and left between them: a server holds
        its model's lock there, so a chat step waits at most one batch, not a whole request."""
        out = np.zeros((len(prompts), len(self.labels)), dtype=np.float64)
        lens = [len(c) for c in self.cont]
        bounds = np.cumsum([0] + lens)
        with guard():
            shared, cache = self._shared_prefix(prompts)
        which, targets = self._which.to(self.device), self._targets.to(self.device)
        lengths, todo = [len(p) for p in prompts], list(range(len(prompts)))
        while todo:  # again with a smaller budget after a batch ran out of memory
            plan = plan_batches([lengths[i] for i in todo], self.tail, self.max_batch_tokens, self.sort_window)
            done = set()
            for batch in ([todo[j] for j in b] for b in plan):
                try:
                    tok_lp = self._batch(prompts, batch, shared, cache, which, targets, guard)
                except torch.OutOfMemoryError:
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    if len(batch) > 1:
                        self._lower_budget(len(batch) * (max(lengths[i] for i in batch) + self.tail))
                        break
                    out[batch] = np.nan  # this row alone does not fit: an error row (score)
                else:
                    out[batch] = np.stack([tok_lp[:, bounds[j] : bounds[j + 1]].sum(1) for j in range(len(lens))], 1)
                done.update(batch)
            todo = [i for i in todo if i not in done]
        return out

    def _batch(self, prompts, batch, shared, cache, which, targets, guard) -> np.ndarray:
        """The continuation tokens' log-probabilities of the rows ``batch``: ``[rows, tokens]``."""
        ids, pos, mask, rows, cols = self._inputs([prompts[i][shared:] for i in batch], shared)
        past = None
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(batch))
        with guard():
            hidden = self.model.model(
                input_ids=ids,
                position_ids=pos,
                attention_mask=mask,
                use_cache=past is not None,
                **{self._cache_kw: past},
            ).last_hidden_state
            logits = self.model.lm_head(hidden[rows, cols]).float().view(len(batch), self.positions, -1)
        return torch.log_softmax(logits, -1)[:, which, targets].double().cpu().numpy()

    def _lower_budget(self, used: int) -> None:
        """A batch of ``used`` tokens ran out of memory: batches take half that from now on (for
        every later call too; said once per halving)."""
        old, self.max_batch_tokens = self.max_batch_tokens, max(1, used // 2)
        log.warning(
            f"[scorer] a batch of {used} tokens ran out of memory on {self.device}: batches of at most "
            f"{self.max_batch_tokens} tokens from now on (max_batch_tokens={old}; set it lower to skip this)"
        )

    def score(self, texts: list[str], guard=contextlib.nullcontext) -> list[dict]:
        """Per text: ``label``, ``probs`` {label: p}, ``logprobs`` {label: summed log p}, ``truncated``
        (and ``error``, the others None, for a prompt longer than the model's sliding window).
        ``guard``: see :meth:`score_ids`."""
        if not texts:
            return []
        prompts, truncated = self.encode(texts)
        # the 4-D mask is plain causal: a prompt and its longest label must fit the model's sliding
        # window (Mistral: 4096), or the score would not be the model's; such a row gets an error
        window = getattr(self.model.config, "sliding_window", None)
        longest = max(len(c) for c in self.cont)
        fits = [not window or len(p) + longest <= window for p in prompts]
        if not all(fits):
            good = [i for i, ok in enumerate(fits) if ok]
            scored = iter(self.score([texts[i] for i in good], guard) if good else [])
            err = f"the prompt is longer than the model's sliding window ({window} tokens)"
            return [
                next(scored) if ok else {"label": None, "probs": None, "logprobs": None, "truncated": cut, "error": err}
                for ok, cut in zip(fits, truncated)
            ]
        lp = self.score_ids(prompts, guard)
        with np.errstate(invalid="ignore"):  # a row that did not fit is NaN: an error row below
            probs = np.exp(lp - lp.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
        return [
            {
                "label": self.labels[int(np.argmax(p))],
                "probs": dict(zip(self.labels, p.tolist())),
                "logprobs": dict(zip(self.labels, lps.tolist())),
                "truncated": cut,
            }
            if not np.isnan(lps).any()
            else {
                "label": None,
                "probs": None,
                "logprobs": None,
                "truncated": cut,
                "error": f"out of memory: this row alone ({len(ids)} tokens) does not fit; lower max_text_tokens",
            }
            for p, lps, cut, ids in zip(probs, lp, truncated, prompts)
        ]
