"""The export stage: ``run_export(cfg)`` writes a checkpoint as GGUF files for llama.cpp.

The checkpoint (a local folder, or a URI fetched once into the cache) is converted tensor by tensor
(:mod:`cerbero_ray.export.gguf`) into ``f32``/``f16``/``bf16``/``q8_0``; each K-quant (``q4_k_m``…)
is made from the f16 file by llama.cpp's quantizer (:mod:`cerbero_ray.export.quantize`; an f16 file
not asked for is made and removed). Files are ``<output_dir>/<name>-<TYPE>.gguf``; one newer than
every file of the checkpoint is kept on a rerun (``export.overwrite=true`` redoes it). The stage
needs no Ray cluster: under ``ray job submit`` it runs in the job's driver.

    python jobs/export.py export.types=[f16,q8_0,q4_k_m]
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time

from omegaconf import DictConfig

from cerbero_ray import storage
from cerbero_ray.config import check
from cerbero_ray.config.common import check_weights
from cerbero_ray.export import gguf as conv
from cerbero_ray.export import quantize as quant
from cerbero_ray.models import check_checkpoint

SNIPPET = '''from llama_cpp import Llama

llm = Llama(model_path="{path}", n_ctx=4086)  # llama.cpp's llama has no sliding window: stay under 4096
out = llm("""Questa è una conversazione tra un umano ed un assistente AI.
[|Umano|] Come posso distinguere un AI da un umano?
[|{tag}|]""", max_tokens=128, stop=["[|Umano|]"])
print(out["choices"][0]["text"])'''


def file_name(name: str, out_type: str) -> str:
    return f"{name}-{out_type.upper()}.gguf"


def _fresh(dest: str, folder: str) -> bool:
    """``dest`` exists and is newer than every file of the checkpoint folder."""
    fs, p = storage.resolve(dest)
    info = fs.get_file_info(p)
    if not info.is_file:
        return False
    newest = max(os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder))
    return info.mtime is not None and info.mtime.timestamp() >= newest


def _template(folder: str) -> str | None:
    from transformers import AutoTokenizer

    from cerbero_ray.chat import plain_template

    tpl = AutoTokenizer.from_pretrained(folder).chat_template
    return plain_template(tpl) if tpl else None


def run_export(cfg: DictConfig | dict) -> dict:
    """Export ``export.checkpoint``; returns {type: file info} and the chat snippet."""
    c = check("export", cfg)
    x = c["export"]
    check_checkpoint(x["checkpoint"], "export.checkpoint")
    folder = storage.local_copy(x["checkpoint"])
    check_weights(folder, "export.checkpoint")
    conv.read_arch(folder)  # architecture, tokenizer and sizes are checked before anything is written
    conv.vocabulary(folder)
    if any(t in quant.FTYPES for t in x["types"]) and not quant.available():
        raise ValueError("export.types: K-quants need llama-cpp-python (pip install 'cerbero-ray[gguf]')")
    out, results, t0 = x["output_dir"], {}, time.perf_counter()
    template = _template(folder)
    with tempfile.TemporaryDirectory(prefix="cerbero-gguf-") as tmp:
        local_out = tmp if storage.is_uri(out) else storage.resolve(out)[1]
        os.makedirs(local_out, exist_ok=True)
        order = sorted(x["types"], key=lambda t: t in quant.FTYPES)  # the f16 file first: quants start from it
        f16 = os.path.join(local_out, file_name(x["name"], "f16"))
        for t in order:
            dest = os.path.join(local_out, file_name(x["name"], t))
            final = storage.join(out, file_name(x["name"], t))
            if not x["overwrite"] and _fresh(final, folder):
                results[t] = {"path": final, "type": t, "kept": True}
                print(f"[export] {final} is newer than the checkpoint: kept (export.overwrite=true redoes it)")
                continue
            t1 = time.perf_counter()
            if t in quant.FTYPES:
                if not os.path.exists(f16):
                    storage_f16 = storage.join(out, file_name(x["name"], "f16"))
                    if "f16" in x["types"] and storage.is_uri(out):
                        _download(storage_f16, f16)
                    else:
                        conv.convert(folder, f16, "f16", x["name"], template)
                results[t] = quant.quantize(f16, dest, t, x["threads"])
            else:
                results[t] = conv.convert(folder, dest, t, x["name"], template)
            results[t]["seconds"] = round(time.perf_counter() - t1, 2)
            if storage.is_uri(out):
                _upload(dest, final)
            results[t]["path"] = final
            print(f"[export] {t}: {final} ({results[t]['bytes'] / 2**20:.1f} MiB, {results[t]['seconds']} s)")
            if results[t].get("fallback_tensors"):
                of = f" of {results[t]['tensors']}" if "tensors" in results[t] else ""
                print(
                    f"[export] {t}: {results[t]['fallback_tensors']}{of} tensors kept a simpler type (q5_0/q8_0): "
                    "their rows are not a multiple of the K-quant block (256), as in tiny test models"
                )
        if "f16" not in x["types"] and os.path.exists(f16) and not storage.is_uri(out):
            os.remove(f16)  # made only for the quantizer
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tag = "Assistente" if template and "[|Assistente|]" in template else "AI"
    first = results[x["types"][-1]]["path"]
    snippet = SNIPPET.format(path=first, tag=tag)
    print(
        f"[export] {len(results)} file(s) in {time.perf_counter() - t0:.1f} s, peak RSS {peak:.0f} MiB\n"
        f"[export] chat with it in llama-cpp-python (pip install llama-cpp-python):\n{snippet}",
        flush=True,
    )
    return {"files": results, "peak_rss_mib": round(peak), "snippet": snippet}


def _upload(local: str, uri: str) -> None:
    fs, p = storage.resolve(uri)
    with open(local, "rb") as src, fs.open_output_stream(p) as dst:
        shutil.copyfileobj(src, dst, 1 << 24)


def _download(uri: str, local: str) -> None:
    fs, p = storage.resolve(uri)
    with fs.open_input_stream(p) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
