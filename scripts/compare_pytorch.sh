#!/usr/bin/env bash
# Side-by-side on one GPU, in one call: bertqa against Hugging Face transformers + PyTorch (scripts/hf_squad.py),
# like for like (hf_squad.py's header: the same windows, batches, loss, optimizer and step statistic), then one
# JSON file of the results (scripts/perf_json.py; schema in docs/perf/README.md).
#
# Workloads (WORKLOADS, comma-separated; default "throughput"). Expected durations on an H100/H200, from the
# previous runs' numbers (docs/perf-log.md) — not yet measured for this script:
#   (always)   peak: bf16 8192³ torch.matmul, the MFU denominator of both sides                       ~15 s
#              warm: bertqa's first runs (kernels loaded from .gpu/kernels, else compiled by NVRTC into
#              $BERTQA_CACHE), timed apart                                                            ~20 s
#   throughput BERT-base, random weights, B=32, T=384, every window full (scripts/synth_squad.py: 384 real
#              tokens, no padding on either side), bf16, THROUGHPUT_STEPS (60) steps, median step after 10
#              warm-up steps. ROUNDS (3) alternating rounds: bertqa, transformers eager, transformers +
#              torch.compile, transformers eager with bf16 weights (HF_SIDES="eager compile eager_bf16w")
#                                                                                ~4-5 min (the first compile ~1 min)
#   profile    the bench's per-kernel profile of bertqa's BERT-base step (bench_ops, defaults only)     ~1-2 min
#   lockstep   MiniLM, 640 questions, 20 steps, fp32, dropout 0: both sides' loss per step, which must agree
#              (same windows, order, loss, optimizer; max relative difference reported)                 ~1 min
#   minilm     all-MiniLM-L6-v2 fine-tuned on all of SQuAD v1.1, EPOCHS (2) epochs, lr 3e-5, batch 32,
#              384/128/64, bf16, one evaluation per epoch on both sides, for each seed of SEEDS ("42"): bertqa
#              (packed batches) then transformers eager (batches padded to their longest window, rounded up to
#              PAD_MULTIPLE = 8); windows/steps/evaluations/optimizer groups asserted equal
#                                                                                          ~4-5 min per seed
#   padding    bertqa alone, the same MiniLM fine-tune with --padding longest beside packed (packed reused
#              from minilm seed 42 when it ran in this call)                                  ~1.5-3 min
# One device call has 10 minutes: BUDGET_S (default 560) is this script's own limit; a run whose estimate
# would cross it is skipped (and said so), every run's timeout is cut to what is left of it, the throughput
# workload runs whole rounds only (every side once per round; estimates from this call's own walls after the
# first), and the JSON is rewritten after every run, so a call cut short still returns what finished. Suggested calls: WORKLOADS=throughput (after gpu_check in its own call);
# WORKLOADS=lockstep,minilm SEEDS=42; WORKLOADS=minilm SEEDS=43; WORKLOADS=minilm,padding SEEDS=44 ...
# (F1 over seeds: `scripts/perf_json.py merge docs/perf/*.json`).
#
# Expects .gpu/ from scripts/package_gpu.sh (binaries, SQuAD, minilm-f16; xz-compressed until scripts/unpack_gpu.sh). Logs and run records go to
# $OUT (default compare-out); the JSON to $PERF_DIR (default $OUT), named <date>-<HHMMSS>-<card>-<commit>-<workloads>[-seeds…].json
# (commit it under docs/perf/). Other env: OURS_FLAGS (extra bertqa train flags), BENCH_LOG (a gpu_check bench
# log to take the per-kernel profile from), the BERTQA_* kernel switches (recorded in the JSON).
# Smaller shapes, for a dry run on the CPU (the numbers mean nothing there): DEVICE=cpu PRECISION=fp32 BATCH=4
# SEQ=128 BASE_DIMS="--hidden-size 64 --layers 2 --heads 2 --intermediate-size 128" MAX_TRAIN=40 MAX_EVAL=20
# LOCK_EXAMPLES=24 LOCK_STEPS=4, GPU_DIR (a .gpu-like folder), DATA_DIR (where SQuAD is unpacked; /tmp/bertqa-data):
# scripts/smoke_compare.sh runs every workload that way.
set -uo pipefail
cd "$(dirname "$0")/.."
T_START=$(date +%s)
GPU_DIR="${GPU_DIR:-.gpu}"
bash scripts/unpack_gpu.sh "$GPU_DIR" || exit 1
OUT="${OUT:-compare-out}"; mkdir -p "$OUT/runs"
PERF_DIR="${PERF_DIR:-$OUT}"; mkdir -p "$PERF_DIR"
WORKLOADS="${WORKLOADS:-throughput}"
ROUNDS="${ROUNDS:-3}"; STEPS="${THROUGHPUT_STEPS:-60}"; SEEDS="${SEEDS:-42}"; EPOCHS="${EPOCHS:-2}"
SEEDS="${SEEDS//,/ }"; FIRST_SEED="${SEEDS%% *}"  # "42 43" or "42,43"
HF_SIDES="${HF_SIDES:-eager compile eager_bf16w}"; PAD_MULTIPLE="${PAD_MULTIPLE:-8}"; BUDGET_S="${BUDGET_S:-560}"
BIN=$GPU_DIR/bin/bertqa; MINILM=$GPU_DIR/minilm-f16
BATCH="${BATCH:-32}"; SEQ="${SEQ:-384}"; PRECISION="${PRECISION:-bf16}"; BASE_DIMS="${BASE_DIMS:-}"
DOC_STRIDE="${DOC_STRIDE:-128}"
LOCK_EXAMPLES="${LOCK_EXAMPLES:-640}"; LOCK_STEPS="${LOCK_STEPS:-20}"
# flags both sides get: the device, the subset sizes (all of SQuAD by default)
DEV_OURS=(); DEV_HF=(); SUB=(--doc-stride "$DOC_STRIDE")
[ -n "${DEVICE:-}" ] && DEV_OURS=(--device "$DEVICE") && DEV_HF=(--device "$DEVICE")
[ -n "${MAX_TRAIN:-}" ] && SUB+=(--max-train-examples "$MAX_TRAIN")
[ -n "${MAX_EVAL:-}" ] && SUB+=(--max-eval-examples "$MAX_EVAL")
HF_PREC=(); [ "$PRECISION" = fp32 ] && HF_PREC=(--fp32)
COMMIT=$(head -1 "$GPU_DIR/COMMIT" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)
grep -q dirty "$GPU_DIR/COMMIT" 2>/dev/null && COMMIT="$COMMIT-dirty"
KERNELS="$(env | grep -E '^BERTQA_(ATTN|ATTN4|GEMM|GEMM_TUNE|VEC|GRAPHS)=' | sort | tr '\n' ' ')"
D="${DATA_DIR:-/tmp/bertqa-data}"; mkdir -p "$D"
[ -f $D/train.json ] || cp "$GPU_DIR/data/train-v1.1.json" $D/train.json
[ -f $D/dev.json ] || cp "$GPU_DIR/data/dev-v1.1.json" $D/dev.json
export BERTQA_CACHE="${BERTQA_CACHE:-/tmp/bertqa-cache}" PYTHONUNBUFFERED=1
# the kernels' machine code built by scripts/package_gpu.sh: read before the cache, so nothing compiles
[ -d "$GPU_DIR/kernels" ] && export BERTQA_KERNELS="${BERTQA_KERNELS:-$(cd "$GPU_DIR/kernels" && pwd)}"
# both sides featurize on every core: transformers' fast tokenizer is parallel unless TOKENIZERS_PARALLELISM
# says otherwise (bertqa's featurization does not read it). Unset, the tokenizers library would turn its
# parallelism off by itself, with a warning, in a process forked after using it (none is: the runs that
# tokenize are eager and start no workers).
unset TOKENIZERS_PARALLELISM
PY=scripts/perf_json.py
status=0
log() { echo "$*" | tee -a "$OUT/summary.txt"; }
has() { [[ ",$WORKLOADS," == *",$1,"* ]]; }
elapsed() { echo $(( $(date +%s) - T_START )); }
fits() { # estimate_s, what: whether a run of about estimate_s seconds still fits BUDGET_S
    if [ $(( $(elapsed) + $1 )) -gt "$BUDGET_S" ]; then
        log "SKIPPED $2: ~$1 s would pass BUDGET_S=$BUDGET_S (at $(elapsed) s)"; return 1
    fi
}
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$(now)"; }
# capped T: a run's timeout cut to what is left of BUDGET_S (15 s kept for assembling): no run crosses the
# call's limit, however long it takes; prints nothing (and fails) when less than 15 s would be left
capped() {
    local left=$(( BUDGET_S - $(elapsed) - 15 ))
    [ "$left" -ge 15 ] || return 1
    echo $(( $1 < left ? $1 : left ))
}
LAST_WALL=""  # the wall seconds of the last ours/hf run ("" when it was skipped): the rounds' estimates
# ours NAME WORKLOAD SIDE ROUND SEED TIMEOUT train-flags... : one bertqa run, its record in runs/NAME.json
ours() {
    local name=$1 w=$2 side=$3 round=$4 seed=$5 t=$6; shift 6
    local dir=/tmp/ours-$name s rc; rm -rf "$dir"
    LAST_WALL=""
    t=$(capped "$t") || { log "SKIPPED $name: no time left of BUDGET_S=$BUDGET_S"; return 0; }
    s=$(now)
    timeout "$t" $BIN train --output-dir "$dir" --no-progress --save-total-limit 1 "${DEV_OURS[@]}" --doc-stride "$DOC_STRIDE" \
        "$@" ${OURS_FLAGS:-} \
        > "$OUT/$name.log" 2>&1
    rc=$?
    cp "$dir/summary.json" "$OUT/$name.summary.json" 2>/dev/null; cp "$dir/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
    python3 $PY run --kind ours --workload "$w" --side "$side" ${round:+--round $round} ${seed:+--seed $seed} \
        --wall "$(since "$s")" --rc $rc --dir "$dir" --out "$OUT/runs/$name.json" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || { status=1; tail -5 "$OUT/$name.log" | tee -a "$OUT/summary.txt"; }
    LAST_WALL=$(since "$s"); LAST_WALL=${LAST_WALL%.*}
    assemble  # the JSON after every run: a call cut short keeps what finished
}
# hf NAME WORKLOAD SIDE ROUND SEED TIMEOUT hf_squad.py-flags...
hf() {
    local name=$1 w=$2 side=$3 round=$4 seed=$5 t=$6; shift 6
    local s rc
    LAST_WALL=""
    t=$(capped "$t") || { log "SKIPPED $name: no time left of BUDGET_S=$BUDGET_S"; return 0; }
    s=$(now)
    timeout "$t" python3 scripts/hf_squad.py "${DEV_HF[@]}" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
    rc=$?
    python3 $PY run --kind hf --workload "$w" --side "$side" ${round:+--round $round} ${seed:+--seed $seed} \
        --wall "$(since "$s")" --rc $rc --stdout "$OUT/$name.out" --out "$OUT/runs/$name.json" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || { status=1; grep -v '^USDT' "$OUT/$name.err" | tail -5 | tee -a "$OUT/summary.txt"; }
    LAST_WALL=$(since "$s"); LAST_WALL=${LAST_WALL%.*}
    assemble
}
# check A B WHAT: like-for-like assertions; a mismatch fails the script (and is recorded in the JSON)
check() {
    [ -f "$OUT/runs/$1.json" ] && [ -f "$OUT/runs/$2.json" ] || return 0
    python3 $PY check "$OUT/runs/$1.json" "$OUT/runs/$2.json" --what "$3" --record "$OUT/runs/check-$1-$2.json" \
        2>&1 | tee -a "$OUT/summary.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; log "!!! LIKE-FOR-LIKE CHECK FAILED: $1 vs $2 (see above): their numbers are not comparable"; }
    assemble
}
WARM_S=""
BASE=/tmp/bertqa-base-model-$(echo "$BASE_DIMS" | md5sum | cut -c1-8)
base_model() { # the throughput model: BERT-base shapes (or BASE_DIMS), random weights, one config for both sides
    [ -f $BASE/config.json ] || $BIN init-random --tokenizer-from $MINILM --output $BASE --seed 0 --force $BASE_DIMS > /dev/null
}
assemble() {
    local p
    p=$(python3 $PY assemble --runs "$OUT/runs" --out-dir "$PERF_DIR" --peak "$OUT/peak.json" ${BENCH_LOG:+--bench "$BENCH_LOG"} \
        ${WARM_S:+--warm "$WARM_S"} --commit "$COMMIT" --kernels "${KERNELS:-defaults}" 2> "$OUT/assembled.txt")
    [ -n "$p" ] || return 0  # nothing assembled (assembled.txt says why): the previous JSON stands
    [ "$p" != "${LAST_JSON:-}" ] && [ -n "${LAST_JSON:-}" ] && rm -f "$LAST_JSON"
    LAST_JSON=$p
    if [ "$PERF_DIR" != "$OUT" ]; then  # a device call: logs next to the JSON, refreshed after every workload
        tar czf "$PERF_DIR/compare-logs.tgz" -C "$OUT" . 2>/dev/null; cp "$OUT/summary.txt" "$PERF_DIR/compare-summary.txt"
    fi
}

