"""The batch inference schemas (labeling; generation builds on the same base) and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from cerbero_ray.config.common import (
    INFERENCE_DTYPES,
    ClusterConfig,
    PathsConfig,
    at_least,
    check_apart,
    check_local_checkpoint,
    check_local_path,
    check_output_dir,
    check_share,
    one_of,
)

INPUT_FORMATS = ("auto", "jsonl", "json", "parquet", "txt")


@dataclass
class LabelTaskConfig:
    name: str = MISSING
    instruction: str = MISSING
    labels: Dict[str, str] = field(default_factory=dict)  # label -> Italian verbalizer
    few_shot: List[Dict[str, Any]] = field(default_factory=list)  # [{text, label}]; extract: [{text, output}]
    template: Optional[str] = None  # the human's turn with {text}; null: instruction + text + the options
    kind: str = "classify"  # classify: score the labels; extract: JSON under `schema`, a typed column per property
    schema: Optional[Dict[str, Any]] = None  # extract: a JSON schema of an object
    max_new_tokens: int = 256  # extract: the answer's token budget (an answer cut there is an error row)


@dataclass
class BatchInferenceConfig:
    input: str = MISSING  # file, folder, glob or URI: JSONL, Parquet or .txt (one text per line)
    format: str = "auto"  # auto | jsonl | json (one array, read whole) | parquet | txt
    text_field: str = "text"
    id_field: Optional[str] = "id"  # missing in a row: "<file>:<line>"
    output_dir: str = MISSING
    checkpoint: str = MISSING  # an HF folder or URI (a train run's hf/), or a LoRA adapter folder (adapter/)
    base: Optional[str] = None  # an adapter checkpoint's base; None: the one the adapter records
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    workers: Optional[int] = None  # model actors; None: one per GPU, or cluster CPUs - 1
    gpus_per_worker: float = 0.0  # 1 on GPU clusters
    cpus_per_worker: float = 1.0
    chunk_rows: int = 256  # rows per output part (the unit of resume)
    overwrite: bool = False  # discard an earlier run in output_dir


@dataclass
class LabelConfig(BatchInferenceConfig):
    task: LabelTaskConfig = field(default_factory=LabelTaskConfig)
    task_file: Optional[str] = None  # a YAML task of your own (replaces `task`)
    max_text_tokens: int = 512  # longer texts keep their first tokens (truncated=true)
    max_batch_tokens: int = 16384  # padded tokens per forward pass
    sort_window: int = 256  # rows sorted by length within this window
    slots: int = 16  # extract tasks: answers decoded together (the continuous engine's KV-cache slots)


@dataclass
class LabelStageConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    label: LabelConfig = field(default_factory=LabelConfig)


def check_batch_inference(b: BatchInferenceConfig, stage: str) -> None:
    """The keys labeling and generation share; a local input that does not exist is named here,
    before Ray starts (an object-store input is listed when the run plans its chunks)."""
    one_of(b.format, INPUT_FORMATS, f"{stage}.format")
    one_of(b.dtype, INFERENCE_DTYPES, f"{stage}.dtype")
    at_least(b, ("chunk_rows", "workers"), 1, stage)
    check_share(b.gpus_per_worker, f"{stage}.gpus_per_worker", zero_ok=True)
    check_share(b.cpus_per_worker, f"{stage}.cpus_per_worker")
    check_local_path(b.input, f"{stage}.input", glob_ok=True)
    check_output_dir(b.output_dir, f"{stage}.output_dir")
    check_apart(b.input, b.output_dir, f"{stage}.input", f"{stage}.output_dir", ("parts",))


def check_label(c: LabelStageConfig, before: frozenset = frozenset()) -> None:
    """``before``: the stages that run before this one in the same job (the recipe's train stage
    writes the checkpoint: it is not there yet)."""
    from cerbero_ray.config.label_task import resolve_task

    lc = c.label
    check_batch_inference(lc, "label")
    if "train" not in before:
        check_local_checkpoint(lc.checkpoint, "label.checkpoint", lc.base)
    at_least(lc, ("max_text_tokens", "max_batch_tokens", "sort_window", "slots"), 1, "label")
    if lc.task_file:
        check_local_path(lc.task_file, "label.task_file")
    resolve_task(lc)  # a ValueError naming label.task… for a malformed task
