"""Many LoRA adapters on one base model, mixed in one batch: each row's low-rank update comes from
its own adapter's A and B, gathered per row (the technique of Punica and S-LoRA). Plain PyTorch, no
Ray, no peft at run time (peft's folders are read as tensors: :func:`cerbero_ray.adapters.read_lora`).

Each linear an adapter targets is wrapped in a :class:`LoRALinear` holding every adapter's weights
stacked: ``A [k + 1, r, in]`` and ``B [k + 1, out, r]`` (``r`` the largest rank; smaller ranks
padded with zeros; the scale folded into B; slot 0 all zeros: the base). A forward computes

    y = base(x) + ((x @ A[rows]ᵀ) @ B[rows]ᵀ)       rows: each row's adapter index

with two batched matmuls: the base weights are shared and never copied or merged, and a row of the
base (index 0) gets exactly ``base(x) + 0``. In decode steps (one token a row) the gather is replaced
by two dense matmuls over every adapter at once, the rows masked to their own block in between:

    y = base(x) + ((x @ A_allᵀ) ⊙ mask[rows]) @ B_allᵀ     A_all [(k + 1) r, in], B_all [out, (k + 1) r]

which reads each adapter's weights once per step instead of copying them per row (the same result:
the other blocks contribute exact zeros). A packed prefill (rows of one token each, a prompt's
tokens one after another) runs its rows by contiguous segments of one adapter instead:

    y[a:b] += (x[a:b] @ A[i]ᵀ) @ B[i]ᵀ                 per segment (i, a, b) with i > 0

so each token pays for its own adapter alone, where the dense form would multiply it by all k + 1
(prefill is bound by arithmetic, not by reading the weights). That is the CPU's form (k = 16 of a
hidden-512 model: mixed adapters 0.71-0.73x the base's throughput against 0.67-0.69x dense,
bench/bench_multilora.py); on a GPU a segment's two products are small kernels launched from the
host, 2 per segment per projection per layer, which for a prefill of many short prompts costs
more than the dense form's extra arithmetic, so there the packed prefill takes the dense form.

Which adapter each row uses is the :class:`AdapterSet`'s state, set by whoever runs the model:
``rows`` (a tensor, one index per row: the continuous batcher's per-slot table, which a CUDA graph
reads in place), ``segments`` (host-side (adapter, start, end) runs of rows: the packed prefill on
CPU), or ``single`` (one adapter for the whole batch: the label scorer), else the base alone.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from cerbero_ray import adapters as adapter_files
from cerbero_ray.adapters import NAME
from cerbero_ray.checkpoints import check_adapter, check_base


class LoRALinear(nn.Module):
    """A base ``nn.Linear`` plus the stacked adapters of an :class:`AdapterSet`."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, owner: "AdapterSet"):
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", a, persistent=False)  # [k + 1, r, in]
        self.register_buffer("lora_b", b, persistent=False)  # [k + 1, out, r], scale folded in
        self.register_buffer("b_all", b.permute(1, 0, 2).reshape(b.shape[1], -1).contiguous(), persistent=False)
        self._owner = [owner]  # a list: not a registered submodule

    @property
    def weight(self) -> torch.Tensor:  # what code reading the base's weight expects
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        s = self._owner[0]
        if s.single is not None:
            if s.single == 0:
                return y
            return y + (x @ self.lora_a[s.single].T) @ self.lora_b[s.single].T
        if s.segments is not None:
            for i, a, b in s.segments:
                y[a:b] += (x[a:b] @ self.lora_a[i].T) @ self.lora_b[i].T
            return y
        if s.rows is None:
            return y
        if s.mask is not None and (x.dim() == 2 or x.shape[1] == 1):  # decode: every adapter, masked
            h = x @ self.lora_a.flatten(0, 1).T  # [rows, (1,) (k + 1) r]
            h = h * (s.mask if x.dim() == 2 else s.mask[:, None])
            return y + h @ self.b_all.T
        a = self.lora_a.index_select(0, s.rows)  # [rows, r, in]
        b = self.lora_b.index_select(0, s.rows)  # [rows, out, r]
        flat = x.dim() == 2  # [rows, in]: one token per row
        h = x[:, None] if flat else x
        out = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))
        return y + (out[:, 0] if flat else out)


