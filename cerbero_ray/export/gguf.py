"""HF checkpoint folder → GGUF for llama.cpp, with the ``gguf`` package (maintained with llama.cpp).
No Ray, no torch graph: the weights are read from safetensors one tensor at a time.

Mistral and Llama checkpoints become llama.cpp's ``llama`` architecture:

- tensor names: ``model.embed_tokens`` → ``token_embd``, ``model.layers.N.self_attn.q_proj`` →
  ``blk.N.attn_q`` … ``lm_head`` → ``output``;
- the query and key projections are permuted back from the rotate-half layout transformers uses
  to the interleaved pairs llama.cpp's RoPE expects (per head; the key over the KV heads: GQA);
- metadata: context length, embedding and feed-forward sizes, blocks, head counts, RMS-norm eps,
  RoPE base; llama.cpp's ``llama`` does not apply Mistral's sliding window (the seed ran ``n_ctx=4086``);
- tokenizer: tokens, scores and types from ``tokenizer.model`` (sentencepiece) when the folder has
  it, else from ``tokenizer.json`` (the gguf package's readers), BOS/EOS/UNK ids and add-BOS from the
  tokenizer config, and the cerbero chat template (without transformers' generation markers).

Types: ``f32``, ``f16``, ``bf16``, ``q8_0`` are written here (1-D tensors stay f32; ``q8_0`` and
``bf16`` blocks by ``gguf.quants``); K-quants such as ``Q4_K_M`` come from llama.cpp's own quantizer
(:mod:`cerbero_ray.export.quantize`). Every check runs before a byte is written, and the file is
written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cerbero_ray.cards import GGUF_KEY

SUPPORTED = ("mistral", "llama")
WRITTEN = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}  # type -> GGMLQuantizationType
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
_NUMPY = {"F32": np.float32, "F16": np.float16}  # written as is; the rest as quantized bytes
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


@dataclass(frozen=True)
class Arch:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    head_dim: int
    context: int
    rms_eps: float
    rope_theta: float
    tied: bool


def read_arch(folder: str) -> Arch:
    """The architecture from ``config.json``; ``ValueError`` for one llama.cpp's ``llama`` cannot run."""
    cfg = json.loads(Path(folder, "config.json").read_text())
    kind = cfg.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(f"export.checkpoint: model_type {kind!r} is not supported (GGUF export handles {SUPPORTED})")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim * heads != cfg["hidden_size"]:
        raise ValueError("export.checkpoint: head_dim × heads != hidden_size is not supported by llama.cpp's llama")
    if cfg.get("rope_scaling"):
        raise ValueError(f"export.checkpoint: rope_scaling {cfg['rope_scaling']} is not supported")
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    return Arch(
        vocab=cfg["vocab_size"],
        hidden=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        ffn=cfg["intermediate_size"],
        head_dim=head_dim,
        context=cfg.get("max_position_embeddings", 4096),
        rms_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope),
        tied=bool(cfg.get("tie_word_embeddings", False)),
    )


def gguf_name(hf: str) -> str | None:
    if hf in _TOP:
        return _TOP[hf]
    parts = hf.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        sub = ".".join(parts[3:-1])
        if sub in _LAYER:
            return f"blk.{parts[2]}.{_LAYER[sub]}.weight"
    if "rotary_emb" in hf:
        return None  # buffers some exports carry; llama.cpp computes RoPE itself
    raise ValueError(f"export.checkpoint: unexpected tensor {hf!r} for a llama-architecture model")


