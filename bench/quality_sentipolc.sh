#!/usr/bin/env bash
# Model quality (docs/BENCHMARKS.md): does the pipeline learn, by full fine-tune and by LoRA?
# 1. a base: the tiny model trained on the shipped Italian chat sample (the main job's training; a
#    LoRA needs a base that already maps hidden states to tokens: a random-init model's frozen output
#    layer cannot express a peaked distribution, so no adapter can learn on it);
# 2. SENTIPOLC 2014 `train` rows as chats in the task's own prompt format -> the data stage;
# 3. the base fine-tuned on them twice, from the same weights and on the same shards:
#    train.method=full, then train.method=lora;
# 4. the base, the fully fine-tuned and the LoRA model evaluated on the `test` rows (negativo, the
#    three protocols, the first prompt wording, 0-shot (as trained) and 5-shot), each figure with its 95% bootstrap interval,
#    and the paired differences from the base.
#   bash bench/quality_sentipolc.sh [OUT]      # ~28 minutes on 2 cores; needs ../shared/data
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-outputs/quality}")
DATA=${CERBERO_DATA_DIR:-../shared/data}
mkdir -p "$OUT"
t() { local s=$SECONDS; "$@"; echo "[quality] $(( SECONDS - s )) s: ${*:1:4}"; }
t python jobs/data.py paths.output_dir="$OUT" data.seq_len=512 data.output_dir="$OUT/data/chat_sample"
t python jobs/train.py paths.output_dir="$OUT" train.name=base train.data_dir="$OUT/data/chat_sample"
t python -m cerbero_ray.evaluate.to_chat sentipolc "$DATA/evalita/sentipolc.csv" "$OUT/sentipolc_train.jsonl"
t python jobs/data.py paths.output_dir="$OUT" data.sources.chat.path="$OUT/sentipolc_train.jsonl" \
    data.seq_len=512 data.output_dir="$OUT/data/sentipolc"
TRAIN=(paths.output_dir="$OUT" model=hf model.path="$OUT/train/base/hf" train.data_dir="$OUT/data/sentipolc"
       train.epochs=3 train.global_batch_size=8 train.warmup_steps=10 train.eval_every=50 train.log_every=25
       train.checkpoint_every=0)
t python jobs/train.py "${TRAIN[@]}" train.name=sentipolc train.lr=3e-3
t python jobs/train.py "${TRAIN[@]}" train.name=sentipolc-lora train.method=lora train.lora.lr=1e-2 train.lora.dropout=0.05
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for run in ("sentipolc", "sentipolc-lora"):
    s = json.load(open(f"{out}/train/{run}/summary.json"))
    print(f"[quality] {run}: {s['method']}, {s['trainable_params']:,} trainable of {s['total_params']:,} "
          f"({100 * s['trainable_share']:.2f}%), {s['steps']} steps in {s['train_s']:.0f} s of steps, "
          f"median {s['tokens_per_s_median']:.0f} tokens/s, peak RSS (rank 0) {s['peak_memory_bytes'] / 2**20:.0f} MiB, "
          f"held-out {s['eval_losses'][0]:.3f} -> {min(s['eval_losses']):.3f} (min) -> {s['eval_losses'][-1]:.3f}")
PY
for shots in 0 5; do
  t python jobs/evaluate.py paths.output_dir="$OUT" evaluate.output_dir="$OUT/evaluate_${shots}shot" \
      '~evaluate.checkpoints.tiny-cpu' "+evaluate.checkpoints.base=$OUT/train/base/hf" \
      "+evaluate.checkpoints.full=$OUT/train/sentipolc/hf" "+evaluate.checkpoints.lora=$OUT/train/sentipolc-lora/adapter" \
      evaluate.only=[sentipolc] evaluate.tasks.sentipolc.prompts=[0] evaluate.tasks.sentipolc.shots=$shots \
      evaluate.tasks.sentipolc.protocols=[generate,choice,score,benchita]
done
