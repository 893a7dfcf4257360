"""What a serving replica computes, without Ray: chat and completion generation (batched, or
streamed token by token), and labeling with the batch job's scorer.

Generation runs on one of two engines (``serve.engine``):
  continuous  our continuous-batching loop (:mod:`cerbero_ray.inference.continuous`): streaming
              and non-streaming requests share one running batch, joining and leaving between
              decode steps; CUDA-graph decoding on GPU. Mistral/Llama architectures. The default.
  hf          transformers' ``generate``: concurrent requests with the same settings share a
              padded batch, streams run one at a time. Any causal LM.

The Serve app (:mod:`cerbero_ray.serve.app`) owns one :class:`ServeEngine` per replica and feeds it
batches of concurrent requests; benchmarks and tests drive it directly.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import OrderedDict, defaultdict
from typing import Iterator

import torch

from cerbero_ray.config.label_task import LabelTask
from cerbero_ray.inference.engines import EngineConfig, build_engine
from cerbero_ray.inference.sampling import Sampling, cut_at_stop
from cerbero_ray.inference.scorer import Scorer
from cerbero_ray.models import load_for_inference
from cerbero_ray.tokenizer import encode_prompts, render_chat

INLINE_TASKS = 32  # scorers of inline tasks a replica keeps


class ServeEngine:
    def __init__(
        self,
        checkpoint: str,
        dtype: str = "auto",
        tasks: dict[str, LabelTask] | None = None,
        max_batch_size: int = 16,
        max_prompt_tokens: int = 2048,
        *,
        engine: str = "continuous",
        max_new_tokens: int = 512,
        prefill_tokens: int = 8192,
        cuda_graphs: bool | None = None,
        fast_decode: bool | None = None,
        decode_attention: str = "auto",
        graph_batch_sizes=None,
        prefix_cache: bool = True,
        prefix_store_gib: float = 0.0,
        adapters: dict[str, str] | None = None,
        model_name: str = "base",
    ):
        self.model, self.tok = load_for_inference(checkpoint, dtype)
        self.adapters = None  # LoRA adapters by name, mixed with the base in every batch
        if adapters:
            from cerbero_ray.inference.multilora import load_adapters

            self.adapters = load_adapters(self.model, adapters, model_name, base=checkpoint)
        self.scorers = {name: Scorer(self.model, self.tok, task) for name, task in (tasks or {}).items()}
        self.inline: OrderedDict[str, Scorer] = OrderedDict()  # tasks sent with requests, most recent last
        self.lock = threading.Lock()  # one forward at a time per replica: batches, not races
        cfg = EngineConfig(
            engine,
            max_batch_size,
            max_prompt_tokens,
            max_new_tokens,
            prefill_tokens,
            cuda_graphs,
            fast_decode,
            decode_attention,
            None if graph_batch_sizes is None else tuple(graph_batch_sizes),
            prefix_cache,
            int(prefix_store_gib * 2**30),
        )
        built = build_engine(self.model, self.tok, cfg, self.lock, self.adapters)
        self.batcher = built if engine == "continuous" else None  # continuous: requests join a running batch
        self.gen = built if engine == "hf" else None  # hf: batched generate calls, a stream on its own

    def render_chat(self, messages: list[dict]) -> str:
        return render_chat(self.tok, messages)

    def encode(self, prompt: str) -> list[int]:
        """A rendered prompt's ids, whole (the server refuses one over its limit rather than cut it)."""
        return encode_prompts(self.tok, [prompt])[0][0]

    def generate(self, items: list[tuple[str, Sampling]]) -> list[dict]:
        """Many requests at once: those with the same sampling settings share batched passes."""
        if self.batcher is not None:
            return self.batcher.run(items)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, s) in enumerate(items):
            groups[s.key()].append(i)
        out: list[dict] = [{}] * len(items)
        with self.lock:
            for idx in groups.values():
                results = self.gen.generate([items[i][0] for i in idx], items[idx[0]][1])
                for i, r in zip(idx, results):
                    out[i] = r
        return out

    def stream(self, prompt: str, s: Sampling) -> Iterator[str]:
        """Text pieces as they are generated; ends at a stop string, end of sequence or the limit.
        The last yielded item is a dict: {finish_reason, prompt_tokens, new_tokens}."""
        if self.batcher is not None:
            yield from self.batcher.stream(prompt, s)
            return
        from transformers import TextIteratorStreamer

        (x,), _ = encode_prompts(self.tok, [prompt], self.gen.max_prompt_tokens)
        ids = torch.tensor([x], device=self.gen.device)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            streamer=streamer,
            **self.gen.generate_kwargs(s, ids.shape[1]),
        )
        result = {}

        def run():
            with self.lock, torch.no_grad():
                if s.seed is not None:
                    torch.manual_seed(s.seed)
                result["out"] = self.model.generate(**kwargs)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        text, sent, stopped = "", 0, False
        hold = max((len(x) for x in s.stop), default=1) - 1  # a stop string may be arriving in pieces
        for piece in streamer:
            text += piece
            cut, stopped = cut_at_stop(text, s.stop)
            if stopped:
                if len(cut) > sent:
                    yield cut[sent:]
                break
            safe = len(text) - hold
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        thread.join()
        if not stopped:
            cut, stopped = cut_at_stop(text, s.stop)
            if len(cut) > sent:
                yield cut[sent:]
        new = result["out"][0, ids.shape[1] :].tolist()
        eos = self.tok.eos_token_id in new
        yield {
            "finish_reason": "stop" if (stopped or eos) else "length",
            "prompt_tokens": ids.shape[1],
            "new_tokens": len(new) if not eos else new.index(self.tok.eos_token_id) + 1,
        }

    def adapter_index(self, name: str | None) -> int:
        """The index of the model ``name`` among the loaded adapters (None or the base: 0);
        ``KeyError`` when it is not loaded."""
        if self.adapters is None:
            if name is None:
                return 0
            raise KeyError(name)
        return self.adapters.resolve(name)

    def scorer(self, key: str, task: LabelTask | None = None) -> Scorer:
        """A configured task's scorer (``task`` None), or an inline task's, made on first use and
        kept for the :data:`INLINE_TASKS` most recent (a client scoring its own task sends it with
        every request; an evaluation, thousands of times)."""
        if task is None:
            return self.scorers[key]
        scorer = self.inline.pop(key, None) or Scorer(self.model, self.tok, task)
        self.inline[key] = scorer
        while len(self.inline) > INLINE_TASKS:
            self.inline.popitem(last=False)
        return scorer

    def label(self, items: list[tuple]) -> list:
        """Many label requests at once (``(task, texts)``, or ``(task, texts, adapter index)``, or
        ``(key, texts, adapter index, LabelTask)`` for a task sent inline): the texts of each task
        and model are scored together. The model's lock (and the adapter) is held for one scorer
        batch at a time, so chat steps run between them. Should a batch fail, its requests are
        scored one by one, so a failure stays with the request that caused it (its entry is then
        ``{"error": message}`` instead of a list of results)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for r, item in enumerate(items):
            groups[(item[0], item[2] if len(item) > 2 else 0)].append(r)
        out: list = [None] * len(items)
        for (key, adapter), reqs in groups.items():
            inline = items[reqs[0]][3] if len(items[reqs[0]]) > 3 else None
            guard = functools.partial(self._holding, adapter)
            try:
                scored = iter(self.scorer(key, inline).score([t for r in reqs for t in items[r][1]], guard))
                for r in reqs:
                    out[r] = [next(scored) for _ in items[r][1]]
            except Exception:
                for r in reqs:
                    try:
                        out[r] = self.scorer(key, inline).score(items[r][1], guard)
                    except Exception as e:
                        out[r] = {"error": f"{type(e).__name__}: {e}"}
        return out

    @contextlib.contextmanager
    def _holding(self, adapter: int):
        """The model for one forward pass of the scorer: its lock, and ``adapter`` for the whole batch."""
        with self.lock, self.adapters.use(adapter) if self.adapters is not None else contextlib.nullcontext():
            yield
