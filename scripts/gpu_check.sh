#!/usr/bin/env bash
# One prepared GPU run (≤ 8 minutes; DEADLINE_S bounds it): device facts, the GPU parity tests (every kernel and a whole training
# step against the CPU reference, f32 and bf16; the attention variants; the opt-in paths BERTQA_ATTN=v4,
# BERTQA_GEMM=lt and BERTQA_VEC=1; CUDA graphs: gpu_cuda_graphs_replay_what_runs, with the defaults and with
# the opt-in paths; the wgmma probe and attention variants 5 and 6), then the kernel/step benchmark (which also times the opt-in paths), then, with the time left, variant 6 in a whole training step and under CUDA graphs (parity_bf16_v6, graphs_exact_v6: what device_run.sh requires before comparing with it). Expects the binaries built by
# scripts/package_gpu.sh in .gpu/bin (carry `.gpu`). Writes logs to $OUT (or ./gpu-out) and prints a summary.
# DEADLINE_S (seconds from this script's start; default 540, under one device call's 600 s; "none" for none): no
# step starts after it, and each step's timeout is cut to what is left, so that a device call's limit never
# kills this script mid-way (its steps' own limits add up to ~1,700 s). LIVE_DIR (a folder;
# default none): refreshed after every step with summary.txt and logs.tgz (what has run so far), so that a call
# cut short anyway still brings back the finished steps' logs.
set -uo pipefail
cd "$(dirname "$0")/.."
T0_CHECK=$(date +%s)
DEADLINE_S="${DEADLINE_S-540}"
[ "$DEADLINE_S" = none ] && DEADLINE_S=
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
if ! bash scripts/unpack_gpu.sh > "$OUT/unpack.log" 2>&1; then
    # a summary that says so: scripts/device_run.sh counts the failed steps from it
    { cat "$OUT/unpack.log"; echo "-- unpack: rc=1"; } | tee "$OUT/summary.txt"
    [ -n "${LIVE_DIR:-}" ] && mkdir -p "$LIVE_DIR" && cp "$OUT/summary.txt" "$LIVE_DIR/summary.txt"
    exit 1
fi
export BERTQA_CACHE="${BERTQA_CACHE:-/tmp/bertqa-cache}"
# the kernels' machine code built by scripts/package_gpu.sh (bertqa kernels --out): read before the cache,
# so that no step compiles (without the folder, the first step to use a module compiles it into the cache)
[ -d .gpu/kernels ] && export BERTQA_KERNELS="${BERTQA_KERNELS:-$PWD/.gpu/kernels}"
export RUST_BACKTRACE=1
echo "== commit $(cat .gpu/COMMIT 2>/dev/null | tr '\n' ' ')  $(date -u +%FT%TZ)" | tee "$OUT/summary.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1 | tee -a "$OUT/summary.txt"
ls /usr/local/cuda/include/cuda_bf16.h >/dev/null 2>&1 || echo "WARNING: no /usr/local/cuda/include (set BERTQA_CUDA_INCLUDE)" | tee -a "$OUT/summary.txt"
status=0
live() { # the logs so far into LIVE_DIR, each file replaced whole (a kill mid-copy leaves the previous one)
    [ -n "${LIVE_DIR:-}" ] || return 0
    mkdir -p "$LIVE_DIR" || return 0
    cp "$OUT/summary.txt" "$LIVE_DIR/.summary.tmp" && mv -f "$LIVE_DIR/.summary.tmp" "$LIVE_DIR/summary.txt"
    tar czf "$LIVE_DIR/.logs.tmp" -C "$OUT" . 2>/dev/null && mv -f "$LIVE_DIR/.logs.tmp" "$LIVE_DIR/logs.tgz"
    return 0
}
run() { # name, timeout, command...
    local name=$1 t=$2; shift 2
    live  # with the previous step's summary lines, written after its run returned
    rm -f "$OUT/$name.log"  # a step not run must not leave an earlier call's log behind
    local s=$(date +%s)
    if [ -n "${DEADLINE_S:-}" ]; then
        # 10 s kept for the kill that follows an ignored SIGTERM (timeout -k)
        local left=$(( DEADLINE_S - (s - T0_CHECK) - 10 ))
        if [ "$left" -lt 20 ]; then
            echo "-- $name: rc=124 (not run: ${left}s left of DEADLINE_S=$DEADLINE_S)" | tee -a "$OUT/summary.txt"
            status=1; live; return 124
        fi
        [ "$left" -lt "$t" ] && t=$left
    fi
    timeout -k 10 "$t" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "-- $name: rc=$rc ($(( $(date +%s) - s ))s, limit ${t}s)" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || status=1
    live
    return $rc
}
# every kernel module loaded on the GPU as a run loads it, saying what was loaded: machine code from
# .gpu/kernels (nothing compiles), the PTX where the driver refused that (named), or, without .gpu/kernels,
# compiled now into the cache for the steps below
run kernels 150 .gpu/bin/bertqa kernels
grep -E "refused|PTX|compiled now|module\(s\)|error" "$OUT/kernels.log" | head -8 | tee -a "$OUT/summary.txt"
if [ -z "${SKIP_PARITY:-}" ]; then
run parity_f32 120 .gpu/bin/test_parity --exact gpu_parity_f32 --nocapture --test-threads 1
grep -E "FAIL|SKIPPED|panicked|test result" "$OUT/parity_f32.log" 2>/dev/null | head -20 | tee -a "$OUT/summary.txt"
run parity_bf16 120 .gpu/bin/test_parity --exact gpu_parity_bf16 --nocapture --test-threads 1
grep -E "FAIL|SKIPPED|panicked|test result" "$OUT/parity_bf16.log" | head -20 | tee -a "$OUT/summary.txt"
# every tensor-core attention variant and variant 4's three backward shapes, op by op (T=37 and T=203)
run attn_variants 120 .gpu/bin/test_parity --exact gpu_attention_variants_bf16 --nocapture --test-threads 1
grep -E "FAIL|SKIPPED|panicked|test result" "$OUT/attn_variants.log" | head -20 | tee -a "$OUT/summary.txt"
# the whole suite (incl. a training step) with every opt-in path on: attention v4, cuBLASLt, the vec kernels
# (the f32 run covers the vec kernels' f32 instances and cuBLASLt's fall-back for f32)
for dt in bf16 f32; do
    BERTQA_ATTN=v4 BERTQA_GEMM=lt BERTQA_VEC=1 run parity_${dt}_next 120 .gpu/bin/test_parity --exact gpu_parity_$dt --nocapture --test-threads 1
    grep -E "FAIL|SKIPPED|panicked|cuBLASLt|test result" "$OUT/parity_${dt}_next.log" | head -20 | tee -a "$OUT/summary.txt"
