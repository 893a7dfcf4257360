"""The training stage's schema and its config-time checks (the manifest and the model are checked
against it at run time, :func:`cerbero_ray.train.run_plan.plan_run`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from cerbero_ray.config.common import (
    ClusterConfig,
    ModelConfig,
    PathsConfig,
    TokenizerConfig,
    TrackerConfig,
    at_least,
    check_model,
    check_output_dir,
    check_share,
    check_tokenizer,
    one_of,
)
from cerbero_ray.tracking import check_tracker

PRECISIONS = ("bf16", "fp32")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
ATTENTION = ("auto", "flash_attention_2", "flex_attention", "sdpa", "eager")
COMPILE = ("none", "layers")
STRATEGIES = ("deepspeed", "torch")
KERNELS = ("none", "liger")
SCHEDULES = ("cosine", "linear", "constant")
ZERO_STAGES = (0, 1, 2)
METHODS = ("full", "lora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULL_MODULES = ("embed_tokens", "lm_head")  # what train.lora.train_in_full may name
HEAD = "lm_head"  # a LoRA target beside LORA_TARGETS (not a default): the output layer


@dataclass
class DeepSpeedConfig:
    stage: int = 1  # ZeRO stage: 0, 1 (the recipe) or 2
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    extra: Dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed JSON


@dataclass
class LoraConfig:
    """``train.method=lora``: low-rank adapters on a frozen base (peft)."""

    r: int = 16
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # > 0 costs every adapted input a mask and a kept copy (bench/bench_lora_dropout.py)
    # attention + MLP linears; lm_head may be added (a low-rank update of the output layer: what a
    # weak base needs to make new tokens likely)
    target_modules: List[str] = field(default_factory=lambda: list(LORA_TARGETS))
    train_in_full: List[str] = field(default_factory=list)  # modules trained in full beside: embed_tokens, lm_head
    lr: Optional[float] = None  # the LoRA run's peak learning rate; null: train.lr
    merge: bool = False  # also write <run>/hf: the base with the adapter merged in
    qlora: bool = False  # a 4-bit base through bitsandbytes (CUDA; on CPU its slow fallback)


@dataclass
class CardConfig:
    """The model card's Hub metadata (``README.md`` in ``hf/`` and ``adapter/``): what the run
    cannot know. Both are left out of the card while null."""

    # the Hub's license id (apache-2.0, cc-by-nc-4.0, other, …): the base's and the data's terms decide it
    license: Optional[str] = None
    # the base's Hub id (mistralai/Mistral-7B-v0.1); model.path is a local or bucket path
    base_model: Optional[str] = None


@dataclass
class TrainConfig:
    method: str = "full"  # full (the recipe) | lora (train.lora.*: an adapter on a frozen base)
    lora: LoraConfig = field(default_factory=LoraConfig)
    name: str = "cerbero"  # run name: <output_dir>/<name>; a rerun with the same name resumes
    data_dir: str = MISSING  # a data-stage output (manifest.json + shards/)
    output_dir: str = MISSING  # storage root: local folder (shared on multi-node) or s3://…
    seq_len: Optional[int] = None  # None: the manifest's; set, it must equal it
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    precision: str = "bf16"  # bf16 (fp32 master weights in DeepSpeed) | fp32
    # deepspeed (the recipe) | torch: the same ZeRO-1 in plain PyTorch (fp32 weights under bf16
    # autocast, DDP's fp32 all-reduce, ZeroRedundancyOptimizer for deepspeed.stage=1; cerbero_ray.train.native)
    strategy: str = "deepspeed"
    micro_batch_size: int = 1  # rows per worker per forward
    global_batch_size: int = 8  # rows per optimizer step, all workers together
    epochs: int = 1
    max_steps: Optional[int] = None  # stop early (demos, benchmarks); the schedule still spans max_steps
    lr: float = 2e-5
    min_lr_ratio: float = 0.1  # cosine decays to lr × min_lr_ratio
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: Optional[int] = None  # None: warmup_ratio × total steps
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    attention: str = "auto"  # auto | flash_attention_2 | flex_attention | sdpa | eager
    # none | layers: torch.compile each decoder layer (regional, as torchtitan: one graph for every
    # layer, compiled in the first step; losses equal to eager); speed measured by bench_train_gpu.py
    compile: str = "none"
    # none | liger: Liger Kernel's Triton kernels (RMSNorm, SwiGLU, rope; the fused linear
    # cross-entropy as the loss); CUDA only: on CPU the plain path runs (said once)
    kernels: str = "none"
    loss_chunk_tokens: int = 4096
    seed: int = 0
    eval_rows: int = 0  # held-out rows (never trained on)
    mix_block_rows: int = 1  # rows shuffled across shards per epoch in blocks of this many (0: shard order)
    eval_every: int = 0  # steps; 0: before the first step and at the end only
    log_every: int = 1
    checkpoint_every: int = 0  # steps; 0: at the end only
    keep_checkpoints: int = 2
    hf_in_checkpoints: bool = True  # every checkpoint also holds an HF folder
    max_failures: int = 3  # worker-group restarts from the last checkpoint
    peak_tflops: Optional[float] = None  # per device, for MFU; None: known GPUs, else no MFU
    read_cpus: float = 0.25  # CPUs per Ray Data read task
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    card: CardConfig = field(default_factory=CardConfig)
    fail_at_step: Optional[int] = None  # fault injection (tests, drills): a worker dies after this step, once
    fail_rank: int = 1


@dataclass
class TrainStageConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def accumulation_steps(t: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank (:func:`check_train` makes it whole)."""
    return t.global_batch_size // (t.micro_batch_size * world_size)


