"""The export stage: ``run_export(cfg)`` writes a checkpoint as GGUF files for llama.cpp.

The checkpoint (a local folder, or a URI fetched once into the cache) is converted tensor by tensor
(:mod:`cerbero_ray.export.gguf`) into ``f32``/``f16``/``bf16``/``q8_0``; each K-quant (``q4_k_m``…)
is made from the f16 file by llama.cpp's quantizer (:mod:`cerbero_ray.export.quantize`; an f16 file
not asked for is made and removed). Files are ``<output_dir>/<name>-<TYPE>.gguf``; ``export.json``
beside them records what each was made from (the checkpoint, its base, and what they held:
:func:`~cerbero_ray.storage.version`), and a rerun keeps a file made from what they hold now
(``export.overwrite=true`` redoes it): never a file of another checkpoint, or of an earlier
training under the same path, whatever the files' times say. Each file is
written as ``….gguf.unverified`` and checked by llama.cpp in a child process (:mod:`.verify`: the
seed's prompt, tokens and logits against transformers) before it takes its final name; one that
fails stays ``….gguf.failed`` and is reported (``export.verify=false`` skips the check). The stage
needs no Ray cluster: under ``ray job submit`` it runs in the job's driver.

A LoRA adapter folder as the checkpoint: the adapter is merged into its base (fp32) and the merged
model is exported as above; with ``export.lora`` the adapter is also written alone as a llama.cpp
LoRA file (``<name>-LORA-F32.gguf``, :func:`~cerbero_ray.export.gguf.convert_lora`) beside the base
it applies to (``<name>-base-F16.gguf``), and llama.cpp checks the pair (base + adapter loaded at
run time) against the merged model in transformers.

    python jobs/export.py export.types=[f16,q8_0,q4_k_m]
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import shutil
import tempfile
import time

from omegaconf import DictConfig

from cerbero_ray import adapters, cards, llamacpp, storage
from cerbero_ray.chat import USER_TAG, assistant_tag_of, seed_prompt
from cerbero_ray.checkpoints import check_base, check_checkpoint, check_weights
from cerbero_ray.config import check
from cerbero_ray.config.export import ExportConfig, ExportStageConfig
from cerbero_ray.export import card, verify
from cerbero_ray.export import gguf as conv
from cerbero_ray.export import quantize as quant

log = logging.getLogger(__name__)

SNIPPET = '''from llama_cpp import Llama

{fetch}llm = Llama(model_path="{path}", n_ctx=4086)  # llama.cpp's llama has no sliding window: stay under 4096
out = llm("""{prompt}""", max_tokens=128, stop=["{stop}"])
print(out["choices"][0]["text"])'''


def file_name(name: str, out_type: str) -> str:
    return f"{name}-{out_type.upper()}.gguf"


RECORD = "export.json"  # beside the files: what each was made from


def _made_from(x: ExportConfig, base: str | None) -> dict:
    """What the files of this run are made from: the checkpoint (and an adapter's base) and what
    each holds now. A file is kept on a rerun only when its record says the same."""
    made = {"checkpoint": x.checkpoint, "version": storage.version(x.checkpoint)}
    if base is not None:
        made |= {"base": base, "base_version": storage.version(base)}
    return made


def _records(out: str) -> dict:
    """{file name: record} of ``out``'s ``export.json``; empty when there is none, or it is not
    ours (edited, cut short): then nothing is kept, and the next file written starts it again."""
    try:
        files = storage.read_json(storage.join(out, RECORD)).get("files")
    except (FileNotFoundError, ValueError, AttributeError):
        return {}
    return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


def _kept(final: str, made: dict, records: dict, checks: bool) -> str | None:
    """Why ``final`` is kept (None: it is made again, and why is logged): it is there, at the size
    its record gives, made from what the checkpoint holds now, and checked by llama.cpp if this run
    would check it."""
    rec = records.get(final.rsplit("/", 1)[-1])
    fs, p = storage.resolve(final)
    info = fs.get_file_info(p)
    if not info.is_file:
        return None
    why = None
    if rec is None or rec.get("made_from") != made:
        why = f"is there but was made from {_describe(rec)}: written again"
    elif rec.get("bytes") != info.size:
        why = f"is not the size its {RECORD} gives: written again"
    elif checks and rec.get("status") != "checked":
        why = "was not checked by llama.cpp when it was made: made and checked again"
    if why is not None:
        log.info(f"[export] {final} {why}")
        return None
    return f"[export] {final} was made from this checkpoint as it is now: kept (export.overwrite=true redoes it)"


def _describe(rec: dict | None) -> str:
    if rec is None:
        return f"what no {RECORD} records"
    m = rec.get("made_from") or {}
    return f"{m.get('checkpoint')} as it was then" + (f" (on {m['base']})" if m.get("base") else "")


def _record(out: str, final: str, info: dict | None, made: dict, tag: str = "") -> None:
    """The published ``final`` into the folder's record (``info`` None: its entry out, before the
    file is replaced). The record is read again each time: another type may be in it by now."""
    records, name = _records(out), final.rsplit("/", 1)[-1]
    if info is None:
        if records.pop(name, None) is not None:
            storage.write_json(storage.join(out, RECORD), {"files": records})
        return
    records[name] = {
        "made_from": made,
        "type": info["type"],
        "status": info["status"],
        "bytes": info.get("bytes"),
        "tag": tag,  # the chat template's assistant tag: the snippet of a rerun that keeps every file
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    c = info.get("check") or {}
    if c.get("ok"):  # what llama.cpp's check found: the folder's card gives it
        records[name]["check"] = {
            "tokens": c["tokens"],
            "greedy_same": c["greedy"] == c["greedy_transformers"],
            "max_logit_diff": c["max_logit_diff"],
            "max_logit_diff_rel": c["max_logit_diff_rel"],
        }
    storage.write_json(storage.join(out, RECORD), {"files": records})


def _template(folder: str) -> str | None:
    from transformers import AutoTokenizer

    from cerbero_ray.chat import plain_template

    tpl = AutoTokenizer.from_pretrained(folder).chat_template
    return plain_template(tpl) if tpl else None


def run_export(cfg: DictConfig | dict | ExportStageConfig) -> dict:
    """Export ``export.checkpoint``; returns {type: file info}, the types that failed llama.cpp's
    check (``failed``: written nowhere under their final name) and the chat snippet."""
    c = check("export", cfg)
    x = c.export
    check_checkpoint(x.checkpoint, "export.checkpoint", x.base)
    source = cards.card_metadata(x.checkpoint)  # its license and its data's record: the files' too
    adapter = adapters.is_adapter(x.checkpoint)
    base = adapters.base_of(x.checkpoint, x.base, "export.checkpoint") if adapter else None
    made = _made_from(x, base)  # before the copy: files changed meanwhile are made again next time
    # an adapter llama.cpp's LoRA files cannot hold has no pair: only the merged files, which a rerun keeps
    no_pair = adapters.unsupported(adapters.adapter_config(x.checkpoint)) if adapter and x.lora else None
    if no_pair:
        log.warning(
            f"[export] no LoRA file: llama.cpp's LoRA files cannot hold {no_pair}; the merged files are written"
        )
    pair = adapter and x.lora and not no_pair
    kept, tag = ({}, None) if x.overwrite else _keepable(x, made, pair)
    if kept and all(kept.values()) and tag is not None:  # nothing to download, merge or load
        for said in kept.values():
            log.warning(said)
        results = {k: {"path": _final(x, k), "type": k, "status": "kept"} for k in kept}
        return _finish(x, results, tag, pair, time.perf_counter(), source)
    with tempfile.TemporaryDirectory(prefix="cerbero-merged-") as merged:
        if not adapter:
            folder = storage.local_copy(x.checkpoint)
            check_weights(folder, "export.checkpoint")
            return _export(x, folder, made, kept, source)
        src = storage.local_copy(x.checkpoint)
        base_folder = storage.local_copy(base)
        check_weights(base_folder, "export.base")
        check_base(x.checkpoint, base, base_folder, "export.checkpoint")
        _merge(x.checkpoint, base, src, base_folder, merged)
        return _export(x, merged, made, kept, source, (src, base_folder) if pair else None)


LORA_FILES = {"base-f16": ("-base", "f16"), "lora": ("", "lora-f32")}  # an adapter's pair: (name suffix, type)


def _final(x: ExportConfig, kind: str) -> str:
    """Where the file of ``kind`` (one of ``export.types``, or of an adapter's pair) goes."""
    suffix, t = LORA_FILES.get(kind, ("", kind))
    return storage.join(x.output_dir, file_name(f"{x.name}{suffix}", t))


def _keepable(x: ExportConfig, made: dict, pair: bool) -> tuple[dict, str | None]:
    """Per file this run writes (each of ``export.types``; an adapter's pair too with ``pair``):
    why it is kept (:func:`_kept`), or None; decided once, before anything is downloaded. And the
    chat tag the records keep (a rerun that keeps every file writes its snippet with it)."""
    kinds = [*x.types, *(LORA_FILES if pair else ())]
    records, checks = _records(x.output_dir), x.verify and llamacpp.available()
    kept = {k: _kept(_final(x, k), made, records, checks) for k in kinds}
    return kept, records.get(file_name(x.name, x.types[-1]), {}).get("tag")


def _merge(adapter: str, base: str, src: str, base_folder: str, dest: str) -> None:
    """The adapter merged into its base (fp32) as an HF folder in ``dest``, with the adapter's
    tokenizer (else the base's)."""
    from cerbero_ray.models import load_adapted

    model = load_adapted(adapter, "float32", base)
    model.save_pretrained(dest, safe_serialization=True)
    tok_src = src if os.path.exists(os.path.join(src, "tokenizer_config.json")) else base_folder
    for f in os.listdir(tok_src):
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(tok_src, f), os.path.join(dest, f))
    log.info(f"[export] {adapter}: merged into {base} for the GGUF files")


