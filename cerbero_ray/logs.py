"""Library log levels: a run's output is our progress and summaries, with warnings that matter.

Called once per process (the driver when Ray starts, and each Ray worker that trains or runs a
model): it hides what the libraries print on every run and a user can do nothing about — transformers'
per-file progress bars, Ray Data's notice that we draw our own progress bars, DeepSpeed's accelerator
auto-detection on a CPU machine, and the deprecation warnings of APIs that libraries call on our
behalf (``all_gather_into_tensor`` inside DeepSpeed, ``is_gradient_checkpointing`` inside peft).
Errors and other warnings still show.

Two more, each where it happens: :func:`quiet_ray_data` (Ray Data's per-dataset INFO lines on the
console, which cut through our progress bars; its log file keeps them) and :func:`drop_lines` (a
library's bare ``print``, such as DeepSpeed's "op built successfully" on CPU).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings

_DONE = False


ECHO_CHARS = 64  # a value a user sent, quoted back in an error message, is cut to this


def short(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error message never echoes a huge value."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 1] + "…"


def progress(**kw):
    """A tqdm bar whose rate and ETA count from its first update: what comes before it (a model
    loading, an actor pool starting) is warm-up, and an ETA that divides the rows left by the
    first row's time would read hours for a minute's work."""
    from tqdm import tqdm

    class WarmBar(tqdm):
        _warm = False

        def update(self, n=1):
            if self._warm or not n or self.disable:
                return super().update(n)
            self._warm = True
            self.n += n
            now = self._time()
            # the rate counts from now: as if the bar started here with what is done already
            self.start_t, self.last_print_t, self.last_print_n, self.initial = now, now, self.n, self.n
            self._ema_dn, self._ema_dt = type(self._ema_dn)(self.smoothing), type(self._ema_dt)(self.smoothing)
            self.refresh()
            return True

    return WarmBar(dynamic_ncols=True, **kw)


def quiet() -> None:
    global _DONE
    if _DONE:
        return
    _DONE = True
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*", category=FutureWarning)
    # peft asks transformers for is_gradient_checkpointing, which transformers 5 deprecates
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"
    logging.getLogger("gguf").setLevel(logging.WARNING)
    # bitsandbytes >= 0.50 (peft imports it) asks the Hub for a CPU 4-bit kernel on CPUs with
    # AVX512-BF16 and warns when it may not load it: a line per process, whatever the run
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
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


def quiet_ray_data() -> None:
    """Ray Data's console shows warnings and errors only; INFO ("Starting execution of Dataset …",
    its execution plan, "execution finished in …") still goes to ``ray-data.log`` in the session's
    log folder. Used when our own progress bars and summaries stand in for Ray Data's."""
    import ray.data  # noqa: F401  (importing it configures the "ray.data" logger)

    for h in logging.getLogger("ray.data").handlers:  # the console: a stream handler, not a file one
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(max(h.level, logging.WARNING))


class _LineFilter(io.TextIOBase):
    """A text stream that passes whole lines to ``out`` except those matching ``pattern``."""

    def __init__(self, out, pattern: re.Pattern):
        self.out, self.pattern, self.buf = out, pattern, ""

    def write(self, s: str) -> int:
        self.buf += s
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            if not self.pattern.search(line):
                self.out.write(line + "\n")
        return len(s)

    def flush(self) -> None:
        if self.buf and not self.pattern.search(self.buf):
            self.out.write(self.buf)
        self.buf = ""
        self.out.flush()


@contextlib.contextmanager
def drop_lines(pattern: str):
    """Within the block, lines printed to ``sys.stdout`` that match ``pattern`` are dropped; the
    rest pass through unchanged, in order. Ray Train's workers turn ``print`` into a record on the
    root logger: those records are matched too."""
    rx = re.compile(pattern)
    old = sys.stdout
    f = _LineFilter(old, rx)
    root = logging.getLogger()

    def keep(record: logging.LogRecord) -> bool:
        return not rx.search(record.getMessage())

    sys.stdout = f
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
        f.flush()
        sys.stdout = old


def console(level: int = logging.INFO) -> None:
    """Our library logs through ``logging`` (``cerbero_ray.<module>``) and leaves the console to the
    entry point. The jobs' Hydra logging config (``hydra/job_logging: stdout``) prints its records as
    bare lines on stdout; this does the same for entry points without Hydra (``torchrun -m
    cerbero_ray.train.local``, scripts). A process that configured logging already is left alone."""
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stdout)  # a no-op when configured


OUR_ERRORS = (ValueError, FileNotFoundError, FileExistsError)  # what our checks raise: one line, exit 2


def our_error(traceback_text: str) -> str | None:
    """The message a formatted traceback (another process's, as Ray and Serve pass it on) ends
    with, when that is one of our checks: a ValueError, FileNotFoundError or FileExistsError raised
    in this package's own code (its last frame under ``cerbero_ray/``); else None."""
    kinds = {t.__name__ for t in OUR_ERRORS}
    lines = [line.rstrip() for line in traceback_text.rstrip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i].strip()
        if line.startswith('File "'):
            return None  # the last frame has no exception line after it
        kind, sep, message = line.partition(": ")
        if sep and kind in kinds:
            frame = next((x.strip() for x in reversed(lines[:i]) if x.strip().startswith('File "')), "")
            ours = f"{os.sep}cerbero_ray{os.sep}" in frame
            return " ".join([message, *(x.strip() for x in lines[i + 1 :])]).strip() if ours else None
    return None
