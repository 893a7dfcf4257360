"""The evaluation stage's schema and its checks: SQuAD-it and EVALITA tables for any models (HF
folders or URIs, GGUF files, OpenAI-compatible endpoints), under four protocols and several prompt
wordings, with bootstrap intervals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from cerbero_ray.config.common import (
    INFERENCE_DTYPES,
    ClusterConfig,
    PathsConfig,
    TrackerConfig,
    at_least,
    check_local_checkpoint,
    check_output_dir,
    check_share,
    is_local,
    local_path,
    one_of,
)
from cerbero_ray.tracking import check_tracker

TASK_KINDS = ("squad", "ami2020", "ironita", "sentipolc")
SHOT_MODES = ("draws", "per_row")
PROTOCOLS = ("generate", "choice", "score", "benchita")
PROMPT_WORDINGS = {"squad": 2, "ami2020": 3, "ironita": 3, "sentipolc": 3}  # len(evaluate.prompts.PROMPTS[kind])


@dataclass
class EvalTaskConfig:
    kind: str = MISSING  # squad | ami2020 | ironita | sentipolc
    path: str = MISSING  # the task's file (a local path or URI)
    shots: int = 5
    # EVALITA generate/score: how the shots are chosen. "draws": `shot_draws` fixed sets, each the same
    # for every row (so the scorer runs its prefix once), drawn with their own seeds, both answers in
    # each; every figure is the mean over draws, with their spread. "per_row": every row its own
    # shots (lm-evaluation-harness's default): no shared prefix, so `score` costs a full prompt per row
    shot_mode: str = "draws"
    shot_draws: int = 3
    max_rows: Optional[int] = None  # score a seeded sample of this many rows; null: every row
    pool_rows: int = 100  # ami2020 / ironita: rows held out (fixed seed) as the shot pool
    # squad: generate and benchita; EVALITA also score, and choice (generate held to si/no)
    protocols: List[str] = field(default_factory=lambda: ["generate", "score", "benchita"])
    prompts: Optional[List[int]] = None  # the prompt wordings to run (indices); null: every shipped one
    max_new_tokens: int = 32  # the generate protocol's (benchita's own: 100 SQuAD, 10 EVALITA)


@dataclass
class EvaluateConfig:
    # name -> an HF folder or URI, a .gguf file (llama.cpp), or an http(s)://…/v1 endpoint (one table row each)
    checkpoints: Dict[str, str] = field(default_factory=dict)
    tasks: Dict[str, EvalTaskConfig] = field(default_factory=dict)
    only: Optional[List[str]] = None  # run these tasks of `tasks`; null: all
    skip_missing: bool = False  # a task whose file is missing is skipped with one line (else an error)
    output_dir: str = MISSING
    seed: int = 0
    dtype: str = "auto"
    workers: Optional[int] = None  # model actors per checkpoint; None: one per GPU, or cluster CPUs - 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    batch_rows: int = 64  # rows per actor call
    batch_size: int = 16  # continuous-batching slots (generate protocol; a GGUF file's too: a KV stream each)
    prefill_tokens: int = 32768  # prompt tokens prefilled per step: offline, bigger steps go faster
    max_prompt_tokens: int = 4096
    overwrite: bool = False
    bootstrap: int = 1000  # resamples of the rows for every 95% interval (0: none)
    endpoint_model: Optional[str] = None  # an endpoint's model id; null: the first of its /v1/models
    endpoint_key_env: str = "OPENAI_API_KEY"  # the environment variable holding an endpoint's key
    endpoint_concurrency: int = 8  # requests in flight to an endpoint
    published: List[Dict[str, Any]] = field(default_factory=list)  # rows printed for reference in results.md
    # each model's figures in MLflow or W&B: the training run that wrote its checkpoint, when that
    # run was tracked with the same tracker; else a run of its own in tracker.project
    tracker: TrackerConfig = field(default_factory=TrackerConfig)


@dataclass
class EvaluateStageConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


def selected_tasks(ec: EvaluateConfig) -> dict:
    return {k: v for k, v in ec.tasks.items() if ec.only is None or k in ec.only}


def check_evaluate(c: EvaluateStageConfig, before: frozenset = frozenset()) -> None:
    """``before``: the stages that run before this one in the same job (the recipe's train and
    export stages write the checkpoints and GGUF files: they are not there yet)."""
    import os

    ec = c.evaluate
    check_tracker(ec.tracker, "evaluate.tracker")
    checkpoints = not before & {"train", "export"}
    if not ec.checkpoints:
        raise ValueError("evaluate.checkpoints: no checkpoint (a mapping name -> HF folder or URI)")
    for name, path in ec.checkpoints.items():
        key = f"evaluate.checkpoints.{name}"
        if path.startswith(("http://", "https://")):
            continue  # an endpoint: asked for its models when the stage runs
        if path.lower().endswith(".gguf"):
            if checkpoints and is_local(path) and not os.path.isfile(local_path(path)):
                raise ValueError(f"{key}: no such GGUF file: {path}")
        elif checkpoints:
            check_local_checkpoint(path, key)
    unknown = set(ec.only or []) - set(ec.tasks)
    if unknown:
        raise ValueError(f"evaluate.only: unknown tasks {sorted(unknown)}; configured: {sorted(ec.tasks)}")
    one_of(ec.dtype, INFERENCE_DTYPES, "evaluate.dtype")
    check_output_dir(ec.output_dir, "evaluate.output_dir")
    at_least(
        ec,
        ("workers", "batch_rows", "batch_size", "max_prompt_tokens", "prefill_tokens", "endpoint_concurrency"),
        1,
        "evaluate",
    )
    at_least(ec, ("bootstrap", "seed"), 0, "evaluate")  # numpy's generators take no negative seed
    check_share(ec.gpus_per_worker, "evaluate.gpus_per_worker", zero_ok=True)
    check_share(ec.cpus_per_worker, "evaluate.cpus_per_worker")
    for name, t in selected_tasks(ec).items():
        key = f"evaluate.tasks.{name}"
        one_of(t.kind, TASK_KINDS, f"{key}.kind")
        for p in t.protocols:
            one_of(p, PROTOCOLS if t.kind != "squad" else ("generate", "benchita"), f"{key}.protocols")
        if not t.protocols:
            raise ValueError(f"{key}.protocols: at least one of {PROTOCOLS}")
        wordings = PROMPT_WORDINGS[t.kind]
        if t.prompts is not None and (not t.prompts or any(not 0 <= i < wordings for i in t.prompts)):
            raise ValueError(f"{key}.prompts: indices of the {wordings} shipped wordings (0..{wordings - 1}), or null")
        at_least(t, ("max_new_tokens", "max_rows", "pool_rows"), 1, key)
        at_least(t, ("shots",), 0, key)
        at_least(t, ("shot_draws",), 1, key)
        one_of(t.shot_mode, SHOT_MODES, f"{key}.shot_mode")
        path = t.path
        if is_local(path) and not os.path.isfile(local_path(path)):
            if not ec.skip_missing:
                raise ValueError(f"{key}.path: no such file: {path} (see ../shared/data/MANIFEST.md)")
