"""K-quants (``Q4_K_M``, the seed's ``Q4_K`` file, and friends) by llama.cpp's own quantizer
(``llama_model_quantize``, through llama-cpp-python), from an f16/f32 GGUF this package wrote. The
quantizer runs in a child process (:mod:`cerbero_ray.llamacpp`): a native crash is an error naming
the signal, not the end of the job. llama-cpp-python compiles llama.cpp from source when it is
installed (no prebuilt wheel): it is the ``[gguf]`` extra."""

from __future__ import annotations

import os

from cerbero_ray import llamacpp

FTYPES = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}

available = llamacpp.available


def quantize(src: str, dest: str, out_type: str, threads: int = 0) -> dict:
    """llama.cpp's quantizer: ``src`` (a local f16/f32 GGUF) → ``dest`` (``out_type``), written under
    a temporary name and renamed at the end."""
    if out_type not in FTYPES:
        raise ValueError(f"export.types: {out_type!r} is not a llama.cpp K-quant here ({sorted(FTYPES)})")
    if not available():
        raise ValueError(
            f"export.types: {out_type} needs llama-cpp-python (pip install 'cerbero-ray[gguf]'; it compiles llama.cpp)"
        )
    tmp = f"{dest}.{os.getpid()}.tmp"
    try:
        info = llamacpp.call("quantize", src=src, dest=tmp, ftype=FTYPES[out_type], threads=threads)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"path": dest, "type": out_type, "bytes": os.path.getsize(dest), "from": os.path.basename(src), **info}
