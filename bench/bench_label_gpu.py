"""One-GPU benchmark of the scoring engine beside a bare batched forward pass over the same prompts,
in the same process (and ../shared/bench/gpu_anchor.py's fwd7b when run in the same call):
a full Mistral-7B-shaped random model in bf16 (no Ray needed).

    python ../shared/bench/gpu_anchor.py --out $OUT; python bench/bench_label_gpu.py --out $OUT
    python bench/bench_label_gpu.py --cpu-smoke        # tiny sizes on CPU: checks the script runs

Prompts: the sentiment task (few-shot) around --rows Italian texts of the shipped sample. Both
sides run the same length-sorted batches under the same token budget:
  bare      model(input_ids, attention_mask) on the right-padded prompts (logits of the last
            position only, so neither side pays for a full-vocabulary projection)
  scoring   Scorer.score_ids: the same prompts + every label's continuation in one pass
Reports prompt tokens/s of each and the ratio (goal >= 0.9). Needs torch, transformers,
sentencepiece, mistral-common, numpy, pyyaml.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # git-ignored


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", RESULTS))
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--max-batch-tokens", type=int, default=65536)
    p.add_argument("--cpu-smoke", action="store_true")
    a = p.parse_args()

    import torch
    import yaml
    from transformers import MistralForCausalLM

    from cerbero_ray.config.label_task import task_from_dict
    from cerbero_ray.inference.scorer import Scorer, plan_batches
    from cerbero_ray.models import mistral_7b_config, tiny_config
    from cerbero_ray.tokenizer import build_tokenizer

    cuda = torch.cuda.is_available() and not a.cpu_smoke
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    cfg = tiny_config() if a.cpu_smoke else mistral_7b_config()
    cfg._attn_implementation = "sdpa"
    with torch.device(dev):
        model = MistralForCausalLM(cfg).to(dtype).eval()
    tok = build_tokenizer()
    task = task_from_dict(yaml.safe_load(open(os.path.join(REPO, "conf", "label", "task", "sentiment.yaml"))))
    texts = [json.loads(x)["text"] for x in open(os.path.join(REPO, "data", "samples", "label_it_sample.jsonl"))]
    rows = 32 if a.cpu_smoke else a.rows
    texts = (texts * (rows // len(texts) + 1))[:rows]
    scorer = Scorer(model, tok, task, max_batch_tokens=a.max_batch_tokens)
    prompts, _ = scorer.encode(texts)
    tokens = sum(len(x) for x in prompts)
    batches = plan_batches([len(x) for x in prompts], scorer.tail, a.max_batch_tokens, 256)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    @torch.no_grad()
    def bare():
        for b in batches:
            width = max(len(prompts[i]) for i in b)
            ids = torch.tensor([prompts[i] + [0] * (width - len(prompts[i])) for i in b], device=dev)
            mask = torch.tensor([[1] * len(prompts[i]) + [0] * (width - len(prompts[i])) for i in b], device=dev)
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

    def timed(fn, reps=3):
        fn()
        sync()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    t_bare = timed(bare)
    t_score = timed(lambda: scorer.score_ids(prompts))
    res = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "rows": rows,
        "prompt_tokens": tokens,
        "batches": len(batches),
        "bare_tokens_per_s": round(tokens / t_bare),
        "scoring_tokens_per_s": round(tokens / t_score),
        "ratio": round(t_bare / t_score, 3),
    }
    anchor = os.path.join(a.out, "gpu_anchor.json")
    if os.path.exists(anchor):
        res["anchor"] = json.load(open(anchor)).get("fwd7b")
    if cuda:
        res["max_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_label_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
