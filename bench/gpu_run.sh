#!/usr/bin/env bash
# Run THERE, on the GPU machine (after bench/gpu_prepare.sh here; the device tool's carry [".gpu"]):
#   bash bench/gpu_run.sh serve         # gpu_generate_check.py beside bench_serve_gpu.py, then the gpu tests
#   bash bench/gpu_run.sh label         # bench_label_gpu.py: the scorer vs a bare forward, same batches
#   bash bench/gpu_run.sh train         # gpu_zero1_check.py beside bench_train_gpu.py (gpu_prepare.sh --train)
#   bash bench/gpu_run.sh accum         # bench_train_gpu.py with 4 micro-batches: fp32 vs bf16 gradient accumulation
#   bash bench/gpu_run.sh lora          # bench_train_gpu.py full, then LoRA: tokens/s and peak memory (gpu_prepare.sh --train)
#   bash bench/gpu_run.sh lora_dropout  # bench_train_gpu.py LoRA at train.lora.dropout 0.05 (the default is 0)
#   bash bench/gpu_run.sh compile       # bench_train_gpu.py eager, then train.compile=layers (compile time, tokens/s, loss)
#   bash bench/gpu_run.sh kernels       # bench_train_gpu.py plain, then train.kernels=liger (tokens/s, memory, loss)
#   bash bench/gpu_run.sh train_attention  # bench_train_gpu.py flex_attention (auto), then SDPA with a document mask
#   bash bench/gpu_run.sh whole7b       # the 32-layer 7B shape, full fine-tune, train.strategy=torch (one call; ~5 min)
#   bash bench/gpu_run.sh whole7b_lora  # the same, LoRA on DeepSpeed (one call)
#   bash bench/gpu_run.sh whole7b_ds    # the same, full on DeepSpeed: expected not to fit one H200 (an OOM record)
#   bash bench/gpu_run.sh whole7b_offload  # the same with DeepSpeed's optimizer offloaded to the host (what fitting costs)
#   bash bench/gpu_run.sh native        # bench_train_gpu.py DeepSpeed, then train.strategy=torch (tokens/s, memory, loss)
#   bash bench/gpu_run.sh multilora     # bench_multilora.py: k = 1, 4, 16 adapters mixed in one stream vs one at a time
#   bash bench/gpu_run.sh structured    # bench_structured.py: constrained vs free generation, same requests
#   bash bench/gpu_run.sh probe         # probe_decode_gpu.py: a decode step's GPU time, its kernels, fused variants
#   bash bench/gpu_run.sh attention     # bench_serve_gpu.py batch 32: all-short vs one long prompt, SDPA vs flex decode attention
#   bash bench/gpu_run.sh prefill       # bench_prefill.py: packed prefill vs transformers' padded prefill, 7B shape
#   bash bench/gpu_run.sh prefix        # bench_prefix.py: prefix reuse on vs off (system prompt, chat turns, distinct), 7B shape
#   bash bench/gpu_run.sh selfchat      # bench_selfchat.py: self-chat chains vs waves, 7B shape
#   bash bench/gpu_run.sh prefix_store  # bench_prefix_store.py: chats back after their slot was taken, host store, 7B
#   bash bench/gpu_run.sh evaluate      # bench_evaluate.py: score vs generate protocol, continuous vs generate
#   bash bench/gpu_run.sh tests         # python -m pytest -m gpu (every gpu-marked test)
#   bash bench/gpu_run.sh train31       # issue 31 in one call: the default run once, then torch, LoRA, Liger, SDPA, compile
#   bash bench/gpu_run.sh serve30       # issue 30 in one call: batch 32 with flex decode attention beside generate, static+compile
#                                       # and the floor, the mixed lengths; then multi-LoRA and packed prefill
#   CPU_SMOKE=1 bash bench/gpu_run.sh serve label   # here, on CPU: tiny sizes, the baselines skipped
#   BASELINES=0 bash bench/gpu_run.sh serve         # without ../shared's baselines (ours run in-process)
# Stages run in the order given, each step under its own timeout (sized so `serve` fits one
# 600-second call); a failing step is reported and the next one runs. Results and one log go to
# $OUT (the device tool brings back at most 8 files: each stage writes one or two JSON files).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [[ -z "${CPU_SMOKE:-}" ]] && compgen -G ".gpu/whl/*.whl" >/dev/null; then
  rm -rf /tmp/cerbero_site
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/cerbero_site .gpu/whl/*.whl || exit 1
  # PYTHONPATH comes before the image's site-packages, so these win where both have a package:
  # gpu_prepare.sh carries only what the image lacks. A CPU smoke run uses this machine's install
  export PYTHONPATH=$PYTHONPATH:/tmp/cerbero_site
fi
SMOKE=()
[[ -n "${CPU_SMOKE:-}" ]] && SMOKE=(--cpu-smoke)
LOG=$OUT/gpu_run.log
declare -a SUMMARY=()

step() {  # step NAME SECONDS CMD...: run CMD under a timeout, log it, remember how it ended
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${secs}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  SUMMARY+=("$name rc=$rc $((SECONDS - t0))s")
}

baseline() {  # a ../shared/bench baseline: CUDA only, skipped on a CPU smoke run (and with BASELINES=0)
  if [[ -n "${CPU_SMOKE:-}" ]]; then SUMMARY+=("$1 skipped (CPU smoke)"); return; fi
  if [[ "${BASELINES:-1}" == 0 ]]; then SUMMARY+=("$1 skipped (BASELINES=0)"); return; fi
  step "$@"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$LOG"

for stage in "$@"; do
  case $stage in
    serve)
      baseline gpu_generate_check 200 $PY .gpu/baselines/gpu_generate_check.py --out "$OUT" --budget-s 170
      step bench_serve_gpu 300 $PY bench/bench_serve_gpu.py --out "$OUT" "${SMOKE[@]}"
      step pytest_gpu_continuous 70 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_inference_continuous.py ;;
    label)
      step bench_label_gpu 110 $PY bench/bench_label_gpu.py --out "$OUT" "${SMOKE[@]}" ;;
    train)
      baseline gpu_zero1_check 300 $PY .gpu/baselines/gpu_zero1_check.py --out "$OUT"
      step bench_train_gpu 240 $PY bench/bench_train_gpu.py --out "$OUT" "${SMOKE[@]}" ;;
    accum)   # fp32 vs bf16 gradient accumulation over 4 micro-batches (a call of its own: ~2 × 150 s)
      for dt in fp32 bf16; do
        step bench_train_gpu_accum_$dt 200 $PY bench/bench_train_gpu.py --accum 4 --steps 5 --warmup 2 \
          --grad-accum-dtype $dt --out "$OUT" "${SMOKE[@]}"
      done ;;
    lora)   # the full fine-tune, then LoRA on the same 4-layer 7B-shape model (a call of its own: ~2 × 200 s)
      step bench_train_gpu_full 260 $PY bench/bench_train_gpu.py --out "$OUT" "${SMOKE[@]}"
      step bench_train_gpu_lora 260 $PY bench/bench_train_gpu.py --method lora --out "$OUT" "${SMOKE[@]}"
      step pytest_gpu_lora 70 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_lora_gpu.py ;;
    lora_dropout)  # LoRA with train.lora.dropout 0.05, beside the lora stage's run at the default 0 (~200 s)
      step bench_train_gpu_lora_dropout 260 $PY bench/bench_train_gpu.py --method lora --lora-dropout 0.05 \
        --out "$OUT" "${SMOKE[@]}" ;;
    compile)  # eager, then regional torch.compile, on the same batches (a call of its own: ~2 × 200 s)
      step bench_train_gpu_eager 260 $PY bench/bench_train_gpu.py --out "$OUT" "${SMOKE[@]}"
      step bench_train_gpu_compile 300 $PY bench/bench_train_gpu.py --compile layers --out "$OUT" "${SMOKE[@]}" ;;
    kernels)  # the plain modules, then Liger Kernel's (a call of its own: ~2 × 200 s; gpu_prepare.sh --train)
      step bench_train_gpu_plain 260 $PY bench/bench_train_gpu.py --out "$OUT" "${SMOKE[@]}"
      step bench_train_gpu_liger 260 $PY bench/bench_train_gpu.py --kernels liger --out "$OUT" "${SMOKE[@]}" ;;
    train_attention)  # which attention trains packed documents fastest (a call of its own: ~2 × 200 s)
      step bench_train_gpu_auto 260 $PY bench/bench_train_gpu.py --out "$OUT" "${SMOKE[@]}"
      step bench_train_gpu_sdpa 260 $PY bench/bench_train_gpu.py --attention sdpa --out "$OUT" "${SMOKE[@]}" ;;
    whole7b)  # a whole Mistral-7B shape on one GPU (issue 31): each a call of its own
      step bench_train_gpu_7b_torch 540 $PY bench/bench_train_gpu.py --layers 32 --steps 4 --warmup 1 \
        --strategy torch --out "$OUT" "${SMOKE[@]}" ;;
    whole7b_lora)
      step bench_train_gpu_7b_lora 540 $PY bench/bench_train_gpu.py --layers 32 --steps 4 --warmup 1 \
        --method lora --out "$OUT" "${SMOKE[@]}" ;;
    whole7b_ds)
      step bench_train_gpu_7b_ds 540 $PY bench/bench_train_gpu.py --layers 32 --steps 4 --warmup 1 \
        --out "$OUT" "${SMOKE[@]}" ;;
    whole7b_offload)  # the same on DeepSpeed with its optimizer offloaded to the host (what fitting costs); 4 micro-
      # batches a step, as a real run amortizes the host's AdamW step. Host memory: ~116 GB of the machine's 128
      step bench_train_gpu_7b_offload 540 $PY bench/bench_train_gpu.py --layers 32 --steps 3 --warmup 1 --accum 4 \
        --offload --out "$OUT" "${SMOKE[@]}" ;;
    native)  # DeepSpeed, then the torch-native ZeRO-1 on the same batches (a call of its own: ~2 × 200 s)
      step bench_train_gpu_deepspeed 260 $PY bench/bench_train_gpu.py --out "$OUT" "${SMOKE[@]}"
      step bench_train_gpu_torch 260 $PY bench/bench_train_gpu.py --strategy torch --out "$OUT" "${SMOKE[@]}" ;;
    multilora)
      step bench_multilora 300 $PY bench/bench_multilora.py --out "$OUT" "${SMOKE[@]}" ;;
    structured)   # constrained (JSON schema, choice, regex) vs free generation, batch 32 (~2 min)
      step bench_structured 200 $PY bench/bench_structured.py --out "$OUT" "${SMOKE[@]}" ;;
    attention)  # decode attention reading each row's real length (flex) against the default, batch 32 (~4 min)
      step bench_serve_gpu_flex 400 $PY bench/bench_serve_gpu.py --batches 32 --attentions flex --skip-hf \
        --out "$OUT" "${SMOKE[@]}" ;;
    prefill)   # packed prefill vs transformers' padded prefill, 16 prompts of similar and of varied lengths (~2 min)
      step bench_prefill 200 $PY bench/bench_prefill.py --out "$OUT" "${SMOKE[@]}" ;;
    prefix)   # prefix reuse on vs off in one engine: a shared system prompt, chat turns, nothing shared (~3 min)
      step bench_prefix 300 $PY bench/bench_prefix.py --out "$OUT" "${SMOKE[@]}" ;;
    selfchat) # self-chat as chains of requests vs turn-by-turn waves, with and without prefix reuse (~3 min)
      step bench_selfchat 300 $PY bench/bench_selfchat.py --out "$OUT" "${SMOKE[@]}" ;;
    prefix_store)  # chats back after others took their slot: slots alone vs a host prefix store (~3 min)
      step bench_prefix_store 300 $PY bench/bench_prefix_store.py --part store --out "$OUT" "${SMOKE[@]}" ;;
    probe)   # where a decode step's time goes: the engine's graph vs fused / compiled variants (~3 min)
      step probe_decode_gpu 240 $PY bench/probe_decode_gpu.py --out "$OUT" "${SMOKE[@]}" ;;
    evaluate)
      data=.gpu/data; [[ -n "${CPU_SMOKE:-}" ]] && data=${CERBERO_DATA_DIR:-../shared/data}
      step bench_evaluate 200 $PY bench/bench_evaluate.py --data-dir "$data" --out "$OUT" "${SMOKE[@]}" ;;
    train31)  # issue 31's open checks in one 600-second call, each variant once beside one default run (the
      # comparisons are against bench_train_gpu.json of the same call), in the order their answers weigh:
      # a step cut short by its limit loses its own figure only; every finished one is already in $OUT
      step bench_train_gpu 120 $PY bench/bench_train_gpu.py --out "$OUT" "${SMOKE[@]}"
      step bench_train_gpu_torch 100 $PY bench/bench_train_gpu.py --strategy torch --out "$OUT" "${SMOKE[@]}"
      step bench_train_gpu_lora 90 $PY bench/bench_train_gpu.py --method lora --out "$OUT" "${SMOKE[@]}"
      step bench_train_gpu_liger 90 $PY bench/bench_train_gpu.py --kernels liger --out "$OUT" "${SMOKE[@]}"
      step bench_train_gpu_sdpa 80 $PY bench/bench_train_gpu.py --attention sdpa --out "$OUT" "${SMOKE[@]}"
      step bench_train_gpu_compile 80 $PY bench/bench_train_gpu.py --compile layers --out "$OUT" "${SMOKE[@]}" ;;
    serve30)  # issue 30's open checks in one 600-second call: decode attention reading real lengths (the
      # mixed-length goal), mixed LoRA adapters on the fast step, packed prefill on the 7B shape
      # (batch 32 with transformers' generate and static+compile in the same process, the default decode
      # attention and flex: mixed_lengths_flex holds flex's all-short step against those and the floor)
      step bench_serve_gpu_flex 330 $PY bench/bench_serve_gpu.py --batches 32 --attentions flex --out "$OUT" "${SMOKE[@]}"
      step bench_multilora 150 $PY bench/bench_multilora.py --out "$OUT" "${SMOKE[@]}"
      step bench_prefill 90 $PY bench/bench_prefill.py --out "$OUT" "${SMOKE[@]}" ;;
    tests)
      step pytest_gpu 300 $PY -m pytest -q -m gpu -p no:cacheprovider ;;
    *) echo "unknown stage '$stage' (serve, probe, attention, structured, label, train, accum, lora, lora_dropout, compile, kernels, native, train_attention, whole7b, whole7b_lora, whole7b_ds, whole7b_offload, multilora, prefill, prefix, selfchat, prefix_store, evaluate, tests, train31, serve30)" | tee -a "$LOG"; exit 2 ;;
  esac
done
printf '%s\n' "--- summary" "${SUMMARY[@]}" | tee -a "$LOG"
