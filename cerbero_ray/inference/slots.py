"""A Mistral/Llama-architecture HF model run over a preallocated, slot-indexed KV cache. Plain
PyTorch, no Ray: the numeric core of continuous batching (:mod:`cerbero_ray.inference.continuous`).

The cache holds ``num_slots`` sequences of up to ``max_len`` tokens per layer. ``prefill`` runs new
prompts and chunks of long ones (packed, one token after another, no padding) and writes their keys
and values into the slots they were given;
``decode`` runs one token for each of the first ``n`` slots, each at its own position, and reads the
cache up to length ``length``. The HF model's own modules (projections, norms, MLP, rotary
embedding) do the arithmetic, so any checkpoint of these architectures works unchanged; only the
attention's cache handling is ours.

On CUDA, ``decode`` at fixed shapes is captured as CUDA graphs and replayed: decoding a batch is a
few hundred small kernels per token, and launching them one by one from Python costs more than
running them. A graph runs the first ``rows`` slots, ``rows`` a batch-size bucket (1, 2, 4, 8, 16,
24, 32, … up to the slot count, as vLLM captures them), and reads the cache up to a length bucket
(one for every length with varlen or flex attention): a step runs the smallest bucket that holds
its highest live slot, so a few requests in a large engine do not pay for every slot's attention.
Start-up captures every batch bucket at the shortest length (:meth:`SlotModel.warm`).

The **fast decode step** (``fast``; on by default on CUDA for the plain Mistral/Llama shape: no
biases, SiLU MLP, plain ``nn.Linear`` projections) reads the same weights differently: Q, K and V
become one matrix and gate and up another (the modules' own weights become views of them: no
memory is added and every other user of the model sees the same numbers), and the arithmetic
around the matrix products (RMSNorm, rope, SiLU·mul, the residual adds) is written as two
functions per layer that ``torch.compile`` fuses into a few kernels, shared by every layer
(``compile``; in the captured graph only). Mixed LoRA adapters run in it too: each group of
projections that reads one input (Q/K/V, O, gate/up, down) adds its rows' deltas in
:mod:`~cerbero_ray.inference.multilora`'s dense masked form (one product for the group's A side,
one per member for B), inside the same compiled functions.

Decode attention then reads each slot's real length in place with FlashAttention's varlen kernel
(``torch.nn.attention.varlen``, ``seqused_k``) where this torch has it and it passes a check
against SDPA at start-up; elsewhere it is SDPA with a mask up to the length bucket. By choice
(``attention="flex"``; torch 2.11 has no ``seqused_k``) it is flex_attention over a block mask of
each row's own blocks of 128 keys (:meth:`SlotModel._block_mask`; Triton's decoding kernel,
compiled, in the graph; its eager reference on the CPU), checked against SDPA at start-up too.
With varlen or flex attention one graph serves every length. On one H200
(bench/probe_decode_gpu.py, batch 32 of the 7B shape) the captured step went from 8.6 ms to 6.5 ms
with the compiled regions, and the mask alone cost 0.9 ms of that.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass

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


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the HF Mistral/Llama modules compute it (in float32, the weight applied after)."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _lora(x, a, bs, mask):
    """The LoRA deltas of linears that read the same input ``x`` (``[n, in]``): ``a`` their
    adapters' A matrices stacked (``[members · (k + 1) r, in]``), ``bs`` each member's B over every
    adapter (``[out, (k + 1) r]``, the scale folded in; None: the member has no adapter), ``mask``
    each row's own adapter block (``[n, (k + 1) r]``): :mod:`cerbero_ray.inference.multilora`'s dense
    form, one product for the group's A side."""
    h = F.linear(x, a).view(x.shape[0], -1, mask.shape[1]) * mask[:, None]
    out, j = [], 0
    for b in bs:
        out.append(None if b is None else F.linear(h[:, j], b))
        j += b is not None
    return out


def _plus(y, d):
    return y if d is None else y + d


def _pre(h, ln, wqkv, cos, sin, eps: float, nq: int, nkv: int, hd: int, lqkv=None, mask=None):
    """Norm, the fused QKV product (plus each row's LoRA deltas, ``lqkv``: (A, (Bq, Bk, Bv))) and
    rope of one decode token per row: ``[n, heads, hd]`` each."""
    x = _rms(h, ln, eps)
    q, k, v = F.linear(x, wqkv).split([nq * hd, nkv * hd, nkv * hd], -1)
    if lqkv is not None:
        dq, dk, dv = _lora(x, lqkv[0], lqkv[1], mask)
        q, k, v = _plus(q, dq), _plus(k, dk), _plus(v, dv)
    q, k, v = q.view(-1, nq, hd), k.view(-1, nkv, hd), v.view(-1, nkv, hd)
    return _rope(q, cos[:, None], sin[:, None]), _rope(k, cos[:, None], sin[:, None]), v


def _post(h, o, wo, ln, wgu, wdown, eps: float, lo=None, lgu=None, ldown=None, mask=None):
    """The attention output's projection and residual, then the norm, the fused gate/up product,
    SiLU·mul, the down projection and the second residual (each product plus its rows' LoRA
    deltas, where adapters target it: (A, (B, …)) per group)."""
    y = F.linear(o, wo)
    if lo is not None:
        y = _plus(y, _lora(o, lo[0], lo[1], mask)[0])
    h = h + y
    x = _rms(h, ln, eps)
    g, u = F.linear(x, wgu).chunk(2, -1)
    if lgu is not None:
        dg, du = _lora(x, lgu[0], lgu[1], mask)
        g, u = _plus(g, dg), _plus(u, du)
    z = F.silu(g) * u
    d = F.linear(z, wdown)
    if ldown is not None:
        d = _plus(d, _lora(z, ldown[0], ldown[1], mask)[0])
    return h + d


