#!/usr/bin/env bash
# Bounded GPU uptraining of SmolLM2-135M-Instruct into relaxed recursive models.
#
#   benchmarks/gpu_uptrain.sh SRC_DIR [MINUTES]
#
# SRC_DIR: the original model as a Hugging Face directory (what `loopserve pull` writes:
# config.json, model.safetensors, tokenizer files). MINUTES: training wall-clock bound per
# configuration (default 6). Runs from the repository root without installing anything
# (PYTHONPATH=.), offline. For each configuration in CONFIGS ("loops:rank", default B=3 rank 64
# and B=2 rank 128, average init): convert, uptrain with bf16 autocast on self-distilled data,
# calibrate early exits. Small results only go to ${OUT:-/tmp/out}/<config>/ (eval JSONL, curve
# PNG, summaries); checkpoints stay under ${WORK:-/tmp/uptrain_work}.
#
# Environment knobs: CONFIGS, GEN_TOKENS (self-distilled tokens, default 500000, generated once
# and shared), GEN_BATCH (512), SEQ_LEN (512), BATCH (16), LR (3e-4), EVAL_EVERY (50),
# TOKENS_PER_S (30000: sizes the cosine schedule to end near MINUTES), DEVICE (cuda; cpu for a
# dry run on a tiny model), PYTHON (python3). See benchmarks/uptrain_recipe.md.
set -euo pipefail

SRC=${1:?usage: benchmarks/gpu_uptrain.sh SRC_DIR [MINUTES]}
MINUTES=${2:-6}
OUT=${OUT:-/tmp/out}
WORK=${WORK:-/tmp/uptrain_work}
CONFIGS=${CONFIGS:-"3:64 2:128"}
GEN_TOKENS=${GEN_TOKENS:-500000}
GEN_BATCH=${GEN_BATCH:-512}
TOKENS_PER_S=${TOKENS_PER_S:-30000}
SEQ_LEN=${SEQ_LEN:-512}
BATCH=${BATCH:-16}
LR=${LR:-3e-4}
EVAL_EVERY=${EVAL_EVERY:-50}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}

export PYTHONPATH=.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

mkdir -p "$OUT" "$WORK"
{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no GPU"
    "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, \
'transformers', transformers.__version__)"
    echo "src: $SRC minutes: $MINUTES configs: $CONFIGS gen_tokens: $GEN_TOKENS"
    echo "seq_len: $SEQ_LEN batch: $BATCH lr: $LR"
} | tee "$OUT/machine.txt"

for cfg in $CONFIGS; do
    loops=${cfg%%:*}
    rank=${cfg##*:}
    name="b${loops}_r${rank}"
    mkdir -p "$OUT/$name"
    echo "=== $name: convert"
    # Library call, not `loopserve serve`: the server's imports (pydantic, fastapi) are not needed.
    "$PYTHON" -c "
import json, sys
from model.build import convert_checkpoint, result_dict
from model.config import LINEAR_MODULES
r = convert_checkpoint(sys.argv[1], sys.argv[2], loops=int(sys.argv[3]), init='average',
                       ranks=dict.fromkeys(LINEAR_MODULES, int(sys.argv[4])))
print(*r.lines(), sep='\\n')
open(sys.argv[5], 'w').write(json.dumps(result_dict(r), indent=2))
" "$SRC" "$WORK/$name/student" "$loops" "$rank" "$OUT/$name/convert.json"
    echo "=== $name: uptrain for at most $MINUTES min"
    # Cosine schedule sized to end near MINUTES at TOKENS_PER_S; the time bound stops it anyway.
    steps=$(awk -v m="$MINUTES" -v t="$TOKENS_PER_S" -v s="$SEQ_LEN" -v b="$BATCH" \
        'BEGIN { print int(m * 60 * t / (s * b)) + 1 }')
    "$PYTHON" -m training.cli uptrain \
        --student "$WORK/$name/student" --teacher "$SRC" --out "$WORK/$name/out" \
        --self-distill "$GEN_TOKENS" --self-distill-cache "$WORK/self_distill.jsonl" \
        --gen-len 256 --gen-batch "$GEN_BATCH" --seq-len "$SEQ_LEN" --batch-size "$BATCH" \
        --steps "$steps" --lr "$LR" --warmup 30 --eval-every "$EVAL_EVERY" --eval-windows 16 \
        --checkpoint-every 0 --max-minutes "$MINUTES" --device "$DEVICE" --no-progress \
        --json "$OUT/$name/uptrain_summary.json"
    cp "$WORK/$name/out/uptrain/eval.jsonl" "$OUT/$name/eval.jsonl"
    cp "$WORK/$name/out/uptrain/curve.png" "$OUT/$name/curve.png"
    echo "=== $name: calibrate"
    "$PYTHON" -m training.cli calibrate --model "$WORK/$name/out" --target 0.99 \
        --device "$DEVICE" --json "$OUT/$name/calibrate.json"
done
echo "results in $OUT"
