#!/usr/bin/env bash
# One device call (10 minutes at most): scripts/gpu_check.sh (parity + bench), then scripts/compare_pytorch.sh
# (bertqa vs transformers, like for like) with the fastest configuration that passed parity, then one JSON file
# of the results, <date>-<HHMMSS>-<card>-<commit>-<workloads>[-seeds…].json (schema: docs/perf/README.md; commit it under
# docs/perf/). gpu_check takes ~6-8 minutes, so one call does one of:
#   bash scripts/device_run.sh                                  gpu_check, then compare while BUDGET_S allows
#                                                               (usually nothing more: the JSON then has the
#                                                               bench's profile and roofline only)
#   SKIP_CHECK=1 WORKLOADS=throughput bash scripts/device_run.sh              ~5-6 min (3 alternating rounds)
#   SKIP_CHECK=1 WORKLOADS=lockstep,minilm SEEDS=42 bash scripts/device_run.sh  ~6 min
#   SKIP_CHECK=1 WORKLOADS=minilm,padding SEEDS=43 bash scripts/device_run.sh   ~7 min
# (durations from earlier runs' numbers, not yet measured for these scripts). SKIP_CHECK=1: compare with the
# BERTQA_* switches as given (gpu_check ran in an earlier call); SKIP_COMPARE=1: gpu_check alone. BUDGET_S
# (default 570): the whole call's limit, passed on to compare_pytorch.sh, which skips runs that would cross it.
# Returns in $OUT (the tool brings back few files): summary.txt, logs.tgz (gpu_check), compare-summary.txt,
# compare-logs.tgz, and the JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
FINAL="${OUT:-device-out}"; mkdir -p "$FINAL"
W=/tmp/run-logs; rm -rf $W; mkdir -p $W
BUDGET="${BUDGET_S:-570}"
if [ -n "${SKIP_CHECK:-}" ]; then
    mkdir -p $W/check; echo "gpu_check skipped (SKIP_CHECK)" > $W/check/summary.txt
else
    # gpu_check stops starting steps 40 s before the budget and keeps $FINAL's summary.txt and logs.tgz current
    OUT=$W/check LIVE_DIR="$FINAL" DEADLINE_S=$(( BUDGET - 40 - ($(date +%s) - T0) )) BENCH_ITERS="${BENCH_ITERS:-10}" \
        bash scripts/gpu_check.sh > $W/check.out 2>&1
    CHECK_RC=$?
    tail -120 $W/check.out
fi
cp $W/check/summary.txt "$FINAL/summary.txt"
tar czf "$FINAL/logs.tgz" -C $W . 2>/dev/null  # refreshed at the end; here in case the call is cut short
if grep -q "^-- unpack: rc=1" $W/check/summary.txt 2>/dev/null; then
    echo "device_run.sh: .gpu could not be unpacked (summary.txt): nothing else can run"
    exit 1
fi
ok() { grep -q "$1: rc=0" $W/check/summary.txt; }
if [ -n "${SKIP_CHECK:-}" ] || [ -n "${SKIP_PARITY:-}" ]; then
    echo "comparing with the switches given: $(env | grep -E '^BERTQA_(ATTN|ATTN4|GEMM|VEC|GRAPHS)=' | tr '\n' ' ')"
elif ok parity_bf16_next && ok parity_f32_next && ok attn_variants; then
    # attention: variant 6 where it passed op by op (attn_wgmma, after the probe) and in a whole training step
    # (parity_bf16_v6; the bench rows of this call say whether it is the fastest), else variant 4, whose whole
    # step parity_*_next checked
    A=v4; ok wgmma_probe && ok attn_wgmma && ok parity_bf16_v6 && A=v6
    echo "the opt-in paths passed parity: comparing with BERTQA_ATTN=$A BERTQA_GEMM=lt BERTQA_VEC=1"
    export BERTQA_ATTN=$A BERTQA_GEMM=lt BERTQA_VEC=1
    # CUDA graphs: only where they were checked with this attention variant
    G=graphs_exact_next; [ "$A" = v6 ] && G=graphs_exact_v6
    if ok $G; then
        echo "CUDA graphs passed too ($G): comparing with BERTQA_GRAPHS=1"
        export BERTQA_GRAPHS=1
    fi
elif ok parity_bf16; then
    echo "attention variant 3 (default) passed bf16 parity: comparing with the defaults"
else
    echo "tensor-core attention failed bf16 parity: comparing with BERTQA_ATTN=v1"
    export BERTQA_ATTN=v1
fi
# the bench log of this call (if gpu_check ran) gives the JSON its per-kernel profile and roofline
[ -f $W/check/bench.log ] && export BENCH_LOG=$W/check/bench.log
LEFT=$(( BUDGET - ($(date +%s) - T0) ))
if [ -n "${SKIP_COMPARE:-}" ]; then
    WORKLOADS=none
fi
# compare_pytorch.sh always measures the peak and warms the kernels (~40 s): with less left, only assemble
if [ "${WORKLOADS:-throughput}" != none ] && [ "$LEFT" -gt 120 ]; then
    OUT=$W/cmp PERF_DIR="$FINAL" BUDGET_S=$LEFT bash scripts/compare_pytorch.sh > $W/compare.out 2>&1
    CMP_RC=$?
    tail -60 $W/compare.out
else
    echo "no comparison in this call (${SKIP_COMPARE:+SKIP_COMPARE, }$LEFT s left of BUDGET_S=$BUDGET)"
    mkdir -p $W/cmp/runs
    # no comparison ran: the JSON holds the bench's numbers, whose profile is of the default kernels (the opt-in
    # paths' step rows are in bench_steps, by label) — not of the switches exported above for a comparison
    python3 scripts/perf_json.py assemble --runs $W/cmp/runs --out-dir "$FINAL" ${BENCH_LOG:+--bench "$BENCH_LOG"} \
        --commit "$(head -1 .gpu/COMMIT 2>/dev/null || echo unknown)$(grep -q dirty .gpu/COMMIT 2>/dev/null && echo -dirty)" \
        --kernels "defaults (the profile); the opt-in paths by label in bench_steps" 2>&1
fi
cat $W/check/summary.txt "$FINAL/compare-summary.txt" > "$FINAL/summary.txt" 2>/dev/null
tar czf "$FINAL/logs.tgz" -C $W . 2>/dev/null
ls -la "$FINAL"
# the call's status: non-zero when a gpu_check step failed (a step not run for lack of time is not a failure)
# or the comparison did (the files above say which)
FAILED=$(grep -E "^-- [a-z0-9_]+: rc=[1-9]" $W/check/summary.txt 2>/dev/null | grep -vc "not run" || true)
echo "gpu_check: ${FAILED:-0} step(s) failed (rc ${CHECK_RC:-skipped}); compare rc ${CMP_RC:-not run}"
exit $(( ${FAILED:-0} != 0 || ${CMP_RC:-0} != 0 ))