@functools.cache
def _compiled(fn, dynamic: bool | None = None):
    """``fn`` compiled once per process (every layer and every engine shares it; shapes are guards).
    ``dynamic=None`` (automatic dynamic shapes): the first call's shapes compile static, and the first
    recompile for a changed size (the rows of another batch bucket) makes that dimension symbolic,
    so the batch buckets share a second compilation (one row is specialized: a third) rather than
    compiling once per bucket at start-up. ``False``: a compilation per shape (flex_attention's
    kernel, whose symbolic-shape form inductor's CPU backend fails to build). The recompile limit
    is raised for every call (a fullgraph function fails past dynamo's default of 8): one
    compilation per bucket, adapter set or engine shape is expected, not a sign of trouble."""
    c = torch.compile(fn, fullgraph=True, dynamic=dynamic)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=64):
            return c(*args, **kwargs)

    return call


def batch_buckets(num_slots: int, sizes=None) -> list[int]:
    """The row counts graphs are captured at: ``sizes`` (each within 1..``num_slots``), else 1, 2,
    4, then every multiple of 8; always ``num_slots`` itself, the largest."""
    if sizes is None:
        sizes = [b for b in (1, 2, 4, *range(8, num_slots, 8)) if b < num_slots]
    sizes = list(sizes)
    bad = [b for b in sizes if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= num_slots]
    if bad:
        raise ValueError(f"graph batch sizes must be whole numbers from 1 to the slot count {num_slots}, got {bad}")
    return sorted({b for b in sizes if b < num_slots} | {num_slots})


def _fuse(mods: list[torch.nn.Linear], key: str, owner) -> torch.Tensor:
    """One weight for the linears ``mods`` (their outputs stacked), made once and kept on ``owner``:
    each module's weight becomes a view of it, so the model's memory does not grow."""
    w = getattr(owner, key, None)
    if w is not None and all(m.weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() for m in mods):
        return w  # fused already (an earlier engine on this model)
    with torch.no_grad():
        w = torch.cat([m.weight for m in mods])
        at = 0
        for m in mods:
            rows = m.weight.shape[0]
            m.weight.data = w[at : at + rows]
            at += rows
    setattr(owner, key, w)
    return w


@dataclass
class _Layer:
    """One decoder layer's weights as the fast decode step reads them."""

    ln1: torch.Tensor
    qkv: torch.Tensor
    o: torch.Tensor
    ln2: torch.Tensor
    gu: torch.Tensor
    down: torch.Tensor
    # LoRA adapters, per group of projections that read one input: (A stacked, (B per member or
    # None)); None: no adapter targets the group
    lqkv: tuple | None = None
    lo: tuple | None = None
    lgu: tuple | None = None
    ldown: tuple | None = None


def _base(m):
    """The plain linear inside a LoRA wrapper (:class:`~cerbero_ray.inference.multilora.LoRALinear`)."""
    return getattr(m, "base", m) if hasattr(m, "lora_a") else m


def _lora_group(mods) -> tuple | None:
    """(A of every targeted member stacked, (each member's B or None)) for linears that read one
    input; None when no adapter targets any of them."""
    if not any(hasattr(m, "lora_a") for m in mods):
        return None
    a = torch.cat([m.lora_a.flatten(0, 1) for m in mods if hasattr(m, "lora_a")])
    return a, tuple(m.b_all if hasattr(m, "lora_a") else None for m in mods)


def fast_unsupported(model, adapters=None) -> str | None:
    """Why the fast decode step cannot run this model (None: it can). LoRA adapters
    (:class:`~cerbero_ray.inference.multilora.AdapterSet`) run in it in their dense masked form."""
    if adapters is not None and getattr(adapters, "kernel", "auto") != "auto":
        return f"adapters with kernel={adapters.kernel!r} (the fast step runs the dense form)"
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act={cfg.hidden_act}"
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            m = _base(m)
            if type(m) is not torch.nn.Linear:
                return f"a {type(m).__name__} projection"
            if m.bias is not None:
                return "projections with biases"
    return None


def _prefill_groups(segs: list[tuple[int, int]], slack: float = 1.25) -> list[list[tuple[int, int]]]:
    """Whole prompts ((offset, length) each) in groups whose attention runs as one right-padded
    batch: longest first, a prompt joins the group while rows × width stays within ``slack`` times
    the group's tokens (prompts of one length: one group; the padded attention's memory stays
    within ``slack`` times the prefill's tokens)."""
    groups, tokens = [], 0
    for seg in sorted(segs, key=lambda x: -x[1]):
        g = groups[-1] if groups else None
        if g is not None and (len(g) + 1) * g[0][1] <= slack * (tokens + seg[1]):
            g.append(seg)
            tokens += seg[1]
        else:
            groups.append([seg])
            tokens = seg[1]
    return groups


ATTENTION = ("auto", "sdpa", "varlen", "flex")  # the fast decode step's attention (SlotModel(attention=...))
_FLEX_BLOCK = 128  # keys per flex_attention block