log "== compare_pytorch.sh: commit $COMMIT, workloads $WORKLOADS, $(date -u +%FT%TZ)"
log "bertqa kernel switches: ${KERNELS:-none (defaults)}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader 2>&1 | tee -a "$OUT/summary.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "CUDA", torch.version.cuda, "transformers", transformers.__version__)' 2>&1 | tee -a "$OUT/summary.txt"

# the peak every MFU is measured against, in this call (bounded: a hang must not take the call; a failure
# leaves every mfu null, not the call without its JSON)
timeout 120 python3 scripts/hf_squad.py --measure-peak "${DEV_HF[@]}" ${PEAK_N:+--peak-n $PEAK_N} > "$OUT/peak.out" 2> "$OUT/peak.err" \
    || log "peak measurement failed (rc $?): $(grep -v '^USDT' "$OUT/peak.err" | tail -1)"
python3 -c '
import json, sys
rec = None
for line in reversed(open(sys.argv[1], errors="replace").read().splitlines()):
    try:
        rec = json.loads(line); break
    except ValueError:
        continue
json.dump(rec if isinstance(rec, dict) else {"tflops": None, "error": "the peak measurement printed no result"},
          open(sys.argv[2], "w"))
' "$OUT/peak.out" "$OUT/peak.json"
PEAK=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tflops"] or 0)' "$OUT/peak.json" 2>/dev/null || echo 0)
log "measured peak: $PEAK TFLOP/s ($(cat "$OUT/peak.json" 2>/dev/null))"

