#!/usr/bin/env bash
# Model quality (docs/BENCHMARKS.md): does the pipeline learn, by full fine-tune and by LoRA?
# SENTIPOLC 2014 `train` rows as chats in the task's own prompt format -> the data stage -> the tiny
# model trained twice on the same shards (train.method=full, then train.method=lora) -> the untrained,
# the fully fine-tuned and the LoRA model evaluated on the `test` rows (negativo, the three protocols,
# the first prompt wording, 5-shot), every figure with its 95% bootstrap interval, paired differences.
#   bash bench/quality_sentipolc.sh [OUT]      # ~30 minutes on 2 cores; needs ../shared/data
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/quality}
DATA=${CERBERO_DATA_DIR:-../shared/data}
mkdir -p "$OUT"
t() { local s=$SECONDS; "$@"; echo "[quality] $(( SECONDS - s )) s: ${*:1:4}"; }
t python -m cerbero_ray.evaluate.to_chat sentipolc "$DATA/evalita/sentipolc.csv" "$OUT/sentipolc_train.jsonl"
t python jobs/data.py paths.output_dir="$OUT" data.sources.chat.path="$OUT/sentipolc_train.jsonl" \
    data.seq_len=512 data.output_dir="$OUT/data/sentipolc"
TRAIN=(paths.output_dir="$OUT" train.data_dir="$OUT/data/sentipolc" train.epochs=3 train.global_batch_size=8
       train.warmup_steps=10 train.eval_every=50 train.log_every=25 train.checkpoint_every=0)
t python jobs/train.py "${TRAIN[@]}" train.name=sentipolc train.lr=3e-3
t python jobs/train.py "${TRAIN[@]}" train.name=sentipolc-lora train.method=lora train.lora.lr=1e-2
python - "$OUT" <<'PY'
import json, sys
from cerbero_ray.config import compose, to_container
from cerbero_ray.models import build_model
from cerbero_ray.tokenizer import build_tokenizer
from cerbero_ray.train.checkpoint import save_hf_to
out = sys.argv[1]
c = to_container(compose("train", [f"paths.output_dir={out}", "train.name=sentipolc"]))
save_hf_to(build_model({**c["model"], "dtype": "float32"}, seed=c["train"]["seed"]), build_tokenizer(),
           f"{out}/train/sentipolc/hf_init")  # the exact weights both trainings started from
for run in ("sentipolc", "sentipolc-lora"):
    s = json.load(open(f"{out}/train/{run}/summary.json"))
    print(f"[quality] {run}: {s['method']}, {s['trainable_params']:,} trainable of {s['total_params']:,} "
          f"({100 * s['trainable_share']:.2f}%), {s['steps']} steps in {s['train_s']:.0f} s of steps, "
          f"peak RSS (rank 0) {s['peak_memory_bytes'] / 2**20:.0f} MiB, held-out "
          f"{s['eval_losses'][0]:.3f} -> {min(s['eval_losses']):.3f} (min) -> {s['eval_losses'][-1]:.3f}")
PY
t python jobs/evaluate.py paths.output_dir="$OUT" evaluate.output_dir="$OUT/evaluate" \
    '~evaluate.checkpoints.tiny-cpu' "+evaluate.checkpoints.untrained=$OUT/train/sentipolc/hf_init" \
    "+evaluate.checkpoints.full=$OUT/train/sentipolc/hf" "+evaluate.checkpoints.lora=$OUT/train/sentipolc-lora/adapter" \
    evaluate.only=[sentipolc] evaluate.tasks.sentipolc.prompts=[0]