done
# CUDA graphs (--cuda-graphs on): replays against running the ops on one backend — losses bit for bit,
# gradients within 1e-5 — with the default kernels and with every opt-in path (running the ops is what the
# parity runs above compare with the CPU)
run graphs_exact 120 .gpu/bin/test_parity --exact gpu_cuda_graphs_replay_what_runs --nocapture --test-threads 1
grep -E "FAIL|SKIPPED|panicked|CUDA graphs:|test result" "$OUT/graphs_exact.log" | head -20 | tee -a "$OUT/summary.txt"
BERTQA_ATTN=v4 BERTQA_GEMM=lt BERTQA_VEC=1 run graphs_exact_next 120 .gpu/bin/test_parity --exact gpu_cuda_graphs_replay_what_runs --nocapture --test-threads 1
grep -E "FAIL|SKIPPED|panicked|CUDA graphs:|test result" "$OUT/graphs_exact_next.log" | head -20 | tee -a "$OUT/summary.txt"
if ! grep -q "graphs_exact: rc=0" "$OUT/summary.txt" || ! grep -q "graphs_exact_next: rc=0" "$OUT/summary.txt"; then
    export BENCH_NO_GRAPHS=1
    echo "CUDA graphs did not pass (failed, or not run): the bench leaves them out" | tee -a "$OUT/summary.txt"
fi
# a fault surfaces at the next synchronisation, far from the kernel: rerun a failed attention-variants test
# synchronising after every launch, so that its error names the kernel
if ! grep -q "attn_variants: rc=0" "$OUT/summary.txt"; then
    BERTQA_SYNC_LAUNCH=1 run attn_variants_sync 120 .gpu/bin/test_parity --exact gpu_attention_variants_bf16 --nocapture --test-threads 1
    grep -E "FAIL|panicked|failed|test result" "$OUT/attn_variants_sync.log" | head -20 | tee -a "$OUT/summary.txt"