def _export(
    x: ExportConfig, folder: str, made: dict, kept: dict, source: dict, lora: tuple[str, str] | None = None
) -> dict:
    """Export the local HF folder ``folder`` (``made``: what it was made from, :func:`_made_from`;
    ``kept``: the files kept, :func:`_keepable`); ``lora``: (adapter folder, base folder) to write
    as a LoRA file and its base too."""
    conv.read_arch(folder)  # architecture, tokenizer and sizes are checked before anything is written
    conv.vocabulary(folder)
    if any(t in quant.FTYPES for t in x.types) and not quant.available():
        raise ValueError("export.types: K-quants need llama-cpp-python (pip install 'cerbero-ray[gguf]')")
    out, results, t0 = x.output_dir, {}, time.perf_counter()
    template = _template(folder)
    tag = assistant_tag_of(template)
    data = cards.data_of(source)  # what its training data was checked against: in each file's metadata
    ref = functools.cache(lambda: _reference(folder, tag, x.verify))  # transformers' run: only if a file is made
    with tempfile.TemporaryDirectory(prefix="cerbero-gguf-") as tmp:
        local_out = tmp if storage.is_uri(out) else storage.resolve(out)[1]
        os.makedirs(local_out, exist_ok=True)
        order = sorted(x.types, key=lambda t: t in quant.FTYPES)  # the f16 file first: quants start from it
        f16 = os.path.join(local_out, file_name(x.name, "f16"))
        for t in order:
            final = _final(x, t)
            if kept.get(t):
                results[t] = {"path": final, "type": t, "status": "kept"}
                log.warning(kept[t])
                continue
            if t in quant.FTYPES and results.get("f16", {}).get("status") == "kept" and storage.is_uri(out):
                if not os.path.exists(f16):  # the quantizer starts from the f16 file kept in the bucket
                    _download(storage.join(out, file_name(x.name, "f16")), f16)
            dest = os.path.join(local_out, file_name(x.name, t))
            results[t] = _make(t, folder, dest, f16, x, template, ref(), data)
            _publish(results[t], out, final, made, tag)
        if os.path.exists(f16 + UNVERIFIED):  # an f16 file made only for the quantizer
            os.remove(f16 + UNVERIFIED)
        if lora is not None:
            results.update(_lora_files(x, lora, local_out, made, kept, template, tag, ref, data))
    return _finish(x, results, tag, lora is not None, t0, source)


