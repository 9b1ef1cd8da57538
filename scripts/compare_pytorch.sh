#!/usr/bin/env bash
# Side-by-side on one GPU, in one call: bertqa against Hugging Face transformers + PyTorch (scripts/hf_squad.py).
#   (a) throughput, BERT-base shapes (random weights), batch 32, seq 384 (no padding), bf16;
#   (b) a full fine-tune of all-MiniLM-L6-v2 on SQuAD v1.1 (default 2 epochs), both sides from the same f16
#       BertForQuestionAnswering file (made by `bertqa convert`), dev EM/F1 for both.
#   (c) our MiniLM training throughput with and without dynamic padding (its effect on its own).
# Expects .gpu/ from scripts/package_gpu.sh (binaries, gzipped SQuAD, minilm-f16). Writes logs to $OUT.
# Env: EPOCHS (2), SKIP_A / SKIP_B / SKIP_C (skip a workload), PEAK_TFLOPS (measured bf16 GEMM peak; 781 on the H100 of
# docs/perf-log.md), HF_COMPILE=1 (also run the torch.compile variant of the throughput test).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/unpack_gpu.sh
OUT="${OUT:-compare-out}"; mkdir -p "$OUT"
EPOCHS="${EPOCHS:-2}"; PEAK="${PEAK_TFLOPS:-781}"
echo "bertqa kernel switches: $(env | grep -E '^BERTQA_(ATTN|ATTN4|GEMM|VEC)=' | sort | tr '\n' ' ')(none = defaults)" | tee -a "$OUT/summary.txt"
BIN=.gpu/bin/bertqa
D=/tmp/bertqa-data; mkdir -p $D
[ -f $D/train.json ] || gunzip -c .gpu/data/train-v1.1.json.gz > $D/train.json
[ -f $D/dev.json ] || gunzip -c .gpu/data/dev-v1.1.json.gz > $D/dev.json
export BERTQA_CACHE=/tmp/bertqa-cache PYTHONUNBUFFERED=1
med() { python3 -c 'import sys,json,statistics
v=[json.loads(l) for l in open(sys.argv[1]) if "seq_per_s" in l]
v=[x["seq_per_s"] for x in v[5:]] or [x["seq_per_s"] for x in v]
print(statistics.median(v))' "$1"; }
if [ -z "${SKIP_A:-}" ]; then
    echo "== (a) throughput: BERT-base, B=32, T=384, bf16" | tee -a "$OUT/summary.txt"
    $BIN init-random --tokenizer-from .gpu/minilm-f16 --output /tmp/bert-base --seed 0 > /dev/null
    rm -rf /tmp/ours-base
    timeout 240 $BIN train --model /tmp/bert-base --train-file $D/train.json --output-dir /tmp/ours-base --max-train-examples 3000 \
        --max-steps 40 --no-dynamic-padding --batch-size 32 --precision bf16 --no-progress --save-total-limit 1 > "$OUT/ours_base.log" 2>&1
    S=$(med /tmp/ours-base/metrics.jsonl)
    python3 -c "s=$S; f=212.2e9; print(f'ours  BERT-base: {s:.1f} seq/s, {s*384:.0f} tokens/s, {s*f/1e12:.1f} TFLOP/s, MFU {s*f/1e12/$PEAK*100:.1f}% of $PEAK')" | tee -a "$OUT/summary.txt"
    grep -h '"steps"' "$OUT/ours_base.log" | tail -1 >> "$OUT/summary.txt"
    timeout 240 python3 scripts/hf_squad.py --throughput --config bert-base --steps 40 --peak-tflops $PEAK 2> "$OUT/hf_base.err" | tail -1 | tee -a "$OUT/summary.txt"
    if [ -n "${HF_COMPILE:-}" ]; then
        timeout 300 python3 scripts/hf_squad.py --throughput --config bert-base --steps 40 --compile --peak-tflops $PEAK 2> "$OUT/hf_base_compile.err" | tail -1 | tee -a "$OUT/summary.txt"
    fi
fi
if [ -z "${SKIP_B:-}" ]; then
    echo "== (b) all-MiniLM-L6-v2, SQuAD v1.1, $EPOCHS epochs, bf16, lr 3e-5, batch 32, 384/128" | tee -a "$OUT/summary.txt"
    rm -rf /tmp/ours-minilm
    s=$(date +%s)
    timeout 400 $BIN train --model .gpu/minilm-f16 --train-file $D/train.json --dev-file $D/dev.json --output-dir /tmp/ours-minilm \
        --epochs $EPOCHS --precision bf16 --no-progress --save-total-limit 1 --log-every 10 ${OURS_FLAGS:-} > "$OUT/ours_minilm.log" 2>&1
    echo "ours  MiniLM: wall $(( $(date +%s) - s ))s, median $(med /tmp/ours-minilm/metrics.jsonl) seq/s; last lines:" | tee -a "$OUT/summary.txt"
    tail -2 "$OUT/ours_minilm.log" | tee -a "$OUT/summary.txt"
    cp /tmp/ours-minilm/metrics.jsonl "$OUT/ours_minilm_metrics.jsonl" 2>/dev/null
    s=$(date +%s)
    timeout 400 python3 scripts/hf_squad.py --model .gpu/minilm-f16 --train-file $D/train.json --dev-file $D/dev.json --epochs $EPOCHS \
        --output-dir /tmp/hf-minilm --peak-tflops $PEAK 2> "$OUT/hf_minilm.err" | tail -1 | tee -a "$OUT/summary.txt"
    echo "hf    MiniLM: wall $(( $(date +%s) - s ))s" | tee -a "$OUT/summary.txt"
    $BIN score $D/dev.json /tmp/hf-minilm/predictions.json 2>/dev/null | sed 's/^/hf predictions scored by bertqa score: /' | tee -a "$OUT/summary.txt"
fi
if [ -z "${SKIP_C:-}" ]; then
    # (c) what dynamic padding (batches trimmed to their longest window, rounded up to 64) is worth on its own:
    # the same MiniLM training, 300 steps, with and without it (both sides of (b) use it, so the comparison
    # stays fair; this separates its effect from the kernels')
    echo "== (c) dynamic padding on/off: all-MiniLM-L6-v2, 300 steps, batch 32, 384/128, bf16" | tee -a "$OUT/summary.txt"
    for pad in on off; do
        flag=""; [ $pad = off ] && flag="--no-dynamic-padding"
        rm -rf /tmp/ours-pad
        timeout 240 $BIN train --model .gpu/minilm-f16 --train-file $D/train.json --output-dir /tmp/ours-pad --max-steps 300 \
            --precision bf16 --no-progress --save-total-limit 1 --log-every 10 $flag > "$OUT/ours_pad_$pad.log" 2>&1
        echo "ours  MiniLM dynamic padding $pad: median $(med /tmp/ours-pad/metrics.jsonl) seq/s" | tee -a "$OUT/summary.txt"
    done
fi
cat "$OUT/summary.txt"