fi
# wgmma (sm_90a) on the hardware against the emulator's reading of the PTX ISA (after the steps above, so that a
# slow or hung wgmma run cannot keep them from starting): the probe cases bit for bit
run wgmma_probe 45 .gpu/bin/test_parity --exact gpu_wgmma_probe --nocapture --test-threads 1
grep -E "wgmma probe:|differ|SKIPPED|panicked|test result" "$OUT/wgmma_probe.log" | head -20 | tee -a "$OUT/summary.txt"
# attention variants 5 and 6 (wgmma; sm_90), the same cases as attn_variants (expected ~30-60 s, limited so
# that the bench keeps its time); the bench leaves them out unless both this and the probe passed
run attn_wgmma 90 .gpu/bin/test_parity --exact gpu_attention_wgmma_bf16 --nocapture --test-threads 1
grep -E "FAIL|SKIPPED|panicked|test result" "$OUT/attn_wgmma.log" | head -20 | tee -a "$OUT/summary.txt"
if ! grep -q "wgmma_probe: rc=0" "$OUT/summary.txt" || ! grep -q "attn_wgmma: rc=0" "$OUT/summary.txt"; then
    export BENCH_NO_WGMMA=1
    echo "the wgmma probe or variants 5/6 did not pass (failed, or not run): the bench leaves them out" | tee -a "$OUT/summary.txt"
fi
# a failed (or hung) opt-in path is not timed: the bench then runs the defaults only
if ! grep -q "attn_variants: rc=0" "$OUT/summary.txt" || ! grep -q "parity_bf16_next: rc=0" "$OUT/summary.txt" \
    || ! grep -q "parity_f32_next: rc=0" "$OUT/summary.txt"; then
    export BENCH_DEFAULTS_ONLY=1
    echo "opt-in paths did not pass parity (failed, or not run): bench runs the defaults only" | tee -a "$OUT/summary.txt"
fi
fi
# data parallelism through NCCL with one rank: the same losses as the plain path, and the all-reduce timed
# (needs libnccl: torch's pip wheel nvidia-nccl-cu13 is linked as libnccl.so for cudarc)
NCCL2=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null || true)
if [ -n "$NCCL2" ] && [ -f "$NCCL2" ]; then mkdir -p /tmp/nccl-link && ln -sf "$NCCL2" /tmp/nccl-link/libnccl.so; fi
LD_LIBRARY_PATH="/tmp/nccl-link${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" run nccl_one_rank 120 .gpu/bin/test_data_parallel --exact gpu_nccl_one_rank_matches_the_plain_path --nocapture --test-threads 1
grep -E "SKIPPED|panicked|all-reduce|test result" "$OUT/nccl_one_rank.log" | head -20 | tee -a "$OUT/summary.txt"
# the bench's rows on real SQuAD windows (padding layouts, CUDA graphs) read SQuAD and MiniLM's tokenizer from
# an assets folder; ../shared does not travel: make one from what package_gpu.sh packed
if [ -z "${BERTQA_ASSETS:-}" ] && [ -f .gpu/data/train-v1.1.json ] && [ -d .gpu/minilm-f16 ]; then
    A=/tmp/bertqa-assets; mkdir -p $A/squad-v1.1
    ln -sf "$(pwd)/.gpu/data/train-v1.1.json" $A/squad-v1.1/train-v1.1.json
    ln -sfn "$(pwd)/.gpu/minilm-f16" $A/all-MiniLM-L6-v2
    export BERTQA_ASSETS=$A
fi
BENCH_ITERS="${BENCH_ITERS:-10}" run bench "${BENCH_TIMEOUT:-240}" .gpu/bin/bench_ops --bench
cat "$OUT/bench.log" | tee -a "$OUT/summary.txt" | tail -80
# last, with what time is left (after the bench, which it must not crowd out): variant 6 in a whole training
# step and under CUDA graphs, with the other opt-in paths — what scripts/device_run.sh requires before it
# compares with v6 (the steps above checked v6 op by op only, and the whole step with v4)
if [ -z "${SKIP_PARITY:-}" ] && grep -q "wgmma_probe: rc=0" "$OUT/summary.txt" && grep -q "attn_wgmma: rc=0" "$OUT/summary.txt"; then
    BERTQA_ATTN=v6 BERTQA_GEMM=lt BERTQA_VEC=1 run parity_bf16_v6 120 .gpu/bin/test_parity --exact gpu_parity_bf16 --nocapture --test-threads 1
    grep -E "FAIL|SKIPPED|panicked|cuBLASLt|test result" "$OUT/parity_bf16_v6.log" 2>/dev/null | head -20 | tee -a "$OUT/summary.txt"
    BERTQA_ATTN=v6 BERTQA_GEMM=lt BERTQA_VEC=1 run graphs_exact_v6 120 .gpu/bin/test_parity --exact gpu_cuda_graphs_replay_what_runs --nocapture --test-threads 1
    grep -E "FAIL|SKIPPED|panicked|CUDA graphs:|test result" "$OUT/graphs_exact_v6.log" 2>/dev/null | head -20 | tee -a "$OUT/summary.txt"
fi
live
exit $status
