"""Library log levels: a run's output is our progress and summaries, with warnings that matter.

Called once per process (the driver when Ray starts, and each Ray worker that trains or runs a
model): it hides what the libraries print on every run and a user can do nothing about — transformers'
per-file progress bars, Ray Data's notice that we draw our own progress bars, DeepSpeed's accelerator
auto-detection on a CPU machine, and the deprecation warnings of APIs that libraries call on our
behalf (``all_gather_into_tensor`` inside DeepSpeed). Errors and other warnings still show.
"""

from __future__ import annotations

import logging
import os
import warnings

_DONE = False


def quiet() -> None:
    global _DONE
    if _DONE:
        return
    _DONE = True
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*", category=FutureWarning)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"
    logging.getLogger("gguf").setLevel(logging.WARNING)
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no "Setting accelerator to CPU" warning
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" per file
    except ImportError:
        pass
