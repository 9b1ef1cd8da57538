#!/usr/bin/env bash
# Everything one device call does (the lease is short): scripts/gpu_check.sh (parity + bench), then
# scripts/compare_pytorch.sh (bertqa vs transformers). If the tensor-core attention (variant 3) fails parity,
# the comparison runs with BERTQA_ATTN=v1. Returns summary.txt and logs.tgz in $OUT (the tool brings back at
# most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL="${OUT:-device-out}"; mkdir -p "$FINAL"
W=/tmp/run-logs; rm -rf $W; mkdir -p $W
OUT=$W/check BENCH_ITERS="${BENCH_ITERS:-10}" bash scripts/gpu_check.sh > $W/check.out 2>&1
tail -120 $W/check.out
cp $W/check/summary.txt "$FINAL/summary.txt"
tar czf "$FINAL/logs.tgz" -C $W . 2>/dev/null  # refreshed at the end; here in case the call is cut short
if grep -q "parity_bf16: rc=0" $W/check/summary.txt; then
    echo "attention variant 3 (default) passed bf16 parity: comparing with it"
else
    echo "tensor-core attention failed bf16 parity: comparing with BERTQA_ATTN=v1"
    export BERTQA_ATTN=v1
fi
OUT="$FINAL/cmp" bash scripts/compare_pytorch.sh > $W/compare.out 2>&1  # results land as they come
tail -60 $W/compare.out
cat $W/check/summary.txt "$FINAL/cmp/summary.txt" > "$FINAL/summary.txt" 2>/dev/null
tar czf "$FINAL/logs.tgz" -C $W . 2>/dev/null
ls -la "$FINAL"
