"""The inference core every stage that runs a model shares (label, generate, serve, evaluate):
sampling settings, the continuous-batching generator and its slot cache, the ``generate``-based
engine, the label scorer and label tasks, and batch functions over rows and Ray Datasets.

Importing this package imports nothing heavy; each name loads its module on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Sampling": "sampling",
    "cut_at_stop": "sampling",
    "ContinuousBatcher": "continuous",
    "SlotModel": "slots",
    "Generator": "generator",
    "Scorer": "scorer",
    "LabelTask": "label_prompts",
    "get_task": "label_prompts",
    "resolve_task": "label_prompts",
    "label_dataset": "batch",
    "generate_dataset": "batch",
    "label_columns": "batch",
    "generate_columns": "batch",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
