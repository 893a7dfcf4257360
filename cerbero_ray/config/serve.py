"""The serving stage's schema and its checks: at compose time a local checkpoint is checked whole
(:mod:`cerbero_ray.checkpoints`); an object-store one, and the engine against its architecture,
when ``run_serve`` starts, before the app is deployed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import MISSING

from cerbero_ray.config.common import (
    GENERATION_ENGINES,
    INFERENCE_DTYPES,
    ClusterConfig,
    PathsConfig,
    at_least,
    check_local_checkpoint,
    check_share,
    one_of,
)
from cerbero_ray.config.label import LabelTaskConfig

DECODE_ATTENTION = ("auto", "sdpa", "varlen", "flex")  # inference.slots.ATTENTION (config imports no torch)


@dataclass
class ServeConfig:
    checkpoint: str = MISSING  # an HF folder or URI (a train run's hf/), or a LoRA adapter folder (merged)
    model_name: str = "cerbero"  # the id clients pass as `model` and /v1/models lists
    # LoRA adapters on the checkpoint, {name: adapter folder or URI}: a request's `model` picks one;
    # requests for different adapters (and the base) share every decode step (continuous engine)
    adapters: Dict[str, str] = field(default_factory=dict)
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None  # set (or $CERBERO_API_KEY): /v1/* needs `Authorization: Bearer <key>`
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 4.0  # autoscaling target per replica
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    metrics_interval_s: float = 2.0
    look_back_period_s: float = 10.0
    max_ongoing_requests: int = 16  # per replica
    max_queued_requests: int = 64  # beyond: overload_status + Retry-After, not an unbounded queue
    overload_status: int = 503  # 503 or 429
    retry_after_s: float = 1.0
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0  # 1 on GPU clusters
    engine: str = "continuous"  # continuous (our continuous batching; Mistral/Llama) or hf (transformers generate)
    max_batch_size: int = 16  # concurrent requests batched together (continuous: KV-cache slots)
    prefill_tokens: int = 8192  # continuous: prompt tokens prefilled per step, packed (a longer prompt: a chunk a step)
    cuda_graphs: Optional[bool] = None  # continuous: CUDA-graph decoding; null: on when the replica has a GPU
    # continuous: the fast decode step (fused QKV and gate/up, compiled norm/rope/MLP, LoRA deltas,
    # varlen attention); null: on with CUDA graphs (a GPU) for Mistral/Llama checkpoints
    fast_decode: Optional[bool] = None
    # the fast step's decode attention: auto (FlashAttention varlen where torch has it, else masked SDPA
    # up to a length bucket) | sdpa | varlen | flex (flex_attention over each row's own blocks: a row
    # reads its real length); a choice that fails its start-up check against SDPA falls back to it
    decode_attention: str = "auto"
    # continuous, CUDA graphs: the batch sizes graphs are captured at, each step running the smallest
    # that holds its live requests' slots; null: 1, 2, 4, then every multiple of 8, and max_batch_size
    graph_batch_sizes: Optional[List[int]] = None
    # continuous: a prompt that starts as one a cache slot holds (a shared system prompt, a chat's
    # earlier turns, the other choices of n) reuses its keys and values instead of computing them
    prefix_cache: bool = True
    # continuous, with prefix_cache: host memory (GiB, per replica, allocated at its start) for prefixes a
    # slot was about to lose to another request (a chat's earlier turns while its client types), copied
    # back when their next prompt comes; 0: off (on a GPU each copy out is a device-to-host transfer of the
    # prefix: not yet measured there; on CPU 1.87x the slots alone for 3 chats a slot, docs/BENCHMARKS.md)
    prefix_store_gib: float = 0.0
    batch_wait_timeout_s: float = 0.02
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512  # the most a request may ask for
    default_max_tokens: int = 128
    max_choices: int = 8  # the most `n` a request may ask for (each choice decodes in a slot of its own)
    max_label_texts: int = 64
    # what one /v1/label request with an inline task may cost: texts x (the task's prompt + every
    # label's answer, each scored per text), in tokens; the scorer's batch budget is 16,384
    max_label_tokens: int = 32768
    max_body_bytes: int = 1_048_576  # larger request bodies are a 413, refused before they are read
    body_timeout_s: float = 10.0  # a request body must arrive within this (408); read before a replica is chosen
    shutdown_grace_s: float = 30.0  # on SIGTERM: accepted requests get this long to finish, then a 503
    label_tasks: Dict[str, LabelTaskConfig] = field(default_factory=dict)


@dataclass
class ServeStageConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def check_serve(c: ServeStageConfig, before: frozenset = frozenset()) -> None:
    """``ValueError`` naming the key, before Ray starts."""
    from cerbero_ray.config.label_task import task_from_dict

    sc = c.serve
    if not 1 <= sc.min_replicas <= sc.max_replicas:
        raise ValueError(
            f"serve.min_replicas ({sc.min_replicas}) must be >= 1 and <= serve.max_replicas ({sc.max_replicas})"
        )
    one_of(sc.overload_status, (503, 429), "serve.overload_status")
    check_share(sc.cpus_per_replica, "serve.cpus_per_replica", zero_ok=True)
    check_share(sc.gpus_per_replica, "serve.gpus_per_replica", zero_ok=True)
    at_least(
        sc,
        (
            "max_ongoing_requests",
            "max_queued_requests",
            "max_batch_size",
            "max_prompt_tokens",
            "max_new_tokens",
            "default_max_tokens",
            "max_choices",
            "max_label_texts",
            "max_label_tokens",
            "port",
            "prefill_tokens",
            "max_body_bytes",
        ),
        1,
        "serve",
    )
    if sc.prefix_store_gib < 0 or (sc.prefix_store_gib and not (sc.prefix_cache and sc.engine == "continuous")):
        raise ValueError(
            f"serve.prefix_store_gib={sc.prefix_store_gib}: host memory for the continuous engine's prefix reuse "
            "(>= 0; needs serve.engine=continuous and serve.prefix_cache=true)"
        )
    if sc.port > 65535:
        raise ValueError(f"serve.port must be a port (1..65535), got {sc.port}")
    at_least(sc, ("shutdown_grace_s",), 0, "serve")
    at_least(sc, ("body_timeout_s", "retry_after_s"), 0.1, "serve")
    if sc.default_max_tokens > sc.max_new_tokens:
        raise ValueError("serve.default_max_tokens must be <= serve.max_new_tokens")
    one_of(sc.dtype, INFERENCE_DTYPES, "serve.dtype")
    one_of(sc.engine, GENERATION_ENGINES, "serve.engine")
    one_of(sc.decode_attention, DECODE_ATTENTION, "serve.decode_attention")
    if sc.decode_attention != "auto" and (sc.fast_decode is False or sc.engine != "continuous"):
        raise ValueError(
            f"serve.decode_attention={sc.decode_attention} is the fast decode step's (serve.engine=continuous, "
            "serve.fast_decode true or null); leave it auto"
        )
    bad = [b for b in sc.graph_batch_sizes or () if not 1 <= b <= sc.max_batch_size]
    if bad:
        raise ValueError(
            f"serve.graph_batch_sizes must lie within 1..serve.max_batch_size ({sc.max_batch_size}): {bad}"
        )
    check_local_checkpoint(sc.checkpoint, "serve.checkpoint")
    check_adapters(sc)
    for name, task in sc.label_tasks.items():
        try:
            t = task_from_dict(task)
        except ValueError as e:
            raise ValueError(f"serve.label_tasks.{name}: {e}") from None
        if t.kind != "classify":
            raise ValueError(
                f"serve.label_tasks.{name}: an {t.kind} task runs in the label job (jobs/label.py); a client "
                "gets the same per request from /v1/chat/completions with response_format json_schema"
            )


def check_adapters(sc: ServeConfig) -> None:
    """``serve.adapters``: names a client can send, the continuous engine, a base checkpoint, and
    (local ones) whole LoRA folders trained on it."""
    from cerbero_ray import adapters
    from cerbero_ray.checkpoints import check_served_adapter
    from cerbero_ray.storage import is_local, local_path

    if not sc.adapters:
        return
    if sc.engine != "continuous":
        raise ValueError("serve.adapters needs serve.engine=continuous (it mixes adapters in one batch)")
    if is_local(sc.checkpoint) and adapters.is_adapter(local_path(sc.checkpoint)):
        raise ValueError("serve.checkpoint is an adapter; with serve.adapters it must be their base (an HF folder)")
    for name, path in sc.adapters.items():
        key = f"serve.adapters.{name}"
        if not adapters.NAME.match(name) or name == sc.model_name:
            raise ValueError(
                f"{key}: a name is letters, digits and ._:- (up to 64), not serve.model_name {sc.model_name!r}"
            )
        if is_local(path):  # an object-store one is checked by run_serve, before the app is deployed
            check_served_adapter(local_path(path), key)