# bertqa's first runs, so that no timed run includes loading the kernels, or compiling them where no machine
# code came with .gpu (what a bare machine pays, reported apart)
if [ -z "${NO_WARM:-}" ] && fits 90 "warm-up (NVRTC compilation)"; then
    s=$(now)
    base_model
    python3 scripts/synth_squad.py --vocab $MINILM/vocab.txt --examples 64 --max-seq-length "$SEQ" --out $D/synth-warm.json
    for m in $MINILM $BASE; do
        rm -rf /tmp/ours-warm
        timeout "$(capped 120 || echo 1)" $BIN train --model $m --train-file $D/synth-warm.json --dev-file $D/synth-warm.json --max-eval-examples 16 \
            --output-dir /tmp/ours-warm --max-steps 2 --batch-size "$BATCH" --max-seq-length "$SEQ" --precision "$PRECISION" \
            --doc-stride "$DOC_STRIDE" --no-progress "${DEV_OURS[@]}" >> "$OUT/warm.log" 2>&1 || log "warm-up run failed ($m): $(tail -1 "$OUT/warm.log")"
    done
    WARM_S=$(since "$s")
    log "warm-up (bertqa's kernels: ${BERTQA_KERNELS:+machine code from $BERTQA_KERNELS, else }NVRTC into $BERTQA_CACHE): ${WARM_S}s"
