"""The generation engine: batched sampling from a causal LM, stopping at the cerbero stop string.
Plain PyTorch + transformers, no Ray (the batch job wraps it; benchmarks run it bare).

Prompts are already rendered (chat template applied) and encoded by
:func:`cerbero_ray.tokenizer.encode_prompts` (a long one drops its oldest turns, keeping BOS and the
system line). They are sorted by length and run in left-padded batches of ``batch_size``; ``stop``
strings end a sequence (transformers' ``stop_strings``) and are cut from the text.
``finish_reason`` is ``stop`` (a stop string or the end-of-sequence token) or ``length``
(``max_new_tokens`` reached). Frequency and presence penalties (over the tokens generated past the
padded prompts) and a logit bias run as a logits processor (:class:`Adjust`).
"""

from __future__ import annotations

import torch

from cerbero_ray.config.sampling import check_token_ids
from cerbero_ray.inference.sampling import Sampling, cut_at_stop
from cerbero_ray.tokenizer import encode_prompts


class Adjust:
    """A transformers logits processor: the repetition penalty over the prompt's tokens (those past
    each row's left padding, ``pads``) and the answer's, then OpenAI's frequency and presence
    penalties on the tokens generated so far (those past the first ``width``), then the logit bias:
    :func:`~cerbero_ray.inference.sampling.penalize`'s order, as the continuous engine applies them."""

    def __init__(self, width: int, s: Sampling, pads: list[int] | None = None):
        self.width, self.frequency, self.presence = width, s.frequency_penalty, s.presence_penalty
        self.repetition, self.pads = s.repetition_penalty, pads
        self.logit_bias, self.bias, self.in_prompt = dict(s.logit_bias or {}), None, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        from cerbero_ray.inference.sampling import penalize

        dev, dt, rows = scores.device, scores.dtype, scores.shape[0]
        if self.logit_bias and self.bias is None:
            self.bias = torch.zeros(scores.shape[-1], dtype=dt, device=dev)
            vals = torch.tensor(list(self.logit_bias.values()), dtype=dt, device=dev)
            self.bias[torch.tensor(list(self.logit_bias), device=dev)] = vals
        if self.repetition != 1 and self.in_prompt is None:  # the prompt's tokens, padding left out
            pads = torch.tensor(self.pads or [0] * rows, device=dev)
            real = (torch.arange(self.width, device=dev)[None, :] >= pads[:, None]).int()
            held = torch.zeros(scores.shape, dtype=torch.int32, device=dev)
            self.in_prompt = held.scatter_add_(1, input_ids[:, : self.width], real) > 0
        if self.frequency or self.presence or self.repetition != 1:
            new = input_ids[:, self.width :]
            counts = torch.zeros(scores.shape, dtype=dt, device=dev)
            counts.scatter_add_(1, new, torch.ones(new.shape, dtype=dt, device=dev))
            f = torch.full((rows,), self.frequency, dtype=dt, device=dev)
            rep = torch.full((rows,), self.repetition, dtype=dt, device=dev) if self.repetition != 1 else None
            scores = penalize(scores, counts, f, torch.full_like(f, self.presence), rep, self.in_prompt)
        return scores if self.bias is None else scores + self.bias


class Generator:
    def __init__(self, model, tok, *, batch_size: int = 16, max_prompt_tokens: int = 2048):
        self.model, self.tok = model.eval(), tok
        self.batch_size, self.max_prompt_tokens = batch_size, max_prompt_tokens
        self.device = next(model.parameters()).device
        if tok.pad_token_id is None:
            tok.pad_token = tok.unk_token or tok.eos_token

    def forget(self) -> None:
        """Nothing is kept between calls (the continuous engine's :meth:`forget` drops its prefixes)."""

    def generate_kwargs(self, s: Sampling, width: int, pads: list[int] | None = None) -> dict:
        """``model.generate`` settings for ``s`` (temperature 0: greedy) on prompts left-padded to
        ``width`` tokens, each row by ``pads`` (penalties and a logit bias: :class:`Adjust`)."""
        sample = s.temperature > 0
        check_token_ids(s.logit_bias, self.model.get_output_embeddings().weight.shape[0])
        kwargs = dict(
            max_new_tokens=s.max_new_tokens,
            do_sample=sample,
            temperature=s.temperature if sample else None,
            top_p=s.top_p if sample else None,
            top_k=None,
            stop_strings=list(s.stop) or None,
            tokenizer=self.tok,
            pad_token_id=self.tok.pad_token_id,
            eos_token_id=self.tok.eos_token_id,
        )
        if s.adjusted:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([Adjust(width, s, pads)])
        return kwargs

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: Sampling, seed: int | None = None) -> list[dict]:
        """Per prompt: ``text``, ``finish_reason``, ``prompt_tokens``, ``new_tokens``, ``truncated``."""
        if not prompts:
            return []
        ids, truncated = encode_prompts(self.tok, prompts, self.max_prompt_tokens)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out: list[dict] = [{}] * len(ids)
        seed = sampling.seed if seed is None else seed
        if seed is not None:  # None: a fresh random draw (the serving default, as OpenAI's API)
            torch.manual_seed(seed)
        for b in range(0, len(order), self.batch_size):
            batch = order[b : b + self.batch_size]
            for i, r in zip(batch, self._batch([ids[i] for i in batch], sampling)):
                out[i] = {**r, "truncated": truncated[i]}
        return out

    def _batch(self, ids: list[list[int]], s: Sampling) -> list[dict]:
        width = max(len(x) for x in ids)
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        gen = self.model.generate(
            input_ids=input_ids, attention_mask=mask, **self.generate_kwargs(s, width, [width - len(x) for x in ids])
        )
        out = []
        for row in gen[:, width:].tolist():
            n = next((k + 1 for k, t in enumerate(row) if t == self.tok.eos_token_id), None)
            new = row[:n] if n else [t for t in row if t != pad]
            text, stopped = cut_at_stop(self.tok.decode(new, skip_special_tokens=True), s.stop)
            ended = stopped or (n is not None)
            out.append({"text": text.strip(), "finish_reason": "stop" if ended else "length", "new_tokens": len(new)})
        for r, x in zip(out, ids):
            r["prompt_tokens"] = len(x)
        return out