@contextlib.contextmanager
def _writing(dest: str):
    """A GGUF writer on a temporary file renamed to ``dest`` once whole, removed on any error."""
    import gguf

    tmp = f"{dest}.{os.getpid()}.tmp"
    w = gguf.GGUFWriter(tmp, "llama")
    try:
        yield w
        w.close()
        os.replace(tmp, dest)
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _rows_for_llama_cpp(x: np.ndarray, gguf_tensor: str, arch: Arch) -> np.ndarray:
    """The query and key projections' rows (or a LoRA B's, which are theirs) in llama.cpp's order."""
    if gguf_tensor.endswith("attn_q.weight"):
        return permute_qk(x, arch.heads)
    if gguf_tensor.endswith("attn_k.weight"):
        return permute_qk(x, arch.kv_heads)
    return x


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Rotate-half (transformers) → interleaved (llama.cpp) row order, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def vocabulary(folder: str):
    """(tokens, scores, types, source) from ``tokenizer.model``, else ``tokenizer.json``."""
    from gguf.vocab import LlamaHfVocab, SentencePieceVocab

    base = Path(folder)
    if (base / "tokenizer.model").is_file():
        vocab, source = SentencePieceVocab(base), "tokenizer.model"
    elif (base / "tokenizer.json").is_file():
        try:
            vocab, source = LlamaHfVocab(base), "tokenizer.json"
        except (FileNotFoundError, TypeError) as e:
            raise ValueError(
                f"export.checkpoint: tokenizer.json is not a Llama/Mistral sentencepiece-BPE ({e})"
            ) from None
    else:
        raise ValueError(f"export.checkpoint: no tokenizer in {folder} (neither tokenizer.model nor tokenizer.json)")
    tokens, scores, types = [], [], []
    for text, score, typ in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(typ)
    return tokens, scores, types, source


def _tensor_plan(folder: str, arch: Arch, out_type: str) -> list[tuple[str, str, str, tuple, object]]:
    """(file, HF name, GGUF name, GGUF shape, GGML type) per tensor, in file order, nothing loaded."""
    from gguf import GGMLQuantizationType as Q
    from safetensors import safe_open

    files = sorted(str(p) for p in Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"export.checkpoint: no *.safetensors weights in {folder}")
    plan, seen = [], set()
    for f in files:
        with safe_open(f, framework="numpy") as st:
            for name in st.keys():
                g = gguf_name(name)
                if g is None:
                    continue
                shape = tuple(st.get_slice(name).get_shape())
                q = Q.F32 if len(shape) == 1 else getattr(Q, WRITTEN[out_type])
                if q == Q.Q8_0 and shape[-1] % 32:
                    q = Q.F16  # Q8_0 blocks are 32 wide
                plan.append((f, name, g, shape, q))
                seen.add(g)
    if "output.weight" not in seen and arch.tied:
        f, name, _, shape, q = next(p for p in plan if p[2] == "token_embd.weight")
        plan.append((f, name, "output.weight", shape, q))
    need = {"token_embd.weight", "output_norm.weight", "output.weight"}
    need |= {f"blk.{i}.{v}.weight" for i in range(arch.layers) for v in _LAYER.values()}
    if need - seen - ({"output.weight"} if arch.tied else set()):
        raise ValueError(f"export.checkpoint: missing tensors {sorted(need - seen)[:5]}…")
    return plan


def _load(f: str, name: str):
    """One tensor as float32 numpy (bf16 through torch, which numpy lacks)."""
    from safetensors import safe_open

    with safe_open(f, framework="pt") as st:
        return st.get_tensor(name).float().numpy()


