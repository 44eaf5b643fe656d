#!/usr/bin/env bash
# Bounded GPU uptraining of SmolLM2-135M-Instruct into relaxed recursive models.
#
#   benchmarks/gpu_uptrain.sh SRC [MINUTES]
#
# SRC: the original model, either as a Hugging Face directory (what `loopserve pull` writes:
# config.json, model.safetensors, tokenizer files) or as the packed copy that
# `python -m benchmarks.pack_teacher pack` writes into .gpu/teacher (parts + manifest.json,
# small enough to carry to a GPU machine; see benchmarks/uptrain_recipe.md): a packed SRC is
# first rebuilt under $WORK/teacher and checked byte for byte against the source's SHA-256.
# MINUTES: training wall-clock bound per configuration (default 5). Runs from the repository
# root without installing anything (PYTHONPATH=.), offline. For each configuration in CONFIGS
# ("loops:rank", default B=3 rank 64): convert (average init, METHOD=sequential: the data-aware
# init), uptrain with bf16 autocast on self-distilled data (the exit weights ramped in over
# EXIT_WARMUP steps, the loss in LOSS_CHUNK-token chunks; NPROC > 1 runs it under torchrun),
# calibrate early exits. Small results only go to ${OUT:-/tmp/out}/<config>/ (eval JSONL,
# curve PNG, summaries with tokens/s and peak memory); checkpoints stay under
# ${WORK:-/tmp/uptrain_work}. $OUT/loss_memory.json: the loss's peak CUDA memory, reference
# against chunked, at the run's batch shape.
#
# Environment knobs: CONFIGS, METHOD (sequential | whitened | plain), GEN_TOKENS
# (self-distilled tokens, default 300000, generated once and shared), GEN_BATCH (512), SEQ_LEN
# (512), BATCH (16, global), LR (3e-4), EVAL_EVERY (50), EXIT_WARMUP (100), LOSS_CHUNK (1024),
# NPROC (1), STRATEGY (ddp | fsdp), TOKENS_PER_S (30000: sizes the cosine schedule to end near
# MINUTES), DEVICE (cuda; cpu for a dry run on a tiny model), PYTHON (python3).
set -euo pipefail

SRC=${1:?usage: benchmarks/gpu_uptrain.sh SRC [MINUTES]}
MINUTES=${2:-5}
OUT=${OUT:-/tmp/out}
WORK=${WORK:-/tmp/uptrain_work}
CONFIGS=${CONFIGS:-"3:64"}
METHOD=${METHOD:-sequential}
GEN_TOKENS=${GEN_TOKENS:-300000}
EXIT_WARMUP=${EXIT_WARMUP:-100}
LOSS_CHUNK=${LOSS_CHUNK:-1024}
NPROC=${NPROC:-1}
STRATEGY=${STRATEGY:-ddp}
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
if [ -f "$SRC/manifest.json" ]; then
    echo "=== rebuild the teacher from the packed copy in $SRC"
    "$PYTHON" -m benchmarks.pack_teacher unpack "$SRC" "$WORK/teacher" | tee "$OUT/unpack.txt"
    SRC="$WORK/teacher"
fi
{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no GPU"
    "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, \
'transformers', transformers.__version__)"
    echo "src: $SRC minutes: $MINUTES configs: $CONFIGS method: $METHOD gen_tokens: $GEN_TOKENS"
    echo "seq_len: $SEQ_LEN batch: $BATCH lr: $LR exit_warmup: $EXIT_WARMUP"
    echo "loss_chunk: $LOSS_CHUNK nproc: $NPROC strategy: $STRATEGY"
} | tee "$OUT/machine.txt"

echo "=== loss memory at batch $BATCH x $SEQ_LEN (reference vs chunked, bytes)"
"$PYTHON" -m training.loss_memory --device "$DEVICE" --batch "$BATCH" --seq "$SEQ_LEN" \
    --chunk "$LOSS_CHUNK" --json "$OUT/loss_memory.json" || echo "loss memory check failed"

LAUNCH=("$PYTHON")
if [ "$NPROC" -gt 1 ]; then
    LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC")
fi

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
                       ranks=dict.fromkeys(LINEAR_MODULES, int(sys.argv[4])), method=sys.argv[6],
                       progress=False)
print(*r.lines(), sep='\\n')
open(sys.argv[5], 'w').write(json.dumps(result_dict(r), indent=2))
" "$SRC" "$WORK/$name/student" "$loops" "$rank" "$OUT/$name/convert.json" "$METHOD"
    echo "=== $name: uptrain for at most $MINUTES min"
    # Cosine schedule sized to end near MINUTES at TOKENS_PER_S; the time bound stops it anyway.
    steps=$(awk -v m="$MINUTES" -v t="$TOKENS_PER_S" -v s="$SEQ_LEN" -v b="$BATCH" \
        'BEGIN { print int(m * 60 * t / (s * b)) + 1 }')
    "${LAUNCH[@]}" -m training.cli uptrain \
        --student "$WORK/$name/student" --teacher "$SRC" --out "$WORK/$name/out" \
        --self-distill "$GEN_TOKENS" --self-distill-cache "$WORK/self_distill.jsonl" \
        --gen-len 256 --gen-batch "$GEN_BATCH" --seq-len "$SEQ_LEN" --batch-size "$BATCH" \
        --steps "$steps" --lr "$LR" --warmup 30 --eval-every "$EVAL_EVERY" --eval-windows 16 \
        --checkpoint-every 0 --max-minutes "$MINUTES" --device "$DEVICE" --no-progress \
        --exit-warmup "$EXIT_WARMUP" --loss-chunk "$LOSS_CHUNK" --strategy "$STRATEGY" \
        --json "$OUT/$name/uptrain_summary.json"
    cp "$WORK/$name/out/uptrain/eval.jsonl" "$OUT/$name/eval.jsonl"
    cp "$WORK/$name/out/uptrain/curve.png" "$OUT/$name/curve.png"
    echo "=== $name: calibrate"
    "$PYTHON" -m training.cli calibrate --model "$WORK/$name/out" --target 0.99 \
        --device "$DEVICE" --json "$OUT/$name/calibrate.json"
done
echo "results in $OUT"
