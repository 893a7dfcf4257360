"""K-quants (``Q4_K_M``, the seed's ``Q4_K`` file, and friends) by llama.cpp's own quantizer, as
``llama-cpp-python`` exposes it (``llama_model_quantize``), from an f16/f32 GGUF this package wrote.
llama-cpp-python compiles llama.cpp from source when it is installed (no prebuilt wheel): it is the
``[gguf]`` extra, imported only here."""

from __future__ import annotations

import os

FTYPES = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}


_KEEP = []  # the log callback handed to C must outlive the call


def _quiet(llama_cpp) -> None:
    """llama.cpp's log: warnings and errors to stderr, not its per-tensor progress."""
    import ctypes
    import sys

    @llama_cpp.llama_log_callback
    def log(level, text, _user):
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, _ERROR
            sys.stderr.write(text.decode("utf-8", errors="replace"))

    _KEEP.append(log)
    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))


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
    _quiet(llama_cpp)
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
    return {"path": dest, "type": out_type, "bytes": os.path.getsize(dest), "from": os.path.basename(src)}