def convert(
    folder: str,
    dest: str,
    out_type: str = "f16",
    name: str = "cerbero",
    chat_template: str | None = None,
    data: dict | None = None,
) -> dict:
    """Write ``folder`` (a local HF folder) as GGUF ``out_type`` to the local path ``dest``;
    returns what was written (tensors, vocabulary source, bytes). ``data``: what the model's
    training data was checked against (:func:`cerbero_ray.cards.data_of`), kept in the file's
    metadata under :data:`cerbero_ray.cards.GGUF_KEY` (llama.cpp's quantizer copies it on)."""
    import logging

    import gguf

    logging.getLogger("gguf").setLevel(logging.ERROR)  # its INFO lines, and a warning about the BOS pair template
    if out_type not in WRITTEN:
        raise ValueError(f"export.types: {out_type!r} is not written by the converter ({sorted(WRITTEN)})")
    arch = read_arch(folder)
    tokens, scores, types, source = vocabulary(folder)
    plan = _tensor_plan(folder, arch, out_type)
    embed_rows = next(p[3][0] for p in plan if p[2] == "token_embd.weight")
    if not (len(tokens) == arch.vocab == embed_rows):
        raise ValueError(
            f"export.checkpoint: the tokenizer has {len(tokens)} tokens, config.json says vocab_size "
            f"{arch.vocab} and the embedding has {embed_rows} rows: they must agree"
        )
    with _writing(dest) as w:
        _metadata(w, arch, name, out_type, folder, tokens, scores, types, chat_template, data)
        for _, _, g, shape, q in plan:
            raw = gguf.quant_shape_to_byte_shape(shape, q)  # a quantized tensor is declared in bytes
            dtype = _NUMPY.get(q.name, np.uint8)
            w.add_tensor_info(g, shape if q.name in _NUMPY else raw, np.dtype(dtype), int(np.prod(raw)), raw_dtype=q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for f, hf, g, _, q in plan:  # one tensor in memory at a time
            x = _rows_for_llama_cpp(_load(f, hf), g, arch)
            x = x.astype(_NUMPY[q.name]) if q.name in _NUMPY else gguf.quants.quantize(x, q)
            w.write_tensor_data(np.ascontiguousarray(x))
            del x
    return {"path": dest, "type": out_type, "tensors": len(plan), "vocabulary": source, "bytes": os.path.getsize(dest)}


def _data(w, data: dict | None) -> None:
    """The training data's record as one JSON string (none: nothing written)."""
    if data is not None:
        w.add_string(GGUF_KEY, json.dumps(data, sort_keys=True, ensure_ascii=False))


def _metadata(
    w, arch: Arch, name: str, out_type: str, folder: str, tokens, scores, types, chat_template, data=None
) -> None:
    import gguf

    w.add_name(name)
    _data(w, data)  # early: a reader finds it without reading past the vocabulary
    w.add_vocab_size(arch.vocab)
    w.add_context_length(arch.context)
    w.add_embedding_length(arch.hidden)
    w.add_block_count(arch.layers)
    w.add_feed_forward_length(arch.ffn)
    w.add_rope_dimension_count(arch.head_dim)
    w.add_head_count(arch.heads)
    w.add_head_count_kv(arch.kv_heads)
    w.add_layer_norm_rms_eps(arch.rms_eps)
    w.add_rope_freq_base(arch.rope_theta)
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[out_type]))
    if out_type in ("q8_0", "bf16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(tokens))
    special.chat_template = chat_template  # ours, without the generation markers (None: none)
    special.add_to_gguf(w, quiet=True)


def convert_lora(adapter: str, base: str, dest: str, name: str = "cerbero", data: dict | None = None) -> dict:
    """Write a peft LoRA adapter (local folder ``adapter``, trained on the local HF folder ``base``)
    as a llama.cpp LoRA GGUF at ``dest``: per adapted weight ``blk.N.<tensor>.weight.lora_a`` (the
    ``r × in`` A) and ``.lora_b`` (the ``out × r`` B, its rows permuted as the weight's are for the
    query and key projections), float32, with ``adapter.lora.alpha`` such that llama.cpp's
    ``alpha / r`` is peft's scale. llama.cpp applies it to the base's GGUF at load time."""
    import logging

    import gguf

    from cerbero_ray import adapters

    logging.getLogger("gguf").setLevel(logging.ERROR)
    cfg, pairs = adapters.read_lora(adapter)
    why = adapters.unsupported(cfg)
    if why:
        raise ValueError(f"export.checkpoint: llama.cpp's LoRA files cannot hold {why}")
    arch = read_arch(base)
    r = cfg["r"]
    alpha = adapters.lora_scale(cfg) * r  # llama.cpp scales by alpha / r
    with _writing(dest) as w:
        w.add_name(name)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        _data(w, data)  # the adapter is what was trained (its base file gets none)
        for module in sorted(pairs, key=_module_order):
            a, b = (t.numpy().astype(np.float32) for t in pairs[module])
            g = gguf_name(module + ".weight")
            w.add_tensor(g + ".lora_a", np.ascontiguousarray(a))  # B's rows are the weight's rows
            w.add_tensor(g + ".lora_b", np.ascontiguousarray(_rows_for_llama_cpp(b, g, arch)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    return {
        "path": dest,
        "type": "lora",
        "tensors": 2 * len(pairs),
        "rank": r,
        "alpha": alpha,
        "bytes": os.path.getsize(dest),
    }


def _module_order(module: str) -> tuple:
    parts = module.split(".")
    return (int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else -1, module)
