#!/usr/bin/env bash
# The one prepared GPU check of cocoa's training (bench/gpu_check.py): <= 9 minutes on one H100/H200 with
# torch 2.11 / transformers 5.17 / peft 0.21 and no vLLM, flash_attn, polars or datasets. Writes
# $OUT/gpu_check.json and $OUT/gpu_check.md (+ $OUT/logs/), rewritten after every section.
#
#   OUT=gpu_check_out bench/gpu_check.sh     # on the GPU machine
#   bench/gpu_check.sh --cpu --out DIR        # the same code path at toy sizes (tests/test_gpu_check.py)
#
# Environment: PYTHON (default: python3), OUT (default gpu_check_out), GPU_CHECK_BUDGET (seconds for all
# sections; default 530 on a GPU, 900 with --cpu), GPU_CHECK_WORK (scratch for models and data, default the
# system temporary directory; never under OUT), GPU_CHECK_WHEELS (a directory of wheels for packages the image
# lacks). cocoa need not be installed: the repository is put on PYTHONPATH. Exit status 0 when every section
# that ran passed.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false COCOA_PROGRESS=plain
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
args=("$@")
if [ -n "${GPU_CHECK_BUDGET:-}" ]; then args+=(--budget "$GPU_CHECK_BUDGET"); fi
if ! "$PY" -c "import torch, transformers" 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch and transformers; set PYTHON to the interpreter that has them" >&2
    exit 2
fi
# What cocoa imports besides torch / transformers. A package the GPU image lacks is named here (and in the env
# section); with GPU_CHECK_WHEELS=DIR (wheels carried in the working tree) it is installed from DIR, offline.
missing=$("$PY" - <<'PYEOF'
import importlib.util as u
need = {"pydantic": "pydantic", "rich": "rich", "click": "click", "yaml": "pyyaml", "PIL": "pillow", "peft": "peft",
        "torchvision": "torchvision", "safetensors": "safetensors", "pyarrow": "pyarrow", "numpy": "numpy"}
print(" ".join(p for m, p in need.items() if u.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
    echo "gpu_check: missing packages: $missing" >&2
    if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
        "$PY" -m pip install --no-index --find-links "$GPU_CHECK_WHEELS" $missing || echo "gpu_check: could not install $missing from $GPU_CHECK_WHEELS" >&2
    fi
fi
exec "$PY" bench/gpu_check.py "${args[@]}"
