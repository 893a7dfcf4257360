"""A Mistral/Llama-architecture HF model run over a preallocated, slot-indexed KV cache. Plain
PyTorch, no Ray: the numeric core of continuous batching (:mod:`cerbero_ray.inference.continuous`).

The cache holds ``num_slots`` sequences of up to ``max_len`` tokens per layer. ``prefill`` runs new
prompts (right-padded, one batch) and writes their keys and values into the slots they were given;
``decode`` runs one token for each of the first ``n`` slots, each at its own position, and reads the
cache up to length ``length``. The HF model's own modules (projections, norms, MLP, rotary
embedding) do the arithmetic, so any checkpoint of these architectures works unchanged; only the
attention's cache handling is ours.

On CUDA, ``decode`` at fixed shapes (all slots, ``length`` rounded up to a bucket) is captured once
per bucket as a CUDA graph and replayed: decoding a batch is a few hundred small kernels per token,
and launching them one by one from Python costs more than running them.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from cerbero_ray.checkpoints import CONTINUOUS_ARCHITECTURES as SUPPORTED


def check_supported(model) -> None:
    kind = getattr(model.config, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(
            f"the continuous-batching engine runs {SUPPORTED} models, this checkpoint is {kind!r}; use serve.engine=hf"
        )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class SlotModel:
    def __init__(self, model, num_slots: int, max_len: int, adapters=None):
        check_supported(model)
        self.model = model.eval()
        self.adapters = adapters  # an AdapterSet wrapped into the model's linears, or None
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        attn = model.model.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_slots, self.max_len = num_slots, max_len
        self.window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None
        shape = (cfg.num_hidden_layers, num_slots, cfg.num_key_value_heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # each slot's LoRA adapter (0: the base), read in place by the adapted layers (and the graphs)
        self.slot_adapter = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.graphs: dict[int, tuple] = {}
        self.graph_error: str | None = None
        self._pool = None

    def set_adapter(self, slot: int, adapter: int) -> None:
        if self.adapters is not None:
            self.slot_adapter[slot] = adapter

    def _rows(self, rows: torch.Tensor):
        """The adapters of ``rows`` (slot indices) for the forward inside."""
        import contextlib

        if self.adapters is None:
            return contextlib.nullcontext()
        return self.adapters.per_row(self.slot_adapter.index_select(0, rows))

    def cache_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def _mask(self, q_pos: torch.Tensor, length: int) -> torch.Tensor:
        """``[rows, 1, queries, length]`` boolean: key position ``l`` is visible from query position
        ``p`` when ``l <= p`` (and ``l > p - window`` under a sliding window)."""
        keys = torch.arange(length, device=q_pos.device)
        ok = keys[None, None, :] <= q_pos[:, :, None]
        if self.window:
            ok &= keys[None, None, :] > q_pos[:, :, None] - self.window
        return ok[:, None]

    def _layers(self, ids: torch.Tensor, pos: torch.Tensor, attend) -> torch.Tensor:
        """Hidden states after the final norm; ``attend(i, q, k, v)`` stores the layer's new keys and
        values and returns the attention output ``[rows, heads, tokens, head_dim]``."""
        m = self.model.model
        h = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(h, pos)
        cos, sin = cos[:, None], sin[:, None]
        b, t = ids.shape
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
            k = a.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
            v = a.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
            o = attend(i, _rope(q, cos, sin), _rope(k, cos, sin), v, a.scaling)
            h = h + a.o_proj(o.transpose(1, 2).reshape(b, t, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return m.norm(h)

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Runs the prompts, writes their cache into ``slots``; returns the last position's logits
        ``[len(prompts), vocab]`` (float32)."""
        t = max(len(p) for p in prompts)
        if t > self.max_len:
            raise ValueError(f"a prompt of {t} tokens does not fit the cache's {self.max_len}")
        ids = torch.zeros((len(prompts), t), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = torch.tensor(p)
        ids = ids.to(self.device)
        pos = torch.arange(t, device=self.device)[None].expand(len(prompts), t)
        # right padding: a real token never sees a pad (pads come after it), so plain causal
        # attention (flash-attention on GPU) is exact unless the sliding window cuts in
        mask = self._mask(pos, t) if self.window and t > self.window else None
        where = torch.tensor(slots, device=self.device)

        def attend(i, q, k, v, scale):
            self.k[i, where, :, :t] = k
            self.v[i, where, :, :t] = v
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
            )

        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        with self._rows(where):  # the output layer too: an adapter may target it
            h = self._layers(ids, pos, attend)
            return self.model.lm_head(h[torch.arange(len(prompts), device=self.device), last]).float()

    def _decode(self, ids: torch.Tensor, pos: torch.Tensor, n: int, length: int) -> torch.Tensor:
        rows = torch.arange(n, device=self.device)
        # a row that does not decode (pos -1) writes to the last cache position, which no prompt
        # reaches and a sequence writes itself before reading it, and reads position 0
        write = torch.where(pos < 0, self.max_len - 1, pos)
        pos = pos.clamp(min=0)
        mask = self._mask(pos[:, None], length)

        def attend(i, q, k, v, scale):
            self.k[i, rows, :, write] = k[:, :, 0]
            self.v[i, rows, :, write] = v[:, :, 0]
            # grouped-query attention without copying the cache per query head: the query heads
            # that share a key head become that key head's "query positions"
            kv_heads = k.shape[1]
            o = F.scaled_dot_product_attention(
                q.reshape(n, kv_heads, -1, self.head_dim),
                self.k[i, :n, :, :length],
                self.v[i, :n, :, :length],
                attn_mask=mask,
                scale=scale,
            )
            return o.reshape(q.shape)

        with self._rows(rows):
            h = self._layers(ids[:, None], pos[:, None], attend)
            return self.model.lm_head(h[:, 0]).float()

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, pos: torch.Tensor, graphs: bool = False) -> torch.Tensor:
        """One token for each of the first ``len(ids)`` slots (``ids[s]`` at position ``pos[s]``;
        ``pos[s] = -1``: slot ``s`` does not decode this step, its cache is left as it is); returns
        their next-token logits ``[len(ids), vocab]`` (float32). With ``graphs`` (CUDA only) every
        slot runs, through a captured graph for the bucket of the longest position."""
        length = max(int(pos.max()) + 1, 1)
        if not graphs or self.graph_error:
            return self._decode(ids.to(self.device), pos.to(self.device), len(ids), length)
        bucket = next(b for b in self.buckets() if b >= length)
        if bucket not in self.graphs:
            try:
                self.graphs[bucket] = self._capture(bucket)
            except Exception as e:  # a CUDA/driver combination that cannot capture: decode eagerly, slower
                self.graph_error = repr(e)
                warnings.warn(f"CUDA-graph capture failed, decoding without graphs: {e!r}", stacklevel=2)
                return self.decode(ids, pos, graphs=False)
        g, s_ids, s_pos, s_out = self.graphs[bucket]
        s_ids.zero_()
        s_pos.fill_(-1)
        s_ids[: len(ids)] = ids
        s_pos[: len(pos)] = pos
        g.replay()
        return s_out[: len(ids)].clone()  # the next replay overwrites s_out

    def buckets(self) -> list[int]:
        out, b = [], 128
        while b < self.max_len:
            out.append(b)
            b *= 2
        return out + [self.max_len]

    def _capture(self, length: int):
        s_ids = torch.zeros(self.num_slots, dtype=torch.long, device=self.device)
        s_pos = torch.full((self.num_slots,), -1, dtype=torch.long, device=self.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):  # warm-up outside the graph (allocator, lazy init)
                self._decode(s_ids, s_pos, self.num_slots, length)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        self._pool = self._pool or torch.cuda.graph_pool_handle()  # the buckets' graphs share memory
        with torch.cuda.graph(g, pool=self._pool), torch.no_grad():
            s_out = self._decode(s_ids, s_pos, self.num_slots, length)
        return g, s_ids, s_pos, s_out
