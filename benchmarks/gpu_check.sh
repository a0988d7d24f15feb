#!/usr/bin/env bash
# The GPU part of the Mixtral-8x7B-scale check, in one go (about 8 minutes on one H100/H200), Markdown tables in $OUT:
#   scale_gpu.md   bench_scale.py: 2 Mixtral-8x7B-shaped layers at 128 x 2048 tokens, the default pipeline: per phase
#                  seconds, GPU/host peaks, counted FLOPs and the rate against the measured bf16 peak, the projection
#                  to 32 layers, and a profiled training step with its host synchronisations
#   scale_gpu_qlr.md  the same for qlr, under its own time limit (its down-projection corrections are slow)
#   solvers.md     bench_init.py: the inits' truncated-SVD solvers at Mixtral's shapes
#   experts.md     bench_experts.py: grouped against padded expert matmuls, one training step
#
# 1. Once, on a machine with the project installed, gather what a bare torch + transformers machine lacks
#    (omegaconf and its parser, accelerate, psutil as wheels; the built-in tokenizer); gpu_bundle/ is git-ignored:
#        bash benchmarks/gpu_check.sh --prepare
# 2. On the GPU machine, from the repository root, with gpu_bundle/ carried along:
#        OUT=/path/to/tables bash benchmarks/gpu_check.sh
# The text is the running Python's standard library (builtin:python: no datasets, no gensim needed); the
# weights are random, built on the GPU. Nothing is downloaded. Each step has its own time limit, so a slow
# one still leaves the others' tables.
set -uo pipefail
BUNDLE=${BUNDLE:-gpu_bundle}
WHEELS=(omegaconf antlr4-python3-runtime accelerate psutil)

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/wheels" "$BUNDLE/tokenizer"
  for name in "${WHEELS[@]}"; do  # the versions installed here, which the tests ran with
    version=$(python -c "import importlib.metadata as m; print(m.version('$name'))")
    pip download --quiet --no-deps --only-binary=:all: -d "$BUNDLE/wheels" "$name==$version"
  done
  python - "$BUNDLE/tokenizer" <<'PY'
import shutil, sys
from pathlib import Path
from distill_lr.builtin import builtin_model_dir
for f in builtin_model_dir().iterdir():
    if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
        shutil.copy(f, Path(sys.argv[1]) / f.name)
PY
  du -sh "$BUNDLE"
  exit 0
fi

: "${OUT:?set OUT to the folder for the tables}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
missing=()
for name in "${WHEELS[@]}"; do
  python -c "import importlib.metadata as m; m.version('$name')" 2>/dev/null || missing+=("$name")
done
if ((${#missing[@]})); then
  pip install --quiet --no-index --no-deps --find-links "$BUNDLE/wheels" "${missing[@]}" || exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } | tee "$OUT/device.txt"

cd benchmarks || exit 1
scale=(--device cuda --layers 2 --data builtin:python --tokenizer "../$BUNDLE/tokenizer" --workdir /tmp/bench-scale)
timeout 240 python bench_scale.py "${scale[@]}" --runs default --profile --out "$OUT/scale_gpu" 2>&1 | tail -n 60 | tee "$OUT/scale_gpu.log"
cp /tmp/bench-scale/step_trace.json "$OUT/" 2>/dev/null
timeout 120 python bench_scale.py "${scale[@]}" --runs qlr --out "$OUT/scale_gpu_qlr" 2>&1 | tail -n 40 | tee "$OUT/scale_gpu_qlr.log"
timeout 90 python bench_init.py --device cuda 2>&1 | tee "$OUT/solvers.md"
timeout 60 python bench_experts.py --device cuda --dtype bfloat16 --tokens 4096 16384 --skew 0 2 2>&1 | tee "$OUT/experts.md"
ls -la "$OUT"
