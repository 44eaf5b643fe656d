#!/usr/bin/env bash
# The one script for a GPU machine: kernel correctness on the GPU against float64 references,
# then the kernel and engine benchmarks. Installs nothing; run from the repo root.
# Outputs go to ${OUT}: the tables and plots, and the logs, CSV and JSON in results.tgz.
# Each stage has its own time limit so the whole run stays under 8 minutes; a failed stage
# does not stop the next one, but makes the script exit non-zero at the end.
set -euo pipefail

OUT="${OUT:-/tmp/out}"
PY="${PYTHON:-python3}"
export PYTHONPATH="${PYTHONPATH:+${PYTHONPATH}:}$(pwd)"
mkdir -p "${OUT}"
status=0

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi unavailable"
echo "commit: $(git rev-parse HEAD 2>/dev/null || cat .git/HEAD 2>/dev/null || echo unknown)"
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
"${PY}" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__,
'| cuda', torch.cuda.is_available())"

echo "== kernel correctness on the GPU (float64 goldens)"
# Triton compiles every tested shape once: one process needed over 120 s on an H200, eight
# pytest-xdist workers 45 s.
workers=()
"${PY}" -c "import xdist" 2>/dev/null && workers=(-n 8)
if ! timeout 150 "${PY}" -m pytest -q -p no:cacheprovider "${workers[@]}" --durations=5 \
    tests/test_kernels_lora.py tests/test_kernels_attention.py 2>&1 | tee "${OUT}/kernel_tests.log"; then
    echo "KERNEL TESTS FAILED (log: ${OUT}/kernel_tests.log)"
    status=1
fi

echo "== kernel benchmark"
if ! timeout 120 "${PY}" -m benchmarks.kernels --out "${OUT}" > "${OUT}/kernel_bench.log" 2>&1; then
    tail -n 40 "${OUT}/kernel_bench.log"
    echo "KERNEL BENCHMARK FAILED (log: ${OUT}/kernel_bench.log)"
    status=1
fi

echo "== engine throughput (SmolLM2 shapes, random weights, bf16; exits off)"
# 164 s on an H200 (c = 1 is host-bound: ~20 s a run).
if ! timeout 210 "${PY}" -m benchmarks.throughput --random-weights --concurrency 1 8 64 \
    --output-len 32 --out "${OUT}" > "${OUT}/throughput.log" 2>&1; then
    tail -n 40 "${OUT}/throughput.log"
    echo "ENGINE BENCHMARK FAILED (log: ${OUT}/throughput.log)"
    status=1
fi
cat "${OUT}/throughput.md" 2>/dev/null || echo "no engine table written"

(cd "${OUT}" && tar czf results.tgz --remove-files ./*.log ./*.csv ./*.json 2>/dev/null) || true

echo "== summary (also in ${OUT}/kernels.md)"
cat "${OUT}/kernels.md" 2>/dev/null || echo "no summary table written"
exit "${status}"
