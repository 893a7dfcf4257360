#!/usr/bin/env bash
# Model quality (docs/BENCHMARKS.md): does the pipeline learn? SENTIPOLC 2014 `train` rows as chats in
# the task's own prompt format -> the data stage -> training the tiny model -> evaluating the untrained
# and the fine-tuned model on the `test` rows (negativo, both protocols, 5-shot and 0-shot).
#   bash bench/quality_sentipolc.sh [OUT]      # ~10 minutes on 2 cores; needs ../shared/data
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/quality}
DATA=${CERBERO_DATA_DIR:-../shared/data}
mkdir -p "$OUT"
t() { local s=$SECONDS; "$@"; echo "[quality] $(( SECONDS - s )) s: ${*:1:3}"; }
t python -m cerbero_ray.evaluate.to_chat sentipolc "$DATA/evalita/sentipolc.csv" "$OUT/sentipolc_train.jsonl"
t python jobs/data.py paths.output_dir="$OUT" data.sources.chat.path="$OUT/sentipolc_train.jsonl" \
    data.seq_len=512 data.output_dir="$OUT/data/sentipolc"
t python jobs/train.py paths.output_dir="$OUT" train.name=sentipolc train.data_dir="$OUT/data/sentipolc" \
    train.epochs=3 train.global_batch_size=8 train.lr=3e-3 train.warmup_steps=10 train.eval_every=50 \
    train.log_every=25 train.checkpoint_every=0
python - "$OUT" <<'PY'
import sys
from cerbero_ray.config import compose, to_container
from cerbero_ray.models import build_model
from cerbero_ray.tokenizer import build_tokenizer
from cerbero_ray.train.checkpoint import save_hf_to
c = to_container(compose("train", [f"paths.output_dir={sys.argv[1]}", "train.name=sentipolc"]))
save_hf_to(build_model({**c["model"], "dtype": "float32"}, seed=c["train"]["seed"]), build_tokenizer(),
           f"{sys.argv[1]}/train/sentipolc/hf_init")  # the exact weights training started from
PY
for shots in 5 0; do
  t python jobs/evaluate.py paths.output_dir="$OUT" evaluate.output_dir="$OUT/evaluate_${shots}shot" \
      '~evaluate.checkpoints.tiny-cpu' "+evaluate.checkpoints.untrained=$OUT/train/sentipolc/hf_init" \
      "+evaluate.checkpoints.fine-tuned=$OUT/train/sentipolc/hf" evaluate.only=[sentipolc] \
      evaluate.tasks.sentipolc.shots=$shots
done
