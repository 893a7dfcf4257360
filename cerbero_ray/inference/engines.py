"""The generation engines, built one way for every user (the batch jobs, the Ray Data API,
evaluation, the server): :class:`EngineConfig` says which and how big, :func:`build_engine` makes it.

- ``continuous``: :class:`~cerbero_ray.inference.continuous.ContinuousBatcher`, our continuous
  batching over a slot KV cache (Mistral/Llama architectures);
- ``hf``: :class:`~cerbero_ray.inference.generator.Generator`, transformers' ``generate`` on padded
  batches (any causal LM).

Both answer ``generate(prompts, sampling, seed=…)`` with the same result dicts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

KINDS = ("continuous", "hf")


@dataclass(frozen=True)
class EngineConfig:
    kind: str = "continuous"
    batch_size: int = 16  # continuous: KV-cache slots (requests decoded together); hf: rows per generate
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512  # the most a request may ask for (continuous: sizes the cache)
    prefill_tokens: int = 8192  # continuous: prompt tokens prefilled per step, packed (a longer prompt: a chunk a step)
    cuda_graphs: bool | None = None  # continuous: CUDA-graph decoding; None: on a GPU
    fast_decode: bool | None = None  # continuous: fused, compiled decode step (SlotModel); None: on a GPU
    decode_attention: str = "auto"  # continuous, fast step: auto | sdpa | varlen | flex (slots.ATTENTION)
    graph_batch_sizes: tuple | None = None  # continuous, CUDA graphs: the batch buckets; None: 1, 2, 4, 8, 16, …
    prefix_cache: bool = True  # continuous: a prompt reuses what a cache slot holds of its beginning
    prefix_store_bytes: int = 0  # continuous: host memory for prefixes the slots lose (.prefix.HostPrefixes)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"engine must be one of {KINDS}, got {self.kind!r}")


def build_engine(model, tok, cfg: EngineConfig, lock: threading.Lock | None = None, adapters=None):
    """The engine ``cfg`` names, over a loaded ``model`` and its tokenizer (``lock``: held per step,
    so other users of the model, such as a label scorer, run between steps; ``adapters``: the
    :class:`~cerbero_ray.inference.multilora.AdapterSet` loaded into it, continuous only)."""
    if adapters is not None and cfg.kind != "continuous":
        raise ValueError("LoRA adapters in a mixed batch need the continuous engine")
    if cfg.kind == "continuous":
        from cerbero_ray.inference.continuous import ContinuousBatcher

        return ContinuousBatcher(
            model,
            tok,
            num_slots=cfg.batch_size,
            max_prompt_tokens=cfg.max_prompt_tokens,
            max_new_tokens=cfg.max_new_tokens,
            prefill_tokens=cfg.prefill_tokens,
            cuda_graphs=cfg.cuda_graphs,
            fast_decode=cfg.fast_decode,
            decode_attention=cfg.decode_attention,
            graph_batch_sizes=cfg.graph_batch_sizes,
            prefix_cache=cfg.prefix_cache,
            prefix_store_bytes=cfg.prefix_store_bytes,
            lock=lock,
            adapters=adapters,
        )
    from cerbero_ray.inference.generator import Generator

    return Generator(model, tok, batch_size=cfg.batch_size, max_prompt_tokens=cfg.max_prompt_tokens)
