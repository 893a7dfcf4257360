#!/usr/bin/env bash
# Run HERE, before a GPU check through the device tool: puts into .gpu/ (git-ignored; GPU_DIR= to put
# it elsewhere) what the GPU machine lacks and cannot download, so that one call there does every
# check of a stage:
#   .gpu/baselines/  ../shared/bench's gpu_*.py (../shared does not travel; only the checkout does)
#   .gpu/data/       the EVALITA files (bench_evaluate.py)
#   .gpu/whl/        wheels for the image's Python (3.12, x86-64) of what the image lacks (its package
#                    list: ../.library/device/KINDS.md; it has torch, transformers, peft, accelerate,
#                    scikit-learn, pyarrow, safetensors, sentencepiece): hydra-core, omegaconf, antlr4
#                    (the test conftest composes configs), mistral-common (the Mistral-7B tokenizer
#                    file) with what it imports (pydantic, jsonschema, pydantic-extra-types, pycountry;
#                    pydantic-core and rpds-py compiled, so downloaded for 3.12), llguidance (constrained
#                    decoding); with --train also DeepSpeed (built with DS_BUILD_OPS=0: pure Python), hjson
#                    and liger-kernel (Triton kernels, pure Python: train.kernels=liger)
# tests/test_gpu_scripts.py (slow tier) checks that every wheel here installs for Python 3.12 and that
# every carried package's requirements are carried or in the image (bench/gpu_image_packages.txt).
# Then call the device tool with carry [".gpu"] and the command `bash bench/gpu_run.sh <stage>…`.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${CERBERO_SHARED:-../shared}
DIR=${GPU_DIR:-.gpu}
rm -rf "$DIR" && mkdir -p "$DIR/baselines" "$DIR/whl" "$DIR/data"
cp "$SHARED"/bench/gpu_*.py "$DIR/baselines/"
cp -r "$SHARED"/data/evalita "$DIR/data/"  # 1.3 MB: the evaluate stage's GPU figures (bench_evaluate.py)
PIP="python3 -m pip"
# pure-Python wheels (py3-none-any): the same file whatever Python builds it. mistral-common comes
# with what importing it needs (pydantic, jsonschema, pydantic-extra-types[pycountry]): transformers
# 5.17's AutoTokenizer imports it whenever it is installed, so without them every engine that loads a
# checkpoint's tokenizer fails there (seen on CPU in a venv shaped like the image, 2026-12-05)
$PIP wheel -q --no-deps -w "$DIR/whl" mistral-common==1.13.1 hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
  pydantic==2.13.4 annotated-types==0.7.0 typing-inspection==0.4.2 pydantic-extra-types==2.11.1 pycountry==26.2.16 \
  jsonschema==4.26.0 referencing==0.37.0 jsonschema-specifications==2025.9.1
# compiled wheels, downloaded for the image's Python 3.12
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR/whl" pydantic-core==2.46.4 rpds-py==0.30.0
# llguidance (constrained decoding, bench_structured.py): a compiled abi3 wheel, downloaded for the image
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 -d "$DIR/whl" llguidance==1.9.1
if [[ " $* " == *" --train "* ]]; then
  DS_BUILD_OPS=0 $PIP wheel -q --no-deps --no-build-isolation -w "$DIR/whl" deepspeed==0.19.8
  $PIP wheel -q --no-deps -w "$DIR/whl" hjson==3.1.0 liger-kernel==0.8.5
fi
du -sh "$DIR" && ls "$DIR/whl" "$DIR/baselines"
