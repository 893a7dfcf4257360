"""The generation stage's schema (prompts and self-chat) and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from cerbero_ray.config.common import (
    GENERATION_ENGINES,
    ClusterConfig,
    PathsConfig,
    at_least,
    check_local_checkpoint,
    one_of,
)
from cerbero_ray.config.constraint import ConstraintConfig, config_grammar
from cerbero_ray.config.label import BatchInferenceConfig, check_batch_inference
from cerbero_ray.config.sampling import Sampling, check_sampling

MODES = ("prompts", "self_chat")
DEDUP = ("ngram", "embedding", "none")


@dataclass
class SelfChatConfig:
    turns: int = 3  # exchanges (human + assistant) per conversation
    assistant_tag: str = "AI"  # must match the checkpoint's chat template
    user_max_new_tokens: int = 96  # the human's turns are short
    min_chars: int = 8  # a shorter turn is degenerate
    max_repeat_ratio: float = 0.5  # share of repeated word trigrams above which a turn is degenerate
    drop_unfinished: bool = True  # a turn cut by max_new_tokens is degenerate
    dedup: str = "ngram"  # ngram | embedding | none (near-duplicate conversations)
    dedup_ngram: int = 5
    dedup_threshold: float = 0.8  # ngram: Jaccard similarity of word n-gram sets
    dedup_cosine: float = 0.9  # embedding: cosine similarity of the mean-pooled hidden states
    dedup_model: Optional[str] = None  # embedding: an HF encoder folder/URI; null: the generating model (centred)
    dedup_max_tokens: int = 512  # embedding: tokens of a conversation embedded


@dataclass
class GenerateConfig(BatchInferenceConfig):
    mode: str = "prompts"  # prompts (one answer per prompt) | self_chat (conversations from seeds)
    engine: str = "continuous"  # continuous (our continuous batching; Mistral/Llama) or hf (transformers generate)
    batch_size: int = 16  # rows decoded together (continuous: KV-cache slots)
    max_prompt_tokens: int = 2048
    sampling: Sampling = field(default_factory=Sampling)
    self_chat: SelfChatConfig = field(default_factory=SelfChatConfig)
    # the answers' format (prompts mode), the assistant's turns (self_chat): a JSON schema, any JSON
    # object, a regex or a choice list, by constrained decoding (continuous engine); null kind: free
    constraint: ConstraintConfig = field(default_factory=ConstraintConfig)
    user_constraint: ConstraintConfig = field(default_factory=ConstraintConfig)  # self_chat: the human's turns


@dataclass
class GenerateStageConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


def check_generate(c: GenerateStageConfig, before: frozenset = frozenset()) -> None:
    gc = c.generate
    one_of(gc.mode, MODES, "generate.mode")
    check_batch_inference(gc, "generate")
    check_local_checkpoint(gc.checkpoint, "generate.checkpoint", gc.base)
    at_least(gc, ("batch_size", "max_prompt_tokens"), 1, "generate")
    one_of(gc.engine, GENERATION_ENGINES, "generate.engine")
    check_sampling(gc.sampling, "generate.sampling")
    constrained = [k for k in ("constraint", "user_constraint") if config_grammar(getattr(gc, k), f"generate.{k}")]
    if constrained and gc.engine != "continuous":
        raise ValueError(f"generate.{constrained[0]}: constrained decoding runs on engine=continuous, not {gc.engine}")
    if "user_constraint" in constrained and gc.mode != "self_chat":
        raise ValueError("generate.user_constraint: the human's turns are self_chat's (generate.mode=self_chat)")
    if gc.sampling.grammar is not None:
        raise ValueError("generate.sampling.grammar: set generate.constraint (kind and value) instead")
    sc = gc.self_chat
    at_least(sc, ("turns", "user_max_new_tokens", "dedup_ngram", "dedup_max_tokens"), 1, "generate.self_chat")
    one_of(sc.dedup, DEDUP, "generate.self_chat.dedup")
    for k in ("dedup_threshold", "dedup_cosine"):
        if not 0 < getattr(sc, k) <= 1:
            raise ValueError(f"generate.self_chat.{k} must be in (0, 1], got {getattr(sc, k)}")
    if sc.dedup == "embedding" and sc.dedup_model:
        check_local_checkpoint(sc.dedup_model, "generate.self_chat.dedup_model")
