#!/usr/bin/env bash
# Run HERE, before a GPU check through the device tool: puts into .gpu/ (git-ignored) what the GPU
# machine lacks and cannot download, so that one call there does every check of a stage:
#   .gpu/baselines/  ../shared/bench's gpu_*.py (../shared does not travel; only the checkout does)
#   .gpu/data/       the EVALITA files (bench_evaluate.py)
#   .gpu/whl/        pure-Python wheels the image lacks: hydra-core, omegaconf, antlr4 (the test
#                    conftest composes configs), mistral-common (the Mistral-7B tokenizer file);
#                    with --train also DeepSpeed (built with DS_BUILD_OPS=0) and its pydantic stack,
#                    peft and accelerate (LoRA)
# Then call the device tool with carry [".gpu"] and the command `bash bench/gpu_run.sh <stage>…`.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${CERBERO_SHARED:-../shared}
rm -rf .gpu && mkdir -p .gpu/baselines .gpu/whl .gpu/data
cp "$SHARED"/bench/gpu_*.py .gpu/baselines/
cp -r "$SHARED"/data/evalita .gpu/data/  # 1.3 MB: the evaluate stage's GPU figures (bench_evaluate.py)
PIP="python3 -m pip"
$PIP wheel -q --no-deps -w .gpu/whl mistral-common==1.13.1 hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
  scikit-learn==1.9.1
if [[ " $* " == *" --train "* ]]; then
  DS_BUILD_OPS=0 $PIP wheel -q --no-deps --no-build-isolation -w .gpu/whl deepspeed==0.19.8
  $PIP wheel -q --no-deps -w .gpu/whl pydantic==2.13.4 annotated-types==0.7.0 typing-inspection==0.4.2 hjson==3.1.0
  # LoRA (gpu_run.sh lora): peft and what it imports that a torch image may lack
  $PIP wheel -q --no-deps -w .gpu/whl "peft==$(python3 -c 'import peft; print(peft.__version__)')" \
    "accelerate==$(python3 -c 'import accelerate; print(accelerate.__version__)')"
  # pydantic-core is compiled: for the GPU image's Python (3.12, x86-64; PY_VERSION=3.11 for a
  # CPU smoke run of gpu_run.sh on a 3.11 here)
  $PIP download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl pydantic-core==2.46.4
fi
du -sh .gpu && ls .gpu/whl .gpu/baselines