fi

if has throughput; then
    W=${BASE_NAME:-bert-base}-b$BATCH-t$SEQ
    log "== $W: ${BASE_DIMS:-BERT-base}, random weights, B=$BATCH, T=$SEQ (every token real), $PRECISION, $STEPS steps, $ROUNDS rounds"
    base_model
    SYN=$D/synth-$((STEPS * BATCH))-$SEQ.json
    [ -f $SYN ] || python3 scripts/synth_squad.py --vocab $MINILM/vocab.txt --examples $((STEPS * BATCH)) --max-seq-length "$SEQ" --out $SYN
    # whole rounds only (every side, alternating), so that each side has as many runs as the others: a round
    # starts when its estimate fits — the first round's from earlier runs' numbers, later ones from the
    # walls this call measured (torch.compile's first run compiles; later ones read its cache)
    declare -A EST=([bertqa]=40 [eager]=45 [compile]=150 [eager_bf16w]=45)
    for s in $HF_SIDES; do [ -n "${EST[$s]:-}" ] || { log "unknown HF side $s (eager, compile, eager_bf16w)"; exit 2; }; done
    for r in $(seq 1 "$ROUNDS"); do
        est=${EST[bertqa]}; for s in $HF_SIDES; do est=$(( est + EST[$s] )); done
        fits $est "$W round $r of $ROUNDS (every side: ~$est s)" || break
        ours base-ours-$r $W bertqa $r "" 180 --model $BASE --train-file $SYN \
            --epochs 1 --max-steps "$STEPS" --batch-size "$BATCH" --max-seq-length "$SEQ" --precision "$PRECISION" --log-every 1
        [ -z "$LAST_WALL" ] || EST[bertqa]=$(( LAST_WALL + 5 ))
        for s in $HF_SIDES; do
            case $s in
                eager) flags="" ;;
                compile) flags="--compile" ;;
                eager_bf16w) flags="--bf16-weights" ;;
            esac
            [ "$s" = eager_bf16w ] || flags="$flags ${HF_PREC[*]}"
            hf base-hf-$s-$r $W transformers_$s $r "" 300 --throughput \
                --config $BASE --steps "$STEPS" --batch-size "$BATCH" --max-seq-length "$SEQ" --peak-tflops "$PEAK" $flags
            [ -z "$LAST_WALL" ] || EST[$s]=$(( LAST_WALL + 5 ))
        done
    done
    for s in $HF_SIDES; do check base-ours-1 base-hf-$s-1 throughput; done
    assemble