class AdapterSet:
    """The adapters loaded into a model, by name (index 0: the base)."""

    def __init__(self, model: nn.Module, folders: dict[str, str], base_name: str = "base"):
        if not folders:
            raise ValueError("no adapters")
        self.names = [base_name, *folders]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.rows: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None  # [rows, (k + 1) r]: each row's own adapter block
        self.single: int | None = None
        self.segments: list[tuple[int, int, int]] | None = None  # (adapter > 0, first row, end row)
        self.kernel = "auto"  # auto: the dense form in decode steps, the gather otherwise; "gather": always
        loaded = {}
        for name, folder in folders.items():
            if not NAME.match(name) or name == base_name:
                raise ValueError(
                    f"adapter name {name!r}: letters, digits and ._:- (up to 64), not the base's {base_name!r}"
                )
            cfg, pairs = adapter_files.read_lora(folder)
            why = adapter_files.unsupported(cfg)
            if why:
                raise ValueError(f"adapter {name!r} ({folder}): cannot be served in a mixed batch: {why}")
            loaded[name] = (adapter_files.lora_scale(cfg), pairs)
        p = next(model.parameters())
        dtype, device = p.dtype, p.device
        self.dtype = dtype
        targets = sorted({m for _, pairs in loaded.values() for m in pairs})
        r = max(ab[0].shape[0] for _, pairs in loaded.values() for ab in pairs.values())
        self.rank, self.modules = r, targets
        for module in targets:
            try:
                lin = model.get_submodule(module)
            except AttributeError:
                raise ValueError(f"an adapter targets {module}, which the base model does not have") from None
            if isinstance(lin, LoRALinear):
                raise ValueError(f"{module} already carries adapters")
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"an adapter targets {module}, a {type(lin).__name__}, not a linear layer")
            a = torch.zeros(len(self.names), r, lin.in_features, dtype=torch.float32)
            b = torch.zeros(len(self.names), lin.out_features, r, dtype=torch.float32)
            for i, name in enumerate(self.names[1:], 1):
                scale, pairs = loaded[name]
                if module not in pairs:
                    continue
                la, lb = pairs[module]
                if la.shape[1] != lin.in_features or lb.shape[0] != lin.out_features:
                    raise ValueError(
                        f"adapter {name!r}: {module} is {tuple(lb.shape[:1]) + tuple(la.shape[1:])}, "
                        f"the base's is ({lin.out_features}, {lin.in_features}): another base model"
                    )
                a[i, : la.shape[0]] = la
                b[i, :, : lb.shape[1]] = lb * scale
            parent_name, _, child = module.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(lin, a.to(device, dtype), b.to(device, dtype), self))

    def resolve(self, name: str | None) -> int:
        """The index of adapter ``name`` (None or the base's name: 0); ``KeyError`` when unknown."""
        return 0 if name is None else self.index[name]

    @contextlib.contextmanager
    def use(self, index: int):
        """Every row of the forwards inside uses adapter ``index``."""
        prev = self.single
        self.single = index
        try:
            yield
        finally:
            self.single = prev

    def row_mask(self, rows: torch.Tensor) -> torch.Tensor:
        """``[rows, (k + 1) r]``: ones over each row's own adapter's block of the stacked ranks (the
        dense decode form). No ``one_hot``: it checks its input on the host, which a CUDA graph cannot."""
        hot = rows[:, None] == torch.arange(len(self.names), device=rows.device)[None]
        return hot.to(self.dtype).repeat_interleave(self.rank, dim=1)

    @contextlib.contextmanager
    def per_row(self, rows: torch.Tensor, dense: bool = False):
        """Row ``i`` of the forwards inside uses adapter ``rows[i]`` (``dense``: in the masked dense
        form whatever :attr:`kernel` says: rows of one token each, such as a packed prefill's)."""
        prev = self.rows, self.mask
        self.rows, self.mask = rows, None
        if self.kernel == "auto" or dense:
            self.mask = self.row_mask(rows)
        try:
            yield
        finally:
            self.rows, self.mask = prev

    @contextlib.contextmanager
    def per_segment(self, adapters: list[int], lengths: list[int]):
        """The forwards inside run ``lengths[j]`` rows after another with adapter ``adapters[j]``
        (host-side: a packed prefill's chunks, one token a row); neighbours with one adapter run
        as one segment, the base's rows add nothing."""
        segs, start = [], 0
        for i, n in zip(adapters, lengths):
            if segs and segs[-1][0] == i and segs[-1][2] == start:
                segs[-1] = (i, segs[-1][1], start + n)
            elif i:
                segs.append((i, start, start + n))
            start += n
        prev = self.segments
        self.segments = segs
        try:
            yield
        finally:
            self.segments = prev


def load_adapters(model: nn.Module, adapters: dict[str, str], base_name: str = "base", base: str | None = None):
    """Wrap ``model``'s targeted linears with the adapters at ``adapters`` (``{name: folder or
    URI}``); each adapter's recorded base must be the model's (``base``: its checkpoint, for the
    fingerprint check). Returns the :class:`AdapterSet`."""
    from cerbero_ray.storage import local_copy

    folders = {}
    for name, path in adapters.items():
        check_adapter(path, f"serve.adapters.{name}")
        if base is not None:
            check_base(path, base, local_copy(base), f"serve.adapters.{name}")
        folders[name] = local_copy(path)
    return AdapterSet(model, folders, base_name)
