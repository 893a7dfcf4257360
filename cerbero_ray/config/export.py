"""The export stage's schema and its checks: a checkpoint as GGUF files for llama.cpp."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from cerbero_ray.config.common import ClusterConfig, PathsConfig, at_least, check_local_checkpoint, check_output_dir
from cerbero_ray.storage import within

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m", "q4_k_s", "q5_k_m", "q6_k")


@dataclass
class ExportConfig:
    checkpoint: str = MISSING  # an HF folder or URI (a train run's hf/), or a LoRA adapter folder (adapter/)
    base: Optional[str] = None  # an adapter's base checkpoint; None: the one the adapter records
    output_dir: str = MISSING  # a local folder or URI: <output_dir>/<name>-<TYPE>.gguf
    name: str = "cerbero"  # general.name in the file, and the file names' prefix
    types: List[str] = field(default_factory=lambda: ["f16", "q4_k_m"])
    threads: int = 0  # llama.cpp's quantizer; 0: all cores
    overwrite: bool = False  # redo files export.json says were made from what the checkpoint holds now
    verify: bool = True  # llama.cpp loads each file and runs the seed's prompt (in a child process)
    # an adapter checkpoint: besides the merged model's files, the adapter as a llama.cpp LoRA file
    # (<name>-LORA-F32.gguf) and the base it applies to (<name>-base-F16.gguf)
    lora: bool = True


@dataclass
class ExportStageConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def check_export(c: ExportStageConfig, before: frozenset = frozenset()) -> None:
    """``before``: the stages that run before this one in the same job (the recipe's train stage
    writes the checkpoint: it is not there yet)."""
    x = c.export
    if not x.types:
        raise ValueError(f"export.types: at least one of {GGUF_TYPES}")
    for t in x.types:
        if t not in GGUF_TYPES:
            raise ValueError(f"export.types: {t!r} is not one of {GGUF_TYPES}")
    if not x.name or "/" in x.name:
        raise ValueError(f"export.name must be a non-empty file name prefix, got {x.name!r}")
    at_least(x, ("threads",), 0, "export")
    check_output_dir(x.output_dir, "export.output_dir")
    for key, folder in (("checkpoint", x.checkpoint), ("base", x.base)):
        if folder and within(x.output_dir, folder):  # the folder itself, or one inside it
            same = "is" if within(folder, x.output_dir) else "lies in"
            raise ValueError(
                f"export.output_dir {same} export.{key} ({folder}): the GGUF files and their README.md would "
                "change the checkpoint (its files, and so what a run of it records; its model card); give a "
                "folder of their own"
            )
    if "train" not in before and not x.base:
        check_local_checkpoint(x.checkpoint, "export.checkpoint")