fi

if has profile; then
    if fits 150 "profile (bench_ops)"; then
        log "== profile: bench_ops, BERT-base and MiniLM, default kernels"
        BENCH_DEFAULTS_ONLY=1 BENCH_ITERS=5 timeout "$(capped 240 || echo 1)" "$GPU_DIR/bin/bench_ops" --bench > "$OUT/bench.log" 2>&1 || status=1
        BENCH_LOG="${BENCH_LOG:-$OUT/bench.log}"
        grep -E "roofline|=> |TRAINING STEP" "$OUT/bench.log" | tee -a "$OUT/summary.txt"
        assemble
    fi
fi

if has lockstep; then
    W=lockstep-minilm-fp32
    log "== $W: all-MiniLM-L6-v2, $LOCK_EXAMPLES questions, $LOCK_STEPS steps, fp32, dropout 0: every step's loss on both sides"
    if fits 120 "$W"; then
        common=(--train-file $D/train.json --max-train-examples "$LOCK_EXAMPLES" --max-steps "$LOCK_STEPS" --batch-size "$BATCH"
                --max-seq-length "$SEQ" --doc-stride "$DOC_STRIDE" --seed 42)
        ours lock-ours $W bertqa "" 42 150 --model $MINILM "${common[@]}" --precision fp32 --hidden-dropout 0 \
            --attention-dropout 0 --log-every 1
        hf lock-hf $W transformers_eager "" 42 200 --model $MINILM "${common[@]}" --fp32 --no-dropout --epochs 2 \
            --output-dir /tmp/hf-lock
        python3 - "$OUT/runs/lock-ours.json" "$OUT/runs/lock-hf.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