def check_train(c: TrainStageConfig, before: frozenset = frozenset()) -> None:
    """``ValueError`` naming the key: batch arithmetic, schedule, precision, ZeRO stage."""
    t, ds = c.train, c.deepspeed
    check_tokenizer(c.tokenizer)
    check_model(c.model)
    if t.method == "lora" and t.lora.qlora and not c.model._target_.endswith(".from_pretrained"):
        raise ValueError("train.lora.qlora=true quantizes a checkpoint as it loads: use model=hf model.path=…")
    check_output_dir(t.output_dir, "train.output_dir")
    if not isinstance(t.name, str) or not t.name.strip() or t.name in (".", "..") or re.search(r"[/\\]", t.name):
        raise ValueError(
            f"train.name must be a folder name (the run's folder in train.output_dir: no '/', not '.' or '..'), "
            f"got {t.name!r}"
        )
    positive = (
        "num_workers",
        "micro_batch_size",
        "global_batch_size",
        "epochs",
        "log_every",
        "keep_checkpoints",
        "loss_chunk_tokens",
        "max_steps",
        "seq_len",
    )
    at_least(t, positive, 1, "train")
    at_least(
        t,
        (
            "eval_rows",
            "eval_every",
            "checkpoint_every",
            "max_failures",
            "weight_decay",
            "warmup_steps",
            "mix_block_rows",
            "seed",  # numpy's generators take no negative seed
        ),
        0,
        "train",
    )
    per_step = t.micro_batch_size * t.num_workers
    if t.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of "
            f"train.micro_batch_size × train.num_workers = {per_step}"
        )
    for key, allowed in (
        ("precision", PRECISIONS),
        ("attention", ATTENTION),
        ("compile", COMPILE),
        ("strategy", STRATEGIES),
        ("kernels", KERNELS),
        ("schedule", SCHEDULES),
        ("placement_strategy", PLACEMENTS),
    ):
        one_of(getattr(t, key), allowed, f"train.{key}")
    if t.attention == "flash_attention_2" and t.micro_batch_size > 1:
        raise ValueError(
            "train.attention=flash_attention_2 needs train.micro_batch_size=1: transformers reads a packed "
            "row's documents from position_ids on that path only for one row, so documents of a row "
            "would attend to each other (use auto, which picks flex_attention, or sdpa)"
        )
    check_tracker(t.tracker, "train.tracker")
    check_card(t.card)
    if ds.stage not in ZERO_STAGES:
        raise ValueError(
            f"deepspeed.stage must be one of {ZERO_STAGES} (the recipe is ZeRO-1; stage 3 shards "
            f"the weights, which this trainer's checkpoint export does not gather), got {ds.stage}"
        )
    if t.strategy == "torch" and ds.extra:
        raise ValueError(
            "deepspeed.extra is merged into DeepSpeed's JSON, which train.strategy=torch does not use; "
            "empty it or use train.strategy=deepspeed"
        )
    if t.strategy == "torch" and ds.stage > 1:
        raise ValueError(
            f"train.strategy=torch shards the optimizer states only (deepspeed.stage 0 or 1, the recipe's "
            f"ZeRO-1); deepspeed.stage={ds.stage} needs train.strategy=deepspeed"
        )
    if not 0 <= t.min_lr_ratio <= 1 or t.lr <= 0:
        raise ValueError("train.lr must be > 0 and train.min_lr_ratio in [0, 1]")
    if not 0 <= t.warmup_ratio <= 1:
        raise ValueError(f"train.warmup_ratio must be in [0, 1], got {t.warmup_ratio}")
    check_share(t.cpus_per_worker, "train.cpus_per_worker")
    check_share(t.read_cpus, "train.read_cpus")
    one_of(t.method, METHODS, "train.method")
    if t.method == "lora":
        check_lora(t.lora, t.use_gpu)


LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")  # the Hub's license ids: apache-2.0, cc-by-nc-sa-4.0, llama3.1
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")  # gpt2, mistralai/Mistral-7B-v0.1


def check_card(cc: CardConfig) -> None:
    """``ValueError`` naming the ``train.card`` key: what the Hub would not read as its metadata."""
    if cc.license is not None and not LICENSE_ID.fullmatch(str(cc.license)):
        raise ValueError(
            f"train.card.license: {cc.license!r} is not a Hub license id (lower case, as apache-2.0, mit, "
            "cc-by-4.0, other)"
        )
    if cc.base_model is not None and (not HUB_ID.fullmatch(str(cc.base_model)) or ".." in str(cc.base_model)):
        raise ValueError(
            f"train.card.base_model: {cc.base_model!r} is not a Hub model id (owner/name, as "
            "mistralai/Mistral-7B-v0.1); a local path belongs in model.path"
        )


def check_lora(lc: LoraConfig, use_gpu: bool) -> None:
    """``ValueError`` naming the ``train.lora`` key: rank, scale, dropout, modules, QLoRA's needs."""
    if lc.lr is not None and lc.lr <= 0:
        raise ValueError(f"train.lora.lr must be > 0 (or null: train.lr), got {lc.lr}")
    if lc.r < 1 or lc.alpha <= 0:
        raise ValueError(f"train.lora.r must be >= 1 and train.lora.alpha > 0, got r={lc.r}, alpha={lc.alpha}")
    if not 0 <= lc.dropout < 1:
        raise ValueError(f"train.lora.dropout must be in [0, 1), got {lc.dropout}")
    if not lc.target_modules:
        raise ValueError(f"train.lora.target_modules: name at least one of {LORA_TARGETS}")
    for m in lc.target_modules:
        one_of(m, (*LORA_TARGETS, HEAD), "train.lora.target_modules[]")
    if HEAD in lc.target_modules and HEAD in lc.train_in_full:
        raise ValueError("train.lora: lm_head is in target_modules and in train_in_full; choose one")
    for m in lc.train_in_full:
        one_of(m, FULL_MODULES, "train.lora.train_in_full[]")
    if lc.qlora:
        check_bitsandbytes(use_gpu)  # before Ray starts; on CPU its 4-bit path is a slow fallback (tests, small runs)
        if lc.merge:
            raise ValueError(
                "train.lora.merge=true with qlora: merging into a 4-bit base loses the adapter's precision; "
                "merge the adapter into the bf16 base afterwards (export does it)"
            )


def check_bitsandbytes(cuda: bool) -> None:
    """``ValueError`` saying how to install bitsandbytes, when it is missing or older than the
    version checked here: 0.45 on CUDA (``[qlora]``'s bound), 0.50 on CPU (its torch fallback for
    4-bit layers; the default test tier trains QLoRA on CPU with it)."""
    import importlib.metadata
    import importlib.util

    from packaging.version import Version

    try:
        v = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:  # not installed, or under another name (a fork)
        v = None
        if importlib.util.find_spec("bitsandbytes") is not None:
            import bitsandbytes

            v = getattr(bitsandbytes, "__version__", "0")
    need = "0.45" if cuda else "0.50"
    if v is None or Version(v) < Version(need):
        raise ValueError(
            f"train.lora.qlora=true needs bitsandbytes >= {need} {'on CUDA' if cuda else 'on CPU'} "
            f"(found {v or 'none'}): pip install '.[qlora]'"
        )
