"""One-GPU benchmark of the server's generation engines, with transformers' own paths in the same
process: a full Mistral-7B-shaped random model in bf16, 256-token prompts, 64 new tokens each,
greedy, no stop string; batch 32 and 128, and a mixed-length case. No Ray.

    python ../shared/bench/gpu_generate_check.py --out $OUT; python bench/bench_serve_gpu.py --out $OUT
    python bench/bench_serve_gpu.py --cpu-smoke          # tiny sizes on CPU: checks the script runs

Per batch size (``--batches``), new tokens/s (median of ``--reps`` after a warm-up that also
captures graphs or compiles) of:

  hf                transformers ``generate`` with its default dynamic cache (what users compare with)
  hf_static_compile transformers ``generate`` with a static cache (its compiled decoding), batch 32
                    only (a compile per shape); CUDA only
  continuous        serve.engine=continuous, eager decoding (``cuda_graphs=false``)
  continuous_graphs serve.engine=continuous, the GPU default: CUDA-graph-captured decoding

and, for the continuous engine, **ms per decode step**: (time for ``--new`` tokens − time for one)
/ (``--new`` − 1), so prefill is left out, beside the **floor** one step cannot beat: the bytes it must
read (every weight once, plus the KV cache of the batch at its mean length) over the copy bandwidth
measured here (a device-to-device copy, bytes read + written). The **mixed** case puts one
``--long``-token prompt among ``batch − 1`` short ones: its ms per step against the all-short case's
(the goal: within 1.3x, i.e. one long request does not make every step read the whole cache),
once with the default decode attention and once per ``--attentions`` choice (``flex``:
flex_attention over each row's own blocks), each against its own all-short case. The
**low-occupancy** case puts ``--few`` ``--long``-token requests in the first batch size's engine:
its ms per step with the default batch buckets (a step replays the smallest captured graph that
holds its slots) against one graph of every slot (``graph_batch_sizes=()``, the engine before
buckets), with each engine's start-up time (``warm_s``: capture and compilation). The JSON is
written after each case, so a step cut by its timeout keeps what it measured.
Ratios to ../shared's ``gpu_generate_check.json`` (same call, same --out) when it is there.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # git-ignored


def run_batcher(cb, ids, s) -> list[dict]:
    done = [queue.Queue() for _ in ids]
    for x, q in zip(ids, done):
        cb.submit(x, s, lambda item, q=q: q.put(item) if isinstance(item, dict) else None)
    return [q.get() for q in done]


def timed(fn, reps, cuda):
    import torch

    fn()  # warm-up (and graph capture, compilation)
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def copy_bandwidth(cuda: bool, mib: int = 1024) -> float:
    """Bytes read + written per second by a device copy of ``mib`` MiB (median of 10 after 3)."""
    import torch

    dev = "cuda" if cuda else "cpu"
    src = torch.empty(mib << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if cuda:
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * src.numel() / statistics.median(times)


def bench_model(cpu_smoke: bool):
    """(model, cuda): the full Mistral-7B shape in bf16 on the GPU, random weights (seed 0); with
    ``cpu_smoke`` (or no GPU) the tiny model in fp32 on the CPU."""
    import torch
    from transformers import MistralForCausalLM

    from cerbero_ray.models import mistral_7b_config, tiny_config

    cuda = torch.cuda.is_available() and not cpu_smoke
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    with torch.device(dev):
        model = MistralForCausalLM(tiny_config() if cpu_smoke else mistral_7b_config()).to(dtype).eval()
    return model, cuda


def kv_bytes(model, tokens: int) -> int:
    """KV-cache bytes of ``tokens`` positions (every layer, K and V)."""
    c = model.config
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head * tokens * model.dtype.itemsize


def step_ms(make, ids, new: int, reps: int, cuda: bool) -> tuple[float, float, dict]:
    """(ms per decode step, new tokens/s at ``new`` tokens, the engine's facts) of a continuous
    engine made by ``make(max_prompt)``: time for ``new`` tokens minus time for one, per step."""
    from cerbero_ray.inference.sampling import Sampling

    cb = make(max(len(x) for x in ids))
    full, one = Sampling(max_new_tokens=new, temperature=0.0, stop=()), Sampling(max_new_tokens=1, temperature=0.0)
    out, t_full = timed(lambda: run_batcher(cb, ids, full), reps, cuda)
    _, t_one = timed(lambda: run_batcher(cb, ids, one), reps, cuda)
    facts = {
        "graph_error": cb.slots.graph_error,
        "fast": cb.slots.fast,
        "compiled": cb.slots.compiled,
        "compile_error": cb.slots.compile_error,
        "attention": cb.slots.attention,
        "attention_note": cb.slots.attention_note,
        "kv_cache_gib": round(cb.slots.cache_bytes() / 2**30, 2),
        "batch_buckets": cb.slots.batch_buckets if cb.graphs else None,
        "graphs": len(cb.slots.step_graphs),
        "warm_s": None if cb.slots.warm_s is None else round(cb.slots.warm_s, 2),  # start-up capture and compilation
        "texts": [r["text"] for r in out],
    }
    cb.close()  # its KV cache (17 GB for the mixed case's 32 x 4,064 tokens) is freed on return
    return 1000 * (t_full - t_one) / (new - 1), sum(r["new_tokens"] for r in out) / t_full, facts


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", RESULTS))
    p.add_argument("--batches", default="32,128")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--long", type=int, default=4000, help="the mixed case's long prompt")
    p.add_argument("--few", type=int, default=4, help="the low-occupancy case's requests (of --long tokens)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--attentions", default="", help="decode attentions the mixed case also runs (comma list: flex)")
    p.add_argument(
        "--skip-hf", action="store_true", help="leave out transformers' generate (bench/gpu_run.sh attention)"
    )
    p.add_argument("--cpu-smoke", action="store_true")
    a = p.parse_args()
    if a.cpu_smoke:
        a.batches, a.prompt, a.new, a.long, a.reps, a.few = "4,8", 32, 8, 96, 2, 2

    import torch

    from cerbero_ray.inference.continuous import ContinuousBatcher
    from cerbero_ray.inference.generator import Generator
    from cerbero_ray.inference.sampling import Sampling
    from cerbero_ray.tokenizer import build_tokenizer

    model, cuda = bench_model(a.cpu_smoke)
    dev = model.device
    tok = build_tokenizer()
    g = torch.Generator().manual_seed(0)
    greedy = Sampling(max_new_tokens=a.new, temperature=0.0, stop=(), seed=0)
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    bw = copy_bandwidth(cuda, 1024 if cuda else 64)
    import transformers

    res = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "args": vars(a),
        "weights_gib": round(weights / 2**30, 2),
        "copy_bandwidth_gb_s": round(bw / 1e9, 1),
        "batch": {},
    }

    out_file = os.path.join(a.out, "bench_serve_gpu" + "".join(f"-{x}" for x in a.attentions.split(",") if x) + ".json")

    def save():
        os.makedirs(a.out, exist_ok=True)
        with open(out_file, "w") as f:
            json.dump(res, f, indent=1)

    def engine(slots: int, graphs: bool, attention: str = "auto", sizes=None):
        return lambda max_prompt: ContinuousBatcher(
            model,
            tok,
            num_slots=slots,
            max_prompt_tokens=max_prompt,
            max_new_tokens=a.new,
            cuda_graphs=graphs,
            fast_decode=True if attention != "auto" else None,  # a chosen attention is the fast step's
            decode_attention=attention,
            graph_batch_sizes=sizes,
        )

    for batch in [int(b) for b in a.batches.split(",")]:
        ids = torch.randint(1000, 31000, (batch, a.prompt), generator=g).tolist()
        r = res["batch"][batch] = {}
        if not a.skip_hf:
            gen = Generator(model, tok, batch_size=batch, max_prompt_tokens=a.prompt)
            prompts = [tok.decode(x) for x in ids]  # Generator takes text; its retokenized prompts differ slightly
            out, t = timed(lambda gen=gen, prompts=prompts: gen.generate(prompts, greedy), a.reps, cuda)
            r["hf"] = {"new_tokens_per_s": round(sum(x["new_tokens"] for x in out) / t, 1), "s": round(t, 3)}
        if cuda and batch == 32 and not a.skip_hf:
            x = torch.tensor(ids, device=dev)
            kw = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=0)
            with torch.inference_mode():
                static = lambda x=x, kw=kw: model.generate(input_ids=x, cache_implementation="static", **kw)
                _, t = timed(static, a.reps, cuda)
            r["hf_static_compile"] = {"new_tokens_per_s": round(batch * a.new / t, 1), "s": round(t, 3)}
        floor = 1000 * (weights + kv_bytes(model, batch * (a.prompt + a.new // 2))) / bw
        texts = {}
        for name, graphs in (("continuous", False), ("continuous_graphs", True)):
            if graphs and not cuda:
                r[name] = "skipped: CUDA graphs need a GPU"
                continue
            ms, tps, facts = step_ms(engine(batch, graphs), ids, a.new, a.reps, cuda)
            texts[name] = facts.pop("texts")
            r[name] = {
                "new_tokens_per_s": round(tps, 1),
                "ms_per_decode_step": round(ms, 3),
                "floor_ms": round(floor, 3),
                "vs_floor": round(ms / floor, 2),
                "vs_hf_here": round(tps / r["hf"]["new_tokens_per_s"], 3) if "hf" in r else None,
                **facts,
            }
            if "hf_static_compile" in r:
                r[name]["vs_hf_static_compile"] = round(tps / r["hf_static_compile"]["new_tokens_per_s"], 3)
        if len(texts) == 2:
            same = sum(x == y for x, y in zip(texts["continuous"], texts["continuous_graphs"]))
            r["graphs_same_text_as_eager"] = f"{same}/{batch}"
    base = os.path.join(a.out, "gpu_generate_check.json")
    if os.path.exists(base):  # the shared baseline, batch 32, from the same call
        b = json.load(open(base))
        r = res["batch"].get(32, {})
        for ref in ("dynamic", "static_comp"):
            if isinstance(b.get(ref), dict) and b[ref].get("new_tokens_per_s"):
                for name in ("hf", "hf_static_compile", "continuous", "continuous_graphs"):
                    if isinstance(r.get(name), dict):
                        ratio = r[name]["new_tokens_per_s"] / b[ref]["new_tokens_per_s"]
                        r[name][f"vs_baseline_{ref}"] = round(ratio, 3)
    save()  # each case as it ends: a step cut by its timeout keeps what it measured
    # one long prompt among short ones: does every step pay for the longest slot?
    batch = int(a.batches.split(",")[0])
    best = "continuous_graphs" if cuda else "continuous"
    mixed = torch.randint(1000, 31000, (batch - 1, a.prompt), generator=g).tolist()
    mixed.append(torch.randint(1000, 31000, (a.long,), generator=g).tolist())
    ms, tps, facts = step_ms(engine(batch, cuda), mixed, a.new, a.reps, cuda)
    short = res["batch"][batch][best]["ms_per_decode_step"]
    res["mixed_lengths"] = {
        "engine": best,
        "prompts": f"{batch - 1} x {a.prompt} + 1 x {a.long}",
        "ms_per_decode_step": round(ms, 3),
        "all_short_ms_per_decode_step": short,
        "vs_all_short": round(ms / short, 2),
        "kv_cache_gib": facts["kv_cache_gib"],
        "attention": facts["attention"],
    }
    save()
    for att in [x for x in a.attentions.split(",") if x]:  # the same two cases with this decode attention
        # at full occupancy a step replays the largest graph whatever the buckets: one graph, so that
        # flex_attention's kernel (compiled per shape) compiles once, not once per batch bucket
        shorts = [x[: a.prompt] for x in mixed[:-1]] + [mixed[-1][: a.prompt]]
        ms_short, tps_short, f_short = step_ms(engine(batch, cuda, att, ()), shorts, a.new, a.reps, cuda)
        ms_mixed, _, f_mixed = step_ms(engine(batch, cuda, att, ()), mixed, a.new, a.reps, cuda)
        same = sum(x == y for x, y in zip(f_mixed["texts"], facts["texts"]))
        here = res["batch"][batch]  # this attention's all-short case against the batch's baselines and floor
        floor = here[best]["floor_ms"]
        res[f"mixed_lengths_{att}"] = {
            "all_short_new_tokens_per_s": round(tps_short, 1),
            "all_short_vs_floor": round(ms_short / floor, 2),
            **{
                f"all_short_vs_{k}": round(tps_short / here[k]["new_tokens_per_s"], 3)
                for k in ("hf", "hf_static_compile")
                if isinstance(here.get(k), dict)
            },
            "attention": f_mixed["attention"],  # what ran: a choice that failed its start-up check is "sdpa"
            "attention_note": f_mixed["attention_note"],
            "compile_error": f_mixed["compile_error"],
            "all_short_ms_per_decode_step": round(ms_short, 3),
            "ms_per_decode_step": round(ms_mixed, 3),
            "vs_all_short": round(ms_mixed / ms_short, 2),
            "vs_default_mixed": round(ms_mixed / ms, 2),
            "vs_default_all_short": round(ms_short / short, 2),
            "same_text_as_default": f"{same}/{batch}",
        }
        save()
    # a few long requests in the batch's engine: each step replays the smallest batch bucket that holds
    # them (the default) against one graph of every slot (what the engine captured before buckets)
    few = [torch.randint(1000, 31000, (a.long,), generator=g).tolist() for _ in range(a.few)]
    occ = {}
    for case, sizes in (("buckets", None), ("one_graph", ())):
        ms_few, tps_few, f_few = step_ms(engine(batch, cuda, sizes=sizes), few, a.new, a.reps, cuda)
        occ[case] = {"ms_per_decode_step": round(ms_few, 3), "new_tokens_per_s": round(tps_few, 1)}
        occ[case].update({k: f_few[k] for k in ("batch_buckets", "graphs", "warm_s", "attention", "compile_error")})
        occ[case]["texts"] = f_few["texts"]
    same = sum(x == y for x, y in zip(occ["buckets"].pop("texts"), occ["one_graph"].pop("texts")))
    res["low_occupancy"] = {
        "engine": best,
        "prompts": f"{a.few} x {a.long} in {batch} slots",
        **occ,
        "vs_one_graph": round(occ["buckets"]["ms_per_decode_step"] / occ["one_graph"]["ms_per_decode_step"], 2),
        "same_text": f"{same}/{a.few}",
    }
    save()
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
