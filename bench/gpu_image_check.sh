#!/usr/bin/env bash
# Run HERE, before a GPU is lent: the GPU scripts under the image's Python and library versions, on CPU.
# A GPU call is ~10 minutes out of 15 a session; a wheel the image lacks or an API its older torch does
# not have should fail here, not there. This builds (once) a venv shaped like the GPU image: Python 3.12,
# torch 2.11.0 (PyPI's build, CUDA libraries included: ~5 GB, runs on CPU), transformers 5.17.0,
# tokenizers 0.23.2 and the image's packages that this code or its carried wheels import; removes what
# pip pulled in that the image does not have (bench/gpu_image_packages.txt); installs .gpu/whl into a
# separate folder on PYTHONPATH, as gpu_run.sh does there; then runs
#   CPU_SMOKE=1 bash bench/gpu_run.sh <stages>     (every stage by default)
#   pytest on the test files with a gpu twin       (their cpu cases: the same inputs and assertions)
#   Liger's Triton kernels under Triton's interpreter (tests/test_train_kernels.py -k interpreter)
# Needs a Python 3.12 (PYTHON312=, or pyenv's); IMAGE_VENV= to keep the venv elsewhere (default
# /tmp/cerbero_image_venv); OUT= for the smoke run's files (default outputs/gpu_image).
#   bash bench/gpu_image_check.sh                  # ~5 minutes once the venv exists (~5 more to build it)
#   bash bench/gpu_image_check.sh serve30 train31  # only these stages, then the tests
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${IMAGE_VENV:-/tmp/cerbero_image_venv}
OUT=${OUT:-outputs/gpu_image}
PY312=${PYTHON312:-}
if [[ -z "$PY312" ]]; then  # the first that runs: a pyenv shim is on PATH even where 3.12 is not selected
  for c in "$(command -v python3.12)" "$HOME"/.pyenv/versions/3.12*/bin/python3; do
    if [[ -x "$c" ]] && "$c" -c '' 2>/dev/null; then PY312=$c; break; fi
  done
fi
[[ -x "$PY312" ]] || { echo "no Python 3.12: set PYTHON312=" >&2; exit 2; }
if [[ ! -x "$VENV/bin/python3" ]]; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.11.0 transformers==5.17.0 tokenizers==0.23.2 peft accelerate pyarrow \
    scikit-learn safetensors sentencepiece numpy pytest pytest-timeout requests py-cpuinfo ninja msgpack einops \
    tensorboard matplotlib pandas psutil tiktoken attrs pyyaml
fi
# the image's package names only: whatever else pip pulled in goes, so a missing wheel shows here
extra=$("$VENV/bin/python3" - <<'EOF'
import importlib.metadata as md, re
def canon(n): return re.sub(r"[-_.]+", "-", n).lower()
image = {canon(l) for l in open("bench/gpu_image_packages.txt").read().split() if l and not l.startswith("#")}
print(" ".join(sorted({canon(d.metadata["Name"]) for d in md.distributions()} - image - {"pip"})))
EOF
)
[[ -n "$extra" ]] && "$VENV/bin/pip" uninstall -y -q $extra
[[ -d .gpu/whl ]] || bash bench/gpu_prepare.sh --train
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
"$VENV/bin/python3" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpu/whl/*.whl
"$VENV/bin/python3" -c "import torch, transformers; print('image venv: torch', torch.__version__, 'transformers', transformers.__version__)"
STAGES=("$@")
[[ ${#STAGES[@]} -eq 0 ]] && STAGES=(serve probe structured label train accum lora lora_dropout compile kernels \
  train_attention native multilora attention prefill evaluate whole7b whole7b_lora whole7b_ds whole7b_offload \
  train31 serve30 tests)
rc=0
rm -rf "$OUT"
CPU_SMOKE=1 PYTHON="$VENV/bin/python3" PYTHONPATH="$SITE" OUT="$OUT" bash bench/gpu_run.sh "${STAGES[@]}" || rc=1
grep -q "rc=[1-9]" "$OUT/gpu_run.log" && { echo "a smoke step failed: $OUT/gpu_run.log" >&2; rc=1; }
PYTHONPATH="$PWD:$SITE" "$VENV/bin/python3" -m pytest -q -p no:cacheprovider -m "not integration" \
  tests/test_inference_continuous.py tests/test_lora_gpu.py tests/test_train_gpu.py tests/test_train_kernels.py \
  tests/test_grammar.py || rc=1
# Liger's kernels (carried) on the image's triton, run by Triton's interpreter on CPU; its 3.6 needs NumPy < 2.4
# (first on the path, for this run only). INTERPRETER_SLOW=1 adds the trainer's engine and an exact resume (~4 min).
"$VENV/bin/python3" -m pip install -q --target "$SITE/np" "numpy<2.4"
PYTHONPATH="$SITE/np:$PWD:$SITE" "$VENV/bin/python3" -m pytest -q -p no:cacheprovider -rs -k interpreter \
  -m "${INTERPRETER_SLOW:+slow or }not slow" tests/test_train_kernels.py || rc=1
exit $rc
