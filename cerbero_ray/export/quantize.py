"""K-quants (``Q4_K_M``, the seed's ``Q4_K`` file, and friends) by llama.cpp's own quantizer, as
``llama-cpp-python`` exposes it (``llama_model_quantize``), from an f16/f32 GGUF this package wrote.
llama-cpp-python compiles llama.cpp from source when it is installed (no prebuilt wheel): it is the
``[gguf]`` extra, imported only here."""

from __future__ import annotations

import os
import re
import sys

FTYPES = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}


_KEEP = []  # the log callback handed to C must outlive the call
_FALLBACK = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")
_FALLBACK_TENSOR = re.compile(r"not divisible by \d+ \(required for type")


def _quiet(llama_cpp, notes: list) -> list:
    """llama.cpp's log: warnings and errors to stderr, not its per-tensor progress. Its per-tensor
    fallback warnings (a row length that is not a multiple of the K-quant block, so the tensor gets a
    simpler type) and their total go to ``notes``: the caller reports them in one line."""
    import ctypes

    pending = [""]  # llama.cpp writes a line in pieces (GGML_LOG_LEVEL_CONT continues the last one)

    @llama_cpp.llama_log_callback
    def log(level, text, _user):
        if level not in (3, 4, 5) or (level == 5 and not pending[0]):  # WARN, ERROR, CONT of a kept line
            return
        pending[0] += text.decode("utf-8", errors="replace")
        *lines, pending[0] = pending[0].split("\n")
        for line in lines:
            if _FALLBACK_TENSOR.search(line) or _FALLBACK.search(line):
                notes.append(line)
            else:
                sys.stderr.write(line + "\n")

    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    _KEEP[:] = [log]  # after the swap: the callback C held until now may go
    return pending


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def quantize(src: str, dest: str, out_type: str, threads: int = 0) -> dict:
    """llama.cpp's quantizer: ``src`` (a local f16/f32 GGUF) → ``dest`` (``out_type``), written under
    a temporary name and renamed at the end."""
    if out_type not in FTYPES:
        raise ValueError(f"export.types: {out_type!r} is not a llama.cpp K-quant here ({sorted(FTYPES)})")
    try:
        import llama_cpp
    except ImportError:
        raise ValueError(
            f"export.types: {out_type} needs llama-cpp-python (pip install 'cerbero-ray[gguf]'; it compiles llama.cpp)"
        ) from None
    notes: list[str] = []
    pending = _quiet(llama_cpp, notes)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[out_type])
    params.nthread = threads
    tmp = f"{dest}.{os.getpid()}.tmp"
    try:
        rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src} -> {out_type}) failed with status {rc}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if pending[0]:  # a last warning without its newline
            sys.stderr.write(pending[0] + "\n")
            pending[0] = ""
    info = {"path": dest, "type": out_type, "bytes": os.path.getsize(dest), "from": os.path.basename(src)}
    total = [m for m in map(_FALLBACK.search, notes) if m]
    if total:  # e.g. a tiny test model, whose 64-wide rows are no multiple of the 256-wide K-quant block
        info["fallback_tensors"], info["tensors"] = int(total[-1].group(1)), int(total[-1].group(2))
    elif any(_FALLBACK_TENSOR.search(n) for n in notes):
        info["fallback_tensors"] = sum(1 for n in notes if _FALLBACK_TENSOR.search(n))
    return info
