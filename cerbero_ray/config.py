"""Typed config schemas. Registered with Hydra's ConfigStore so that a misspelled or unknown key
fails when the config is composed, not an hour into a run.

Every primary config (``conf/<stage>.yaml``) lists its schema first in its defaults; the groups
(``cluster/``, ``paths/``, ``tokenizer/``, ``data/``, ``model/``) fill its fields.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from cerbero_ray.tokenizer import SYSTEM_LINE

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class ClusterConfig:
    address: Optional[str] = None        # None: embedded local cluster (or the job's cluster under `ray job submit`)
    num_cpus: Optional[int] = None       # embedded cluster only; None = all cores
    dashboard: bool = False              # embedded cluster only
    dashboard_host: str = "127.0.0.1"
    namespace: str = "cerbero"
    object_store_memory_gb: Optional[float] = None
    progress_bars: bool = False          # Ray Data's own per-operator bars (ours are always on)


@dataclass
class PathsConfig:
    repo_dir: str = MISSING
    data_dir: str = MISSING               # external data (../shared/data or a bucket)
    output_dir: str = MISSING


@dataclass
class TokenizerConfig:
    path: Optional[str] = None            # None: mistral-common's tokenizer.model.v1
    assistant_tag: str = "AI"             # "AI" ([|AI|], the seed) or "Assistente" (the released model)
    system_line: str = SYSTEM_LINE


@dataclass
class ModelConfig:
    _target_: str = MISSING               # a builder in cerbero_ray.models
    path: Optional[str] = None            # for cerbero_ray.models.from_pretrained
    dtype: str = "float32"
    overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceConfig:
    path: str = MISSING                   # file, folder, glob or URI
    format: str = "auto"                  # auto | openai | sharegpt | alpaca | text
    weight: float = 1.0                   # 2.0 = every document twice, 0.5 = half of them (seeded)
    text_field: str = "text"


@dataclass
class DataConfig:
    sources: Dict[str, SourceConfig] = field(default_factory=dict)
    seq_len: int = 8192
    loss_on: str = "assistant"            # assistant | all
    packing: str = "whole"                # whole (best-fit decreasing) | split (fill every row)
    long_docs: str = "split"              # split | drop  (documents longer than seq_len)
    buffer_docs: int = 4096               # documents per packing buffer (= per shard)
    workers: Optional[int] = None         # packing actors; None = cluster CPUs - 1 (one CPU left for reads)
    seed: int = 0
    compression: str = "zstd"
    output_dir: str = MISSING
    overwrite: bool = False


@dataclass
class DeepSpeedConfig:
    stage: int = 1                        # ZeRO stage: 0, 1 (the recipe) or 2
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    extra: Dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed JSON


@dataclass
class TrainConfig:
    name: str = "cerbero"                 # run name: <output_dir>/<name>; a rerun with the same name resumes
    data_dir: str = MISSING               # a prepare_data output (manifest.json + shards/)
    output_dir: str = MISSING             # storage root: local folder (shared on multi-node) or s3://…
    seq_len: Optional[int] = None         # None: the manifest's; set, it must equal it
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"      # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    precision: str = "bf16"               # bf16 (fp32 master weights in DeepSpeed) | fp32
    micro_batch_size: int = 1             # rows per worker per forward
    global_batch_size: int = 8            # rows per optimizer step, all workers together
    epochs: int = 1
    max_steps: Optional[int] = None       # stop early (demos, benchmarks); the schedule still spans max_steps
    lr: float = 2e-5
    min_lr_ratio: float = 0.1             # cosine decays to lr × min_lr_ratio
    schedule: str = "cosine"              # cosine | linear | constant
    warmup_steps: Optional[int] = None    # None: warmup_ratio × total steps
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    attention: str = "auto"               # auto | flash_attention_2 | flex_attention | sdpa | eager
    loss_chunk_tokens: int = 4096
    seed: int = 0
    eval_rows: int = 0                    # held-out rows (never trained on)
    eval_every: int = 0                   # steps; 0: before the first step and at the end only
    log_every: int = 1
    checkpoint_every: int = 0             # steps; 0: at the end only
    keep_checkpoints: int = 2
    hf_in_checkpoints: bool = True        # every checkpoint also holds an HF folder
    max_failures: int = 3                 # worker-group restarts from the last checkpoint
    peak_tflops: Optional[float] = None   # per device, for MFU; None: known GPUs, else no MFU
    read_cpus: float = 0.25               # CPUs per Ray Data read task
    fail_at_step: Optional[int] = None    # fault injection (tests, drills): a worker dies after this step, once
    fail_rank: int = 1


@dataclass
class LabelTaskConfig:
    name: str = MISSING
    instruction: str = MISSING
    labels: Dict[str, str] = field(default_factory=dict)        # label -> Italian verbalizer
    few_shot: List[Dict[str, str]] = field(default_factory=list)  # [{text, label}]


@dataclass
class BatchInferenceConfig:
    input: str = MISSING                  # file, folder, glob or URI: JSONL, Parquet or .txt (one text per line)
    format: str = "auto"                  # auto | jsonl | parquet | txt
    text_field: str = "text"
    id_field: Optional[str] = "id"        # missing in a row: "<file>:<line>"
    output_dir: str = MISSING
    checkpoint: str = MISSING             # an HF folder or URI (a train run's hf/)
    dtype: str = "auto"                   # auto: bfloat16 on GPU, float32 on CPU
    workers: Optional[int] = None         # model actors; None: one per GPU, or cluster CPUs - 1
    gpus_per_worker: float = 0.0          # 1 on GPU clusters
    cpus_per_worker: float = 1.0
    chunk_rows: int = 256                 # rows per output part (the unit of resume)
    overwrite: bool = False               # discard an earlier run in output_dir


@dataclass
class LabelConfig(BatchInferenceConfig):
    task: LabelTaskConfig = field(default_factory=LabelTaskConfig)
    task_file: Optional[str] = None       # a YAML task of your own (replaces `task`)
    max_text_tokens: int = 512            # longer texts keep their first tokens (truncated=true)
    max_batch_tokens: int = 16384         # padded tokens per forward pass
    sort_window: int = 256                # rows sorted by length within this window


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.7              # 0: greedy
    top_p: float = 0.9
    stop: List[str] = field(default_factory=lambda: ["[|Umano|]"])
    seed: int = 0


@dataclass
class SelfChatConfig:
    turns: int = 3                        # exchanges (human + assistant) per conversation
    assistant_tag: str = "AI"             # must match the checkpoint's chat template
    user_max_new_tokens: int = 96         # the human's turns are short
    min_chars: int = 8                    # a shorter turn is degenerate
    max_repeat_ratio: float = 0.5         # share of repeated word trigrams above which a turn is degenerate
    drop_unfinished: bool = True          # a turn cut by max_new_tokens is degenerate
    dedup: str = "ngram"                  # ngram | embedding | none (near-duplicate conversations)
    dedup_ngram: int = 5
    dedup_threshold: float = 0.8          # ngram: Jaccard similarity of word n-gram sets
    dedup_cosine: float = 0.9             # embedding: cosine similarity of the mean-pooled hidden states
    dedup_model: Optional[str] = None     # embedding: an HF encoder folder/URI; null: the generating model (centred)
    dedup_max_tokens: int = 512           # embedding: tokens of a conversation embedded


@dataclass
class GenerateConfig(BatchInferenceConfig):
    mode: str = "prompts"                 # prompts (one answer per prompt) | self_chat (conversations from seeds)
    engine: str = "continuous"            # continuous (our continuous batching; Mistral/Llama) or hf (transformers generate)
    batch_size: int = 16                  # rows decoded together (continuous: KV-cache slots)
    max_prompt_tokens: int = 2048
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    self_chat: SelfChatConfig = field(default_factory=SelfChatConfig)


@dataclass
class ServeConfig:
    checkpoint: str = MISSING             # an HF folder or URI (a train run's hf/)
    model_name: str = "cerbero"           # the id clients pass as `model` and /v1/models lists
    dtype: str = "auto"                   # auto: bfloat16 on GPU, float32 on CPU
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None         # set (or $CERBERO_API_KEY): /v1/* needs `Authorization: Bearer <key>`
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 4.0  # autoscaling target per replica
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    metrics_interval_s: float = 2.0
    look_back_period_s: float = 10.0
    max_ongoing_requests: int = 16        # per replica
    max_queued_requests: int = 64         # beyond: overload_status + Retry-After, not an unbounded queue
    overload_status: int = 503            # 503 or 429
    retry_after_s: float = 1.0
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0         # 1 on GPU clusters
    engine: str = "continuous"            # continuous (our continuous batching; Mistral/Llama) or hf (transformers generate)
    max_batch_size: int = 16              # concurrent requests batched together (continuous: KV-cache slots)
    prefill_tokens: int = 8192            # continuous: prompt tokens admitted per step (a longer prompt runs alone)
    cuda_graphs: Optional[bool] = None    # continuous: CUDA-graph decoding; null: on when the replica has a GPU
    batch_wait_timeout_s: float = 0.02
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512             # the most a request may ask for
    default_max_tokens: int = 128
    max_label_texts: int = 64
    label_tasks: Dict[str, LabelTaskConfig] = field(default_factory=dict)


@dataclass
class PrepareDataConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class TrainStageConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class LabelStageConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    label: LabelConfig = field(default_factory=LabelConfig)


@dataclass
class GenerateStageConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


@dataclass
class ServeStageConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


@dataclass
class PipelineConfig(PrepareDataConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    stages: List[str] = field(default_factory=lambda: ["prepare_data", "train", "label"])


STAGE_SCHEMAS = {"prepare_data": PrepareDataConfig, "train": TrainStageConfig, "label": LabelStageConfig,
                 "generate": GenerateStageConfig, "serve": ServeStageConfig, "pipeline": PipelineConfig}
PIPELINE_STAGES = ("prepare_data", "train", "label")


def _resolve_cwd() -> str:
    return os.getcwd()


def register_configs() -> None:
    """Register schemas and resolvers (idempotent)."""
    if not OmegaConf.has_resolver("repo_dir"):
        OmegaConf.register_new_resolver("repo_dir", lambda: REPO_DIR)
        OmegaConf.register_new_resolver("cwd", _resolve_cwd)
    cs = ConfigStore.instance()
    for name, node in STAGE_SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=node)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data/source", name="source_schema", node=SourceConfig)


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain dicts: what goes to Ray workers (``${…}`` never resolves there)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def compose(stage: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/<stage>.yaml`` with overrides outside of ``@hydra.main`` (tests, submit)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(REPO_DIR, "conf"), version_base=None):
        return hydra_compose(config_name=stage, overrides=list(overrides or []))