@functools.cache
def _params(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


@functools.cache
def _varlen_attn():
    """(torch's FlashAttention varlen entry point, its extra keyword arguments) if it reads a KV
    cache in place (``seqused_k``), else (None, {}); looked up once."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}
    params = inspect.signature(varlen_attn).parameters
    if not {"seqused_k", "window_size"} <= set(params):
        return None, {}
    return varlen_attn, ({"enable_gqa": True} if "enable_gqa" in params else {})


CACHE_SHARE = 0.9  # of the memory free at start-up, what the cache may take (the rest: activations, graphs)


def slot_bytes(cfg, head_dim: int, max_len: int, dtype: torch.dtype, vocab: int) -> int:
    """What one slot holds: its keys and values over ``max_len`` positions in every layer, and its
    state over the vocabulary (penalty counts and logit bias in float32, the prompt's tokens as
    bools, the grammar's bitmask)."""
    kv = 2 * cfg.num_hidden_layers * max_len * cfg.num_key_value_heads * head_dim * dtype.itemsize
    return kv + 9 * vocab + 4 * ((vocab + 31) // 32)


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: a GPU's free memory and what torch's caching
    allocator holds unused, or this host's available memory (Linux's MemAvailable, within the
    cgroup's limit where one is set); None where unknown."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    if device.type != "cpu":
        return None
    from cerbero_ray.cluster import host_free_memory

    return host_free_memory()


def check_cache_fits(num_slots: int, max_len: int, per_slot: int, device: torch.device, layers: int) -> None:
    """A cache larger than what ``device`` has free is a ValueError saying how many slots fit,
    before any of it is allocated (a GPU's out-of-memory error names no setting; a host's kills
    the process)."""
    free = free_memory(device)
    need = num_slots * per_slot
    if free is None or need <= CACHE_SHARE * free:
        return
    fit = int(CACHE_SHARE * free // per_slot)
    gib = 1 << 30
    raise ValueError(
        f"the engine's cache does not fit: {num_slots} slots of {max_len:,} positions need {need / gib:.2f} GiB "
        f"({per_slot / gib:.3f} GiB a slot: keys and values in {layers} layers, and its sampling state), and "
        f"{device} has {free / gib:.2f} GiB free, of which the cache may take {CACHE_SHARE:.0%}: "
        + (f"{fit} slots fit" if fit else "not one slot fits")
        + " at this length. Lower the slot count (serve.max_batch_size, generate.batch_size, evaluate.batch_size, "
        "label.slots) or the length (max_prompt_tokens + max_new_tokens)"
    )


class SlotModel:
    def __init__(
        self,
        model,
        num_slots: int,
        max_len: int,
        adapters=None,
        fast: bool | None = None,
        compile: bool | None = None,
        attention: str = "auto",
        graph_batch_sizes=None,
    ):
        check_supported(model)
        if attention not in ATTENTION:
            raise ValueError(f"decode attention must be one of {ATTENTION}, got {attention!r}")
        self.model = model.eval()
        self.adapters = adapters  # an AdapterSet wrapped into the model's linears, or None
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        cuda = self.device.type == "cuda"
        attn = model.model.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_slots, self.max_len = num_slots, max_len
        self.window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None
        vocab = model.get_output_embeddings().weight.shape[0]  # the logits' width (LoRA wraps keep .weight)
        self.vocab = vocab
        per_slot = slot_bytes(cfg, self.head_dim, max_len, self.dtype, vocab)
        check_cache_fits(num_slots, max_len, per_slot, self.device, cfg.num_hidden_layers)
        # [layer, slot, position, kv head, head dim]: a slot's tokens are rows of one block, as
        # FlashAttention's varlen kernel reads them (SDPA reads a transposed view)
        shape = (cfg.num_hidden_layers, num_slots, max_len, cfg.num_key_value_heads, self.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # each slot's LoRA adapter (0: the base), read in place by the adapted layers (and the graphs)
        self.slot_adapter = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        # a packed prefill's adapters by segments of one adapter (arithmetic: the CPU, where reading
        # the table above costs nothing), else in the dense form (an accelerator: a segment's products
        # are small kernel launches; multilora.py)
        self.prefill_segments = self.device.type == "cpu"
        self.batch_buckets = batch_buckets(num_slots, graph_batch_sizes)  # the rows a captured step runs
        self.graphs: dict[tuple, tuple] = {}  # SlotModel.decode's: (length bucket, rows)
        self.warm_s: float | None = None  # seconds warm() took (capture and compilation)
        # the decode loop's state on the device (the continuous batcher's steps read and advance it,
        # so the next step's inputs never come from the host): each slot's last token and its
        # position (-1: the slot does not decode), and its sampling settings and uniform draw
        self.cur_ids = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.cur_pos = torch.full((num_slots,), -1, dtype=torch.long, device=self.device)
        self.temp = torch.zeros(num_slots, dtype=torch.float32, device=self.device)
        self.top_p = torch.ones(num_slots, dtype=torch.float32, device=self.device)
        self.u = torch.zeros(num_slots, dtype=torch.float32, device=self.device)
        # frequency and presence penalties: each slot's two factors and how often it generated each
        # token, and its logit bias (float32, as the logits; 4 bytes per slot and vocabulary entry
        # each). Applied and counted in the steps that have a row with any of them (a captured
        # step: its sampling variant, which such a step takes, greedy or not)
        self.freq = torch.zeros(num_slots, dtype=torch.float32, device=self.device)
        self.pres = torch.zeros(num_slots, dtype=torch.float32, device=self.device)
        self.counts = torch.zeros(num_slots, vocab, dtype=torch.float32, device=self.device)
        self.bias = torch.zeros(num_slots, vocab, dtype=torch.float32, device=self.device)  # logit_bias rows
        # the repetition penalty: each slot's factor (1: off) and which tokens its prompt holds (set
        # for the requests with one; another's row is stale, and a factor of 1 ignores it)
        self.rep = torch.ones(num_slots, dtype=torch.float32, device=self.device)
        self.in_prompt = torch.zeros(num_slots, vocab, dtype=torch.bool, device=self.device)
        # constrained rows: each slot's bitmask of allowed next tokens (all ones: unconstrained)
        self.bits = torch.full((num_slots, (vocab + 31) // 32), -1, dtype=torch.int32, device=self.device)
        # (length bucket, rows, sampling); ("forward", length bucket, rows); ("pick", length bucket, rows, sampling)
        self.step_graphs: dict[tuple, tuple] = {}
        self.graph_error: str | None = None
        self.graphs_oom: list[tuple] = []  # the graph keys whose capture ran out of memory (eager)
        self.compile_error: str | None = None
        self._pool = None
        why = fast_unsupported(model, adapters)
        if fast and why:
            raise ValueError(f"the fast decode step cannot run this model: {why}")
        self.fast = (cuda if fast is None else fast) and why is None
        self.compiled = self.fast and cuda and compile is not False  # compiled regions, in graphs only
        self.nq, self.nkv, self.eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
        self._fused = self._fuse() if self.fast else None
        self.attention = "sdpa"
        self.attention_note: str | None = None
        if attention not in ("auto", "sdpa") and not self.fast:
            warnings.warn(
                f"decode attention {attention!r} is the fast decode step's, which is off here "
                "(on CPU it is off unless fast_decode=true): decoding uses the HF modules",
                stacklevel=2,
            )
        elif self.fast and (cuda or attention == "flex"):
            self.attention, self.attention_note = self._pick_attention(attention)
            if self.attention_note and attention != "auto":
                warnings.warn(
                    f"decode attention {attention!r} unavailable, using SDPA: {self.attention_note}", stacklevel=2
                )

    def _fuse(self) -> list[_Layer]:
        out = []
        for layer in self.model.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            qkv, gu = [a.q_proj, a.k_proj, a.v_proj], [mlp.gate_proj, mlp.up_proj]
            out.append(
                _Layer(
                    layer.input_layernorm.weight,
                    _fuse([_base(m) for m in qkv], "_cerbero_qkv", a),
                    a.o_proj.weight,
                    layer.post_attention_layernorm.weight,
                    _fuse([_base(m) for m in gu], "_cerbero_gate_up", mlp),
                    mlp.down_proj.weight,
                    _lora_group(qkv),
                    _lora_group([a.o_proj]),
                    _lora_group(gu),
                    _lora_group([mlp.down_proj]),
                )
            )
        return out

    def _pick_attention(self, want: str = "auto") -> tuple[str, str | None]:
        """The decode attention for ``want`` (``auto``: ``varlen`` if torch's FlashAttention varlen
        kernel is here, else ``sdpa``; ``flex``: flex_attention over a block mask of each row's
        length; ``sdpa``: the masked SDPA), kept only if it gives SDPA's result on a small cache of
        this model's shape (rows of different lengths, one past the window), else ``sdpa`` and why."""
        if want == "sdpa":
            return "sdpa", None
        kind = "flex" if want == "flex" else "varlen"
        if kind == "varlen" and _varlen_attn()[0] is None:
            return "sdpa", "torch.nn.attention.varlen has no seqused_k/window_size in this torch"
        try:
            g = torch.Generator(device=self.device).manual_seed(0)
            n, length = 3, 300
            q = torch.randn(n, self.nq, self.head_dim, device=self.device, dtype=self.dtype, generator=g)
            k = torch.randn(n, length, self.nkv, self.head_dim, device=self.device, dtype=self.dtype, generator=g)
            v = torch.randn_like(k)
            pos = torch.tensor([5, 299, 130], device=self.device)
            if kind == "varlen":
                kf, vf = k.view(-1, self.nkv, self.head_dim), v.view(-1, self.nkv, self.head_dim)
                got = self._varlen(_varlen_attn()[0], q, kf, vf, pos, n, length, length)
            else:
                got = self._flex(q, k, v, self._block_mask(pos, length), self.device.type == "cuda")
            want_ = self._sdpa(q, k, v, pos, n, length)
            err = float((got.float() - want_.float()).abs().max())
            if err > 2e-2:
                return "sdpa", f"{kind} differs from SDPA by {err:.3g}"
        except Exception as e:  # a torch built without FlashAttention, an old GPU, no Triton: SDPA
            return "sdpa", f"{kind} failed: {e!r}"[:300]
        return kind, None

    def _block_mask(self, pos: torch.Tensor, length: int):
        """flex_attention's block mask for one query per row at ``pos`` over ``length`` cached
        positions: the blocks of 128 keys a row can see (inside ``[pos - window + 1, pos]``) are
        listed, whole ones apart from the one or two its bounds cut, so a row reads its own length,
        not the longest row's. Static shapes, built on the device (a CUDA graph captures it)."""
        from torch.nn.attention.flex_attention import BlockMask

        bs = _FLEX_BLOCK
        nb = -(-length // bs)
        lo = (pos - self.window + 1).clamp(min=0) if self.window else torch.zeros_like(pos)
        start = torch.arange(nb, device=pos.device) * bs
        end = start + bs - 1
        seen = (start[None] <= pos[:, None]) & (end[None] >= lo[:, None])  # [rows, blocks] any key visible
        whole = seen & (start[None] >= lo[:, None]) & (end[None] <= pos[:, None])
        cut = seen & ~whole

        def listed(m):  # (count [rows, 1, 1], indices [rows, 1, 1, blocks]): the marked blocks first
            order = torch.argsort((~m).to(torch.int8), dim=1, stable=True).to(torch.int32)
            return m.sum(1, dtype=torch.int32)[:, None, None], order[:, None, None].contiguous()

        window = self.window

        def mask_mod(b, h, q_idx, kv_idx):
            ok = kv_idx <= pos[b]
            return ok & (kv_idx > pos[b] - window) if window else ok

        (cn, ci), (wn, wi) = listed(cut), listed(whole)
        has = _params(BlockMask.from_kv_blocks)  # both arrived after torch 2.5
        extra = {"compute_q_blocks": False} if "compute_q_blocks" in has else {}
        extra |= {"seq_lengths": (1, length)} if "seq_lengths" in has else {}
        return BlockMask.from_kv_blocks(cn, ci, wn, wi, BLOCK_SIZE=(bs, bs), mask_mod=mask_mod, **extra)

    def _flex(self, q, k, v, block_mask, compiled: bool) -> torch.Tensor:
        """Decode attention with flex_attention over ``[n, length, kv heads, hd]`` keys and values
        read in place, each row its own blocks (:meth:`_block_mask`); ``compiled``: the Triton
        kernel (its decoding form for one query), else the eager reference. ``[n, heads · hd]``."""
        from torch.nn.attention.flex_attention import flex_attention

        fn = _compiled(flex_attention, False) if compiled else flex_attention
        n = q.shape[0]
        o = fn(
            q[:, :, None],
            k.transpose(1, 2),
            v.transpose(1, 2),
            block_mask=block_mask,
            enable_gqa=True,
            scale=self.head_dim**-0.5,
        )
        return o.reshape(n, -1)

    def set_adapter(self, slot: int, adapter: int) -> None:
        if self.adapters is not None:
            self.slot_adapter[slot] = adapter

    def _rows(self, rows: torch.Tensor, dense: bool = False):
        """The adapters of ``rows`` (slot indices) for the forward inside (``dense``: in the
        masked dense form whatever the set's kernel, as packed prefill's one-token rows need)."""
        import contextlib

        if self.adapters is None:
            return contextlib.nullcontext()
        return self.adapters.per_row(self.slot_adapter.index_select(0, rows), dense)

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
    def prefill(self, prompts: list[list[int]], slots: list[int], starts: list[int] | None = None) -> torch.Tensor:
        """Runs the prompts (or chunks of them: ``starts[i]``, the position of chunk ``i``'s first
        token, whose earlier positions are in slot ``slots[i]``'s cache already), writes their
        cache into ``slots``; returns each row's last position's logits ``[len(prompts), vocab]``
        (float32).

        The chunks run packed, one token after another with no padding (:meth:`_packed`): the
        projections, the MLP and the norms see exactly the prompt tokens, so a step's prefill
        costs and holds its tokens, not rows × the longest prompt."""
        starts = starts or [0] * len(prompts)
        lens = [len(p) for p in prompts]
        end = max(s + n for s, n in zip(starts, lens))
        if end > self.max_len:
            raise ValueError(f"a prompt of {end} tokens does not fit the cache's {self.max_len}")
        dev = self.device
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long).to(dev)
        slot_t = torch.tensor(slots).repeat_interleave(torch.tensor(lens)).to(dev)
        pos_t = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)]).to(dev)
        h = self._packed(ids, slot_t, pos_t, list(zip(lens, slots, starts)))
        last = torch.tensor(lens).cumsum(0).sub(1).to(dev)
        with self._rows(torch.tensor(slots, device=dev)):  # the output layer too: an adapter may target it
            return self.model.lm_head(h[last, 0]).float()

    def _packed(self, ids, slot_t, pos_t, segs: list[tuple[int, int, int]]) -> torch.Tensor:
        """Hidden states ``[tokens, 1, hidden]`` of packed prompt chunks (``segs``: each chunk's
        (length, slot, start), in order). Every token is a row of the HF modules' batch (its
        chunk's LoRA adapter: by segments on CPU, :meth:`AdapterSet.per_segment`; dense on a GPU), and
        attention runs per group of chunks: whole prompts of similar lengths right-padded together
        (:func:`_prefill_groups`; causal, so a real token never sees a pad), each continuing chunk
        over its slot's cache, read in place."""
        offs = [0]
        for n, _, _ in segs:
            offs.append(offs[-1] + n)
        whole = [(offs[j], n) for j, (n, _, a) in enumerate(segs) if a == 0]
        plans = [self._group_plan(g) for g in _prefill_groups(whole)]
        # a chunk after earlier ones: (offset, length, slot, start, its mask over the slot's cache)
        going = [
            (offs[j], n, s, a, self._mask(pos_t[offs[j] : offs[j] + n][None], a + n))
            for j, (n, s, a) in enumerate(segs)
            if a > 0
        ]

        def attend(i, q, k, v, scale):
            k, v, q = k[:, :, 0], v[:, :, 0], q[:, :, 0]  # [tokens, heads, hd]
            self.k[i, slot_t, pos_t] = k
            self.v[i, slot_t, pos_t] = v
            out = torch.empty_like(q)
            for take, put, src, rows, width, mask in plans:
                qg, kg, vg = (
                    x.index_select(0, take).view(rows, width, *x.shape[1:]).transpose(1, 2) for x in (q, k, v)
                )
                o = F.scaled_dot_product_attention(
                    qg, kg, vg, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
                )
                out.index_copy_(0, put, o.transpose(1, 2).reshape(-1, *q.shape[1:]).index_select(0, src))
            for o0, n, s, a, mask in going:  # its slot's cache up to itself
                o = F.scaled_dot_product_attention(
                    q[o0 : o0 + n].transpose(0, 1)[None],
                    self.k[i, s, : a + n].transpose(0, 1)[None],
                    self.v[i, s, : a + n].transpose(0, 1)[None],
                    attn_mask=mask,
                    scale=scale,
                    enable_gqa=True,
                )
                out[o0 : o0 + n] = o[0].transpose(0, 1)
            return out[:, :, None]

        if self.adapters is None or not self.prefill_segments:  # (dense: every adapter, rows masked)
            with self._rows(slot_t, dense=True):
                return self._layers(ids[:, None], pos_t[:, None], attend)
        table = self.slot_adapter.tolist()  # on the CPU: no device to wait for
        with self.adapters.per_segment([table[s] for _, s, _ in segs], [n for n, _, _ in segs]):
            return self._layers(ids[:, None], pos_t[:, None], attend)

    def _group_plan(self, group: list[tuple[int, int]]):
        """Index tensors of one group of whole prompts ((offset, length) each), built once per
        prefill: ``take`` the packed tokens into ``rows × width`` (a pad takes its row's last
        token), ``put``/``src``: where each real token's output goes and where it sits padded, and
        the window's mask where it cuts into the width (None: plain causal attention)."""
        off, n = (torch.tensor(x) for x in zip(*group))
        width = int(n.max())
        col = torch.arange(width)[None]
        real = col < n[:, None]
        take = (off[:, None] + torch.minimum(col, n[:, None] - 1)).flatten()
        put = (off[:, None] + col)[real]
        src = torch.arange(len(group) * width).view(len(group), width)[real]
        cut = self.window and width > self.window
        mask = self._mask(torch.arange(width, device=self.device)[None], width) if cut else None
        return (*(x.to(self.device) for x in (take, put, src)), len(group), width, mask)

    def _sdpa(self, q, k, v, pos, n: int, length: int) -> torch.Tensor:
        """Decode attention over ``[n, length, kv heads, hd]`` keys and values with a mask:
        grouped-query attention without copying the cache per query head (the query heads that
        share a key head become that key head's "query positions"). ``[n, heads · hd]``."""
        o = F.scaled_dot_product_attention(
            q.reshape(n, self.nkv, -1, self.head_dim),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=self._mask(pos[:, None], length),
            scale=self.head_dim**-0.5,
        )
        return o.reshape(n, -1)

    def _varlen(self, fn, q, k, v, pos, n: int, length: int, max_len: int) -> torch.Tensor:
        """The same with FlashAttention's varlen kernel over ``[n · max_len, kv heads, hd]`` keys
        and values, each row reading only its own ``pos + 1`` positions."""
        dev = q.device
        cu_q = torch.arange(n + 1, device=dev, dtype=torch.int32)
        cu_k = cu_q * max_len
        used = (pos + 1).to(torch.int32)
        kw = _varlen_attn()[1]
        window = (self.window - 1, 0) if self.window else (-1, -1)
        o = fn(q, k, v, cu_q, cu_k, 1, length, scale=self.head_dim**-0.5, window_size=window, seqused_k=used, **kw)
        return o.reshape(n, -1)

    def _decode_fast(self, ids, pos, n: int, length: int, compiled: bool) -> torch.Tensor:
        """The fast decode step (the module docstring): fused weights, compiled regions, varlen."""
        m = self.model.model
        rows = torch.arange(n, device=self.device)
        write = torch.where(pos < 0, self.max_len - 1, pos)
        pos = pos.clamp(min=0)
        pre, post = (_compiled(_pre), _compiled(_post)) if compiled else (_pre, _post)
        varlen = _varlen_attn()[0] if self.attention == "varlen" else None
        flex = self._block_mask(pos, self.max_len) if self.attention == "flex" else None
        h = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(h, pos[:, None])
        cos, sin = cos[:, 0], sin[:, 0]
        mask = self.adapters.row_mask(self.slot_adapter[:n]) if self.adapters is not None else None
        for i, w in enumerate(self._fused):
            q, k, v = pre(h, w.ln1, w.qkv, cos, sin, self.eps, self.nq, self.nkv, self.head_dim, w.lqkv, mask)
            self.k[i, rows, write] = k
            self.v[i, rows, write] = v
            if varlen is not None:
                kc = self.k[i, :n].view(-1, self.nkv, self.head_dim)
                vc = self.v[i, :n].view(-1, self.nkv, self.head_dim)
                o = self._varlen(varlen, q, kc, vc, pos, n, length, self.max_len)
            elif flex is not None:
                o = self._flex(q, self.k[i, :n], self.v[i, :n], flex, compiled)
            else:
                o = self._sdpa(q, self.k[i, :n, :length], self.v[i, :n, :length], pos, n, length)
            h = post(h, o, w.o, w.ln2, w.gu, w.down, self.eps, w.lo, w.lgu, w.ldown, mask)
        with self._rows(rows):  # an adapter may target the output layer
            return self.model.lm_head(m.norm(h)).float()

    def _decode(
        self, ids: torch.Tensor, pos: torch.Tensor, n: int, length: int, compiled: bool = False
    ) -> torch.Tensor:
        if self.fast:
            return self._decode_fast(ids, pos, n, length, compiled)
        rows = torch.arange(n, device=self.device)
        # a row that does not decode (pos -1) writes to the last cache position, which no prompt
        # reaches and a sequence writes itself before reading it, and reads position 0
        write = torch.where(pos < 0, self.max_len - 1, pos)
        pos = pos.clamp(min=0)

        def attend(i, q, k, v, scale):
            self.k[i, rows, write] = k[:, :, 0]
            self.v[i, rows, write] = v[:, :, 0]
            o = self._sdpa(q, self.k[i, :n, :length], self.v[i, :n, :length], pos, n, length)
            return o.view(n, -1, 1, self.head_dim)

        with self._rows(rows):
            h = self._layers(ids[:, None], pos[:, None], attend)
            return self.model.lm_head(h[:, 0]).float()

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, pos: torch.Tensor, graphs: bool = False) -> torch.Tensor:
        """One token for each of the first ``len(ids)`` slots (``ids[s]`` at position ``pos[s]``;
        ``pos[s] = -1``: slot ``s`` does not decode this step, its cache is left as it is); returns
        their next-token logits ``[len(ids), vocab]`` (float32). With ``graphs`` (CUDA only) the
        rows' batch bucket runs, through a graph captured per (length bucket of the longest
        position, batch bucket) (one length bucket with varlen or flex attention)."""
        length = max(int(pos.max()) + 1, 1)
        key = (self._bucket(length), self._batch_bucket(len(ids)))
        captured = graphs and self._graph(self.graphs, key, lambda: self._capture_decode(*key))
        if not captured:
            return self._decode(ids.to(self.device), pos.to(self.device), len(ids), length)
        g, s_ids, s_pos, s_out = captured
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

    def _batch_bucket(self, n: int) -> int:
        """The batch bucket a captured step for the first ``n`` slots runs: the smallest that holds them."""
        return next(b for b in self.batch_buckets if b >= n)

    def _bucket(self, length: int) -> int:
        """The cache length a captured step reads for a longest position of ``length`` (varlen
        attention reads each row's own length: one graph serves all)."""
        if self.attention in ("varlen", "flex"):
            return self.max_len
        return next(b for b in self.buckets() if b >= length)

    def _graph(self, table: dict, key, capture):
        """``table[key]``, captured by ``capture()`` on first use; None once capture has failed (a
        CUDA/driver combination that cannot capture: eager decoding from then on, slower). A graph
        that runs out of memory while it is captured (the largest batch bucket on a full card) is
        that shape's alone: its steps run eagerly, the other shapes keep their graphs."""
        if self.graph_error:
            return None
        if key not in table:
            try:
                table[key] = capture()
            except torch.OutOfMemoryError as e:
                table[key] = None
                self.graphs_oom.append(key)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                warnings.warn(
                    f"CUDA-graph capture of {key} ran out of memory: that shape decodes without a graph "
                    f"(the others keep theirs): {str(e)[:200]}",
                    stacklevel=3,
                )
                return None
            except Exception as e:
                self.graph_error = repr(e)
                warnings.warn(f"CUDA-graph capture failed, decoding without graphs: {e!r}", stacklevel=3)
                return None
        return table[key]

    def _captured(self, body, restore: tuple = ()):
        """``body(compiled)`` as a CUDA graph in the shared pool: (graph, its outputs). The compiled
        regions first; if they fail (no Triton, an inductor bug), the same body uncompiled
        (``compile_error`` says why). ``restore``: tensors the warm-up runs change, put back after."""
        saved = [t.clone() for t in restore]

        def put_back():
            for t, s in zip(restore, saved):
                t.copy_(s)

        try:
            try:
                return self._capture_once(body, self.compiled)
            except torch.OutOfMemoryError:
                raise  # the memory, not the compiler: this shape goes without a graph (_graph)
            except Exception as e:
                if not self.compiled:
                    raise
                self.compiled, self.compile_error = False, repr(e)[:500]
                warnings.warn(f"compiling the decode step failed, capturing it uncompiled: {e!r}", stacklevel=3)
                put_back()
                return self._capture_once(body, False)
        finally:
            put_back()

    def _capture_once(self, body, compiled: bool):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):  # warm-up outside the graph (allocator, lazy init, compilation)
                body(compiled)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        self._pool = self._pool or torch.cuda.graph_pool_handle()  # every graph shares memory
        with torch.cuda.graph(g, pool=self._pool), torch.no_grad():
            out = body(compiled)
        return g, out

    def _capture_decode(self, length: int, rows: int):
        s_ids = torch.zeros(rows, dtype=torch.long, device=self.device)
        s_pos = torch.full((rows,), -1, dtype=torch.long, device=self.device)
        g, s_out = self._captured(lambda c: self._decode(s_ids, s_pos, rows, length, c))
        return g, s_ids, s_pos, s_out

    # ── the decode loop's steps on device state (ContinuousBatcher) ──────────
    def _put(self, dst: torch.Tensor, slots: list[int], values) -> None:
        """``dst[slots] = values`` without waiting for the GPU (the copies are asynchronous)."""
        idx = _to(torch.tensor(slots), self.device)
        val = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dst.dtype)
        dst[idx] = _to(val, self.device).to(dst.dtype)

    def start(self, slots: list[int], tokens: torch.Tensor, positions: list[int]) -> None:
        """Slots begin decoding: ``tokens`` (device) at ``positions`` (each prompt's length); each
        slot's generated-token counts start at its first token."""
        self._put(self.cur_ids, slots, tokens)
        self._put(self.cur_pos, slots, positions)
        idx = _to(torch.tensor(slots), self.device)
        self.counts[idx] = 0.0
        self.counts[idx, tokens.to(self.device)] = 1.0

    def stop(self, slot: int) -> None:
        self.cur_pos[slot] = -1

    @torch.no_grad()
    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Slot ``dst`` gets the keys and values of slot ``src``'s first ``n`` positions (every
        layer; a prompt that starts as ``src``'s continues from there, :mod:`.prefix`)."""
        self.k[:, dst, :n] = self.k[:, src, :n]
        self.v[:, dst, :n] = self.v[:, src, :n]

    def host_pool(self, pages: int, page_tokens: int) -> torch.Tensor:
        """Host memory for ``pages`` pages of ``page_tokens`` positions' keys and values, ``[page,
        K or V, layer, position, kv head, head dim]``, allocated once (pinned beside a GPU)."""
        shape = (pages, 2, self.k.shape[0], page_tokens, *self.k.shape[3:])
        return torch.empty(shape, dtype=self.dtype, pin_memory=self.device.type == "cuda")

    @torch.no_grad()
    def save_prefix(self, slot: int, n: int, pool: torch.Tensor, pages: list[int]) -> None:
        """Copy slot ``slot``'s first ``n`` positions' keys and values into ``pages`` of ``pool``
        (:meth:`host_pool`), whole pages (a page's positions past ``n`` hold whatever the slot
        had there, never read). Beside a GPU the copies are asynchronous, queued on the stream
        before whatever next writes the slot."""
        size = pool.shape[3]
        for j, page in enumerate(pages):
            a = j * size
            b = min(a + size, self.max_len)
            for which, src in enumerate((self.k, self.v)):
                pool[page, which, :, : b - a].copy_(src[:, slot, a:b], non_blocking=True)

    @torch.no_grad()
    def load_prefix(self, slot: int, pool: torch.Tensor, pages: list[int], n: int) -> None:
        """Slot ``slot``'s first ``n`` positions get the keys and values :meth:`save_prefix` put in
        ``pages`` (whole pages: the positions past ``n`` they reach are written before they are read)."""
        size = pool.shape[3]
        for j, page in enumerate(pages[: -(-n // size)]):
            a = j * size
            b = min(a + size, self.max_len)
            for which, dst in enumerate((self.k, self.v)):
                dst[:, slot, a:b].copy_(pool[page, which, :, : b - a], non_blocking=True)

    def token_bytes(self) -> int:
        """What one position of one slot holds: its keys and values in every layer."""
        return 2 * self.k[:, 0, 0].numel() * self.k.element_size()

    def set_sampling(
        self,
        slots: list[int],
        temperature: list[float],
        top_p: list[float],
        frequency: list[float],
        presence: list[float],
        repetition: list[float],
    ) -> None:
        """Each slot's sampling settings and penalty factors, read in place by the steps."""
        self._put(self.temp, slots, temperature)
        self._put(self.top_p, slots, top_p)
        self._put(self.freq, slots, frequency)
        self._put(self.pres, slots, presence)
        self._put(self.rep, slots, repetition)

    def set_prompt(self, slots: list[int], prompts: list[list[int]]) -> None:
        """Which tokens each slot's prompt holds (the repetition penalty reads it)."""
        self.in_prompt[_to(torch.tensor(slots), self.device)] = False
        rows = [slot for slot, ids in zip(slots, prompts) for _ in ids]
        if rows:
            ids = [t for p in prompts for t in p]
            self.in_prompt[_to(torch.tensor(rows), self.device), _to(torch.tensor(ids), self.device)] = True

    def set_bias(self, slots: list[int], biases: list[dict | None]) -> None:
        """Each slot's logit bias row: zero, then each request's ``{token id: bias}``."""
        self.bias[_to(torch.tensor(slots), self.device)] = 0.0
        pairs = [(slot, t, b) for slot, d in zip(slots, biases) for t, b in (d or {}).items()]
        if pairs:
            rows, ids, vals = zip(*pairs)
            idx = (_to(torch.tensor(rows), self.device), _to(torch.tensor(ids), self.device))
            self.bias[idx] = _to(torch.tensor(vals, dtype=torch.float32), self.device)

    def set_bits(self, bits: torch.Tensor) -> None:
        """This step's bitmasks of allowed tokens (every slot; CPU int32 ``[slots, words]``)."""
        self.bits.copy_(_to(bits, self.device))

    def set_draws(self, u: list[float]) -> None:
        """This step's uniform draw per slot (every slot, in slot order)."""
        self.u.copy_(_to(torch.tensor(u, dtype=torch.float32), self.device))

    def _step(self, n: int, length: int, sampling: bool, compiled: bool = False, adjust: bool | None = None):
        """Decode the first ``n`` slots from the device state, sample, advance the state; returns
        (tokens ``[n]``, logits ``[n, vocab]``)."""
        logits = self._decode(self.cur_ids[:n], self.cur_pos[:n], n, length, compiled)
        return self._pick(logits, n, sampling, adjust=adjust)

    def _pick(self, logits: torch.Tensor, n: int, sampling: bool, masked: bool = False, adjust: bool | None = None):
        """Sample the first ``n`` rows of ``logits`` (``masked``: each held to its row of
        ``bits``; ``adjust``: under each row's penalties and logit bias, its token counted; None: as
        ``sampling``, which a captured graph's sampling variant does for every row) and advance the
        state of the slots that decode; returns (tokens, logits: before any mask, what logprobs report)."""
        from cerbero_ray.inference.grammar import mask_logits
        from cerbero_ray.inference.sampling import penalize, sample

        adjust = sampling if adjust is None else adjust
        ids, pos, logits = self.cur_ids[:n], self.cur_pos[:n], logits[:n]
        held = mask_logits(logits, self.bits[:n]) if masked else logits
        live = pos >= 0
        if adjust:  # penalties and bias (a row without them is unchanged), then the choice
            held = penalize(held, self.counts[:n], self.freq[:n], self.pres[:n], self.rep[:n], self.in_prompt[:n])
            held = held + self.bias[:n]
        tokens = sample(held, self.temp[:n], self.top_p[:n], self.u[:n]) if sampling else held.argmax(-1)
        if adjust:  # the tokens of the decoding slots are counted
            self.counts[:n].scatter_add_(1, tokens[:, None], live[:, None].to(self.counts.dtype))
        self.cur_ids[:n] = torch.where(live, tokens, ids)
        self.cur_pos[:n] = torch.where(live, pos + 1, pos)
        return tokens, logits

    @torch.no_grad()
    def run(self, n: int, length: int, sampling: bool, graphs: bool = False, adjust: bool | None = None):
        """One step for the first ``n`` slots, the longest reading ``length`` positions: eagerly, or
        (``graphs``, CUDA) the rows of ``n``'s batch bucket through a graph captured per (length
        bucket, batch bucket, sampling); the tokens and logits have a row per slot run. ``adjust``:
        a row has penalties or a logit bias (None: as ``sampling``); a captured step applies them in
        its sampling variant, which such a step takes, greedy or not."""
        adjust = sampling if adjust is None else adjust
        key = (self._bucket(length), self._batch_bucket(n), sampling or adjust)
        captured = graphs and self._graph(self.step_graphs, key, lambda: self._capture_step(*key))
        if not captured:
            return self._step(n, length, sampling, adjust=adjust)
        g, (tokens, logits) = captured
        g.replay()
        return tokens, logits

    # A constrained step in two halves: its bitmask needs the previous step's token on the host,
    # which is read while the first half runs on the GPU (the mask's cost hides behind the forward)
    @torch.no_grad()
    def forward(self, n: int, length: int, graphs: bool = False) -> torch.Tensor:
        """The first half: the next-token logits of the first ``n`` slots from the device state
        (nothing advanced; with ``graphs``, the rows of ``n``'s batch bucket, one graph per length
        bucket and batch bucket)."""
        bucket, rows = self._bucket(length), self._batch_bucket(n)

        def capture():
            ids, pos = self.cur_ids[:rows], self.cur_pos[:rows]
            return self._captured(lambda c: self._decode(ids, pos, rows, bucket, c))

        captured = graphs and self._graph(self.step_graphs, ("forward", bucket, rows), capture)
        if not captured:
            return self._decode(self.cur_ids[:n], self.cur_pos[:n], n, length)
        g, logits = captured
        g.replay()
        return logits

    @torch.no_grad()
    def pick(
        self,
        logits: torch.Tensor,
        n: int,
        length: int,
        sampling: bool,
        graphs: bool = False,
        adjust: bool | None = None,
    ):
        """The second half: each row held to its bitmask (:meth:`set_bits`), sampled, the state
        advanced; returns (tokens, logits) as :meth:`run` (``adjust`` too). ``logits``: what
        :meth:`forward` gave."""
        adjust = sampling if adjust is None else adjust
        bucket, rows = self._bucket(length), self._batch_bucket(n)
        fwd = self.step_graphs.get(("forward", bucket, rows)) if graphs else None
        variant = sampling or adjust

        def capture():  # against the forward graph's output, which every replay rewrites in place
            return self._captured(
                lambda c: self._pick(logits, rows, variant, True), restore=(self.cur_ids, self.cur_pos, self.counts)
            )

        captured = fwd is not None and fwd[1] is logits
        captured = captured and self._graph(self.step_graphs, ("pick", bucket, rows, variant), capture)
        if not captured:
            return self._pick(logits, n, sampling, True, adjust)
        g, out = captured
        g.replay()
        return out

    def warm(self) -> None:
        """Capture the shortest length bucket's graphs (greedy and sampling) at every batch bucket
        before the first request, the largest first (its shapes compile static; the smaller ones
        share one compilation with the batch dimension symbolic, :func:`_compiled`)."""
        import time

        t0 = time.perf_counter()
        for rows in reversed(self.batch_buckets):
            for sampling in (False, True):
                self.run(rows, 1, sampling, graphs=True)
        self.warm_s = time.perf_counter() - t0

    def _capture_step(self, length: int, rows: int, sampling: bool):
        # the warm-up runs advance the device state: it is put back
        body = lambda c: self._step(rows, length, sampling, c)  # noqa: E731
        return self._captured(body, restore=(self.cur_ids, self.cur_pos, self.counts))


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the CPU) on ``device`` without blocking the host on the GPU: through pinned memory."""
    if device.type != "cuda" or t.device == device:
        return t
    return t.pin_memory().to(device, non_blocking=True)