def _finish(x: ExportConfig, results: dict, tag: str, pair: bool, t0: float, source: dict) -> dict:
    """The stage's result and its last lines: the count, the chat snippet, an adapter's pair; the
    folder's card (:mod:`cerbero_ray.export.card`)."""
    failed = [t for t, r in results.items() if r["status"] == "failed"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    good = [t for t in x.types if results[t]["status"] != "failed"]
    snippet = _snippet(results[good[-1]]["path"], tag) if good else ""
    log.info(
        f"[export] {len(results) - len(failed)} file(s) in {time.perf_counter() - t0:.1f} s, peak RSS {peak:.0f} MiB"
        + (f"; {len(failed)} failed llama.cpp's check: {', '.join(failed)}" if failed else ""),
    )
    if snippet:
        log.info(f"[export] chat with it in llama-cpp-python (pip install llama-cpp-python):\n{snippet}")
    where = storage.join(x.output_dir, card.CARD) if good else None
    if where:  # the folder's card, from the record of every file in it (kept ones too)
        there = {f: r for f, r in _records(x.output_dir).items() if storage.is_file(storage.join(x.output_dir, f))}
        name = results[good[-1]]["path"].rsplit("/", 1)[-1]
        code = SNIPPET.format(fetch="", path=name, prompt=seed_prompt(tag), stop=USER_TAG)
        text = card.gguf_card(x.name, x.checkpoint, there, code, seed_prompt(tag), source)
        storage.write_bytes(where, text.encode())
    if pair and all(k in results and results[k]["status"] != "failed" for k in ("lora", "base-f16")):
        log.info(
            "[export] or the base with the adapter applied at load time: "
            f'Llama(model_path="{_at_hand(results["base-f16"]["path"])}", '
            f'lora_path="{_at_hand(results["lora"]["path"])}", n_ctx=4086)',
        )
    return {"files": results, "failed": failed, "peak_rss_mib": round(peak), "snippet": snippet, "card": where}


def _at_hand(path: str) -> str:
    """The path llama.cpp opens: a local file as it is, a bucket's object by its name once copied."""
    return storage.local_path(path) if storage.is_local(path) else path.rsplit("/", 1)[-1]


def _snippet(path: str, tag: str) -> str:
    """The seed's prompt in llama-cpp-python, which opens local files only: a file in a bucket is
    named by the copy the first line makes."""
    if storage.is_local(path):
        fetch = ""
    else:
        cp = {"s3": "aws s3 cp", "gs": "gcloud storage cp"}.get(path.split("://", 1)[0], "copy")
        fetch = f"# llama.cpp opens local files only: copy it here first ({cp} {path} .)\n"
    return SNIPPET.format(fetch=fetch, path=_at_hand(path), prompt=seed_prompt(tag), stop=USER_TAG)


UNVERIFIED = ".unverified"  # a file written but not yet checked by llama.cpp: never under its final name


def _reference(folder: str, tag: str, wanted: bool) -> dict | None:
    if not wanted:
        return None
    if not llamacpp.available():
        log.warning("[export] llama.cpp check skipped: llama-cpp-python is not installed (pip install -e '.[gguf]')")
        return None
    return verify.reference(folder, tag)


def _lora_files(
    x: ExportConfig, lora: tuple, local_out: str, made: dict, kept: dict, template, tag: str, ref, data: dict | None
) -> dict:
    """The adapter as ``<name>-LORA-F32.gguf`` and its base as ``<name>-base-F16.gguf``, checked
    together by llama.cpp (the adapter applied at load time) against the merged model."""
    adapter, base_folder = lora
    finals = {k: _final(x, k) for k in LORA_FILES}
    if all(kept.get(k) for k in LORA_FILES):  # the pair is checked together: both kept, or both made again
        for k in LORA_FILES:
            log.warning(kept[k])
        return {k: {"path": f, "type": k, "status": "kept"} for k, f in finals.items()}
    names = {k: f.rsplit("/", 1)[-1] for k, f in finals.items()}
    t1 = time.perf_counter()
    staged = {k: os.path.join(local_out, n) + UNVERIFIED for k, n in names.items()}
    infos = {
        "base-f16": {**conv.convert(base_folder, staged["base-f16"], "f16", f"{x.name}-base", template)},
        "lora": {**conv.convert_lora(adapter, base_folder, staged["lora"], x.name, data)},
    }
    status, check, ref = "unchecked", None, ref()
    if ref is not None:
        check = verify.verify(staged["base-f16"], "f16", ref, x.threads, lora=staged["lora"])
        status = "checked" if check["ok"] else "failed"
        said = f"[export] base-f16 + lora: {verify.describe(check, ref['decode'])}"
        log.log(logging.INFO if check["ok"] else logging.WARNING, said)
    for k, info in infos.items():
        info.update(type=k, status=status, seconds=round(time.perf_counter() - t1, 2), staged=staged[k])
        if check is not None:
            info["check"] = check
        _publish(info, x.output_dir, finals[k], made, tag)
    return infos


def _make(
    t: str, folder: str, dest: str, f16: str, x: ExportConfig, template: str | None, ref: dict | None, data: dict | None
) -> dict:
    """Write type ``t`` as ``dest + UNVERIFIED``, check it with llama.cpp (when ``ref``); returns its
    info with ``status`` (``checked``, ``unchecked`` or ``failed``) and ``check``."""
    t1, staged = time.perf_counter(), dest + UNVERIFIED
    try:
        if t in quant.FTYPES:
            # the f16 file of this run (made or kept), else one made only for the quantizer
            src = f16 if "f16" in x.types and os.path.exists(f16) else f16 + UNVERIFIED
            if not os.path.exists(src):
                conv.convert(folder, src, "f16", x.name, template, data)
            info = quant.quantize(src, staged, t, x.threads)
        else:
            info = conv.convert(folder, staged, t, x.name, template, data)
    except llamacpp.NativeCrash as e:  # the quantizer died: this type fails, the others go on
        log.warning(f"[export] {t}: FAILED: {e}")
        return {"type": t, "status": "failed", "check": {"ok": False, "signal": e.signal, "error": str(e)}}
    info = {**info, "seconds": round(time.perf_counter() - t1, 2), "status": "unchecked"}
    if ref is not None:
        info["check"] = verify.verify(staged, t, ref, x.threads)
        info["status"] = "checked" if info["check"]["ok"] else "failed"
        (log.info if info["check"]["ok"] else log.warning)(
            f"[export] {t}: {verify.describe(info['check'], ref['decode'])}"
        )
    if info.get("fallback_tensors"):
        of = f" of {info['tensors']}" if "tensors" in info else ""
        log.info(
            f"[export] {t}: {info['fallback_tensors']}{of} tensors kept a simpler type (q5_0/q8_0): "
            "their rows are not a multiple of the K-quant block (256), as in tiny test models"
        )
    info["staged"] = staged
    return info


def _publish(info: dict, out: str, final: str, made: dict, tag: str) -> None:
    """A checked (or unchecked) file goes under its final name in ``out``, and into the folder's
    record of what each file was made from (``made``): the file's old entry goes first, so a file
    half replaced is never taken for its old self. A failed one stays ``….failed``."""
    staged, uri = info.pop("staged", None), storage.is_uri(out)
    if info["status"] == "failed":
        if staged and os.path.exists(staged) and not uri:
            os.replace(staged, storage.resolve(final)[1] + ".failed")
            info["path"] = final + ".failed"
        log.warning(f"[export] {info['type']}: not written as {final} (it failed llama.cpp's check)")
        return
    dest = staged[: -len(UNVERIFIED)]
    _record(out, final, None, made)
    if uri:
        storage.upload_file(staged, final)
        os.replace(staged, dest)  # kept locally for the quantizer (f16) until the temporary folder goes
    else:
        os.replace(staged, dest)
    info["path"] = final
    _record(out, final, info, made, tag)
    log.info(f"[export] {info['type']}: {final} ({info['bytes'] / 2**20:.1f} MiB, {info['seconds']} s)")


def _download(uri: str, local: str) -> None:
    fs, p = storage.resolve(uri)
    with fs.open_input_stream(p, compression=None) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