a, b = (json.load(open(p))["result"] for p in sys.argv[1:])
la, lb = a.get("losses_logged", []), b.get("losses_first_20", [])
n = min(len(la), len(lb))
d = max((abs(x - y) / abs(y) for x, y in zip(la, lb)), default=float("nan"))
print(f"lockstep: first {n} losses, bertqa {[round(x, 5) for x in la[:n]]}, transformers {[round(x, 5) for x in lb[:n]]}; max relative difference {d:.2e}")
EOF
        check lock-ours lock-hf finetune
        assemble
    fi
fi

if has minilm; then
    W=minilm-squad-${EPOCHS}ep
    log "== $W: all-MiniLM-L6-v2, SQuAD v1.1, $EPOCHS epochs, $PRECISION, lr 3e-5, batch $BATCH, $SEQ/$DOC_STRIDE/64, seeds $SEEDS"
    for seed in $SEEDS; do
        fits 100 "$W bertqa seed $seed" && ours minilm-ours-$seed $W bertqa "" $seed 400 --model $MINILM \
            --train-file $D/train.json --dev-file $D/dev.json "${SUB[@]}" --epochs "$EPOCHS" --batch-size "$BATCH" \
            --max-seq-length "$SEQ" --precision "$PRECISION" --log-every 50 --seed $seed
        if fits 260 "$W transformers seed $seed"; then
            hf minilm-hf-$seed $W transformers_eager "" $seed 500 --model $MINILM --train-file $D/train.json \
                --dev-file $D/dev.json "${SUB[@]}" --epochs "$EPOCHS" --batch-size "$BATCH" --max-seq-length "$SEQ" \
                --seed $seed --pad-multiple "$PAD_MULTIPLE" --peak-tflops "$PEAK" --output-dir /tmp/hf-minilm-$seed "${HF_PREC[@]}"
            $BIN score $D/dev.json /tmp/hf-minilm-$seed/predictions.json 2>/dev/null | tail -1 \
                | sed "s/^/transformers seed $seed predictions scored by bertqa score: /" | tee -a "$OUT/summary.txt"
        fi
        check minilm-ours-$seed minilm-hf-$seed finetune
        assemble
    done
fi

if has padding; then
    W=minilm-squad-${EPOCHS}ep-padding
    log "== $W: bertqa alone, all-MiniLM-L6-v2 $EPOCHS epochs, --padding packed beside --padding longest (seed $FIRST_SEED)"
    if [ -f "$OUT/runs/minilm-ours-$FIRST_SEED.json" ]; then
        python3 - "$OUT/runs/minilm-ours-$FIRST_SEED.json" "$OUT/runs/pad-packed.json" "$W" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1])); r.update(workload=sys.argv[3], side="bertqa_packed", note="the minilm run of this call")
json.dump(r, open(sys.argv[2], "w"), indent=1)
EOF
    else
        fits 100 "$W packed" && ours pad-packed $W bertqa_packed "" $FIRST_SEED 400 --model $MINILM --train-file $D/train.json \
            --dev-file $D/dev.json "${SUB[@]}" --epochs "$EPOCHS" --batch-size "$BATCH" --max-seq-length "$SEQ" \
            --precision "$PRECISION" --log-every 50 --seed $FIRST_SEED --padding packed
    fi
    fits 120 "$W longest" && ours pad-longest $W bertqa_longest "" $FIRST_SEED 400 --model $MINILM --train-file $D/train.json \
        --dev-file $D/dev.json "${SUB[@]}" --epochs "$EPOCHS" --batch-size "$BATCH" --max-seq-length "$SEQ" \
        --precision "$PRECISION" --log-every 50 --seed $FIRST_SEED --padding longest
    assemble
fi

assemble
log "== results ($(elapsed) s): $LAST_JSON"
cat "$OUT/assembled.txt" | tee -a "$OUT/summary.txt"
[ "$PERF_DIR" != "$OUT" ] && cp "$OUT/summary.txt" "$PERF_DIR/compare-summary.txt"
exit $status
