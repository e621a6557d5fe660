#!/usr/bin/env bash
# The GPU checks of issue 7 in one command. On a machine with a CUDA GPU:
#
#   scripts/gpu_checks.sh [OUT]          # default OUT: build/gpu
#
# 1. builds the full-size random-weight pipelines (CogVideoX-2b, SVD, AudioLDM2-large; MODELS="..." to
#    choose) into OUT/hub in the Hugging Face cache layout, weights made on the GPU (skips existing ones);
# 2. runs the GPU tests (pytest -m gpu) with HF_HUB_CACHE and PARASTEP_FULL_SIZE_CACHE set to OUT/hub, so
#    the catalog finds the models as it finds downloads;
# 3. runs scripts/gpu_benchmarks.py at the published settings (BENCH_ARGS="--steps 10" etc. to shorten),
#    writing OUT/gpu_benchmarks.{md,json}; OUT/nvidia-smi.txt and OUT/versions.txt record the machine.
#
# Without a GPU, `scripts/gpu_checks.sh --cpu [OUT]` runs the same steps on the CPU with --reduced models and
# sizes (a check of the scripts, not of GPU figures).
set -euo pipefail
cd "$(dirname "$0")/.."

CPU=0
if [[ "${1:-}" == "--cpu" ]]; then
    CPU=1
    shift
fi
OUT=${1:-build/gpu}
PY=.venv/bin/python
MODELS=${MODELS:-cogvideox-2b svd audioldm2-large}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

$PY -c "import platform, torch, diffusers, transformers; print('python', platform.python_version(), \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, \
'transformers', transformers.__version__)" | tee "$OUT/versions.txt"

if [[ $CPU == 1 ]]; then
    nice -n 10 $PY -m scripts.build_full_size_models $MODELS --reduced --layout hf-cache --out "$OUT/hub"
    # The GPU tests need a GPU: on the CPU only check that they are collected and deselected by default
    # (pytest exits 5, "no tests ran").
    .venv/bin/pytest -q tests/test_gpu.py | tail -1 || true
    HF_HUB_CACHE="$OUT/hub" nice -n 10 $PY -m scripts.gpu_benchmarks --device cpu --reduced \
        --models "${MODELS// /,}" --repeats 3 --json "$OUT/gpu_benchmarks.json" \
        --markdown "$OUT/gpu_benchmarks.md" ${BENCH_ARGS:-}
    exit 0
fi

nvidia-smi | tee "$OUT/nvidia-smi.txt"
nvidia-smi topo -m >> "$OUT/nvidia-smi.txt" 2>&1 || true
$PY -m scripts.build_full_size_models $MODELS --layout hf-cache --device cuda --out "$OUT/hub"
export HF_HUB_CACHE="$OUT/hub" PARASTEP_FULL_SIZE_CACHE="$OUT/hub"
# The GPU tests; a failure is recorded and the benchmarks still run.
.venv/bin/pytest -m gpu -q tests/test_gpu.py 2>&1 | tee "$OUT/pytest-gpu.txt" || true
$PY -m scripts.gpu_benchmarks --device cuda --models "${MODELS// /,}" \
    --json "$OUT/gpu_benchmarks.json" --markdown "$OUT/gpu_benchmarks.md" ${BENCH_ARGS:-}
