#!/usr/bin/env bash
# A dry run of scripts/compare_pytorch.sh on the CPU (no GPU needed; the numbers mean nothing): every workload
# at tiny shapes (a 2-layer C=64 model for throughput, 40 questions / 20 dev questions of SQuAD for the fine-tune,
# seq 128, batch 4), then checks that the JSON has the documented shape and the like-for-like checks passed.
# Needs torch and transformers (pip), the shared assets, and target/release/bertqa (cargo build --release).
# About 5-10 minutes on 2 cores (torch.compile on the CPU is most of it).  Usage: scripts/smoke_compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
A="${BERTQA_ASSETS:-../shared/assets}"
S="${SMOKE_DIR:-/tmp/bertqa-smoke}"
rm -rf "$S/gpu" "$S/out" "$S/perf"; mkdir -p "$S/gpu/bin" "$S/gpu/data"
[ -x target/release/bertqa ] || cargo build --release --bin bertqa
cp target/release/bertqa "$S/gpu/bin/"
# packed as scripts/package_gpu.sh packs (xz; quicker levels), so that compare_pytorch.sh's unpacking runs too
xz -0 -T0 -c "$A/squad-v1.1/train-v1.1.json" > "$S/gpu/data/train-v1.1.json.xz"
xz -0 -T0 -c "$A/squad-v1.1/dev-v1.1.json" > "$S/gpu/data/dev-v1.1.json.xz"
"$S/gpu/bin/bertqa" convert --model "$A/all-MiniLM-L6-v2" --output "$S/gpu/minilm-f16" --dtype f16 --seed 42 --force > /dev/null
xz -0 -T0 "$S/gpu/minilm-f16/model.safetensors" "$S/gpu/bin/bertqa"
# a kernels folder as package_gpu.sh ships (machine code for sm_90; unused on the CPU): unpacked, and given
# to bertqa as BERTQA_KERNELS
mkdir -p "$S/gpu/kernels"
echo "// smoke" | xz -0 -c > "$S/gpu/kernels/dropout-sm_90-0000000000000000.ptx.xz"
echo "smoke" > "$S/gpu/COMMIT"
rc=0
GPU_DIR="$S/gpu" DATA_DIR="$S/data" OUT="$S/out" PERF_DIR="$S/perf" DEVICE=cpu PRECISION=fp32 BATCH=4 SEQ=128 DOC_STRIDE=32 \
    BASE_NAME=tiny BASE_DIMS="--hidden-size 64 --layers 2 --heads 2 --intermediate-size 128" THROUGHPUT_STEPS=4 ROUNDS=2 \
    MAX_TRAIN=40 MAX_EVAL=20 EPOCHS=1 LOCK_EXAMPLES=24 LOCK_STEPS=4 PEAK_N=256 BUDGET_S=3000 \
    WORKLOADS="${WORKLOADS:-throughput,lockstep,minilm,padding}" bash scripts/compare_pytorch.sh || rc=$?
echo "compare_pytorch.sh exit status: $rc"
[ -f "$S/gpu/kernels/dropout-sm_90-0000000000000000.ptx" ] || { echo "smoke: .gpu/kernels was not unpacked" >&2; rc=1; }
grep -q "machine code from .*gpu/kernels" "$S/out/summary.txt" 2>/dev/null ||
    { echo "smoke: compare_pytorch.sh did not give bertqa BERTQA_KERNELS ($S/out/summary.txt)" >&2; rc=1; }
python3 - "$S/perf" <<'EOF'
import glob, json, sys
files = [f for f in glob.glob(sys.argv[1] + "/*.json")]
assert len(files) == 1, files
j = json.load(open(files[0]))
print("JSON:", files[0])
for k in ("card", "driver", "commit", "workloads", "profile", "peak"):
    assert k in j, k
w = j["workloads"]
t = w["tiny-b4-t128"]
for side in ("bertqa", "transformers_eager", "transformers_compile", "transformers_eager_bf16w"):
    assert t[side]["runs"] == 2 and t[side]["seq_per_s"] > 0 and 0 < t[side]["mfu"], (side, t[side])
assert t["like_for_like_ok"], t["like_for_like"]
f = w["minilm-squad-1ep"]
assert f["like_for_like_ok"], f["like_for_like"]
for side in ("bertqa", "transformers_eager"):
    assert f[side]["f1"] is not None and f[side]["wall_s"] > 0 and f[side]["evaluations"] == 1, f[side]
p = w["minilm-squad-1ep-padding"]
assert p["bertqa_packed"]["runs"] == 1 and p["bertqa_longest"]["runs"] == 1
l = w["lockstep-minilm-fp32"]
assert l["loss_trajectories"]["max_rel_diff"] < 1e-4, l["loss_trajectories"]
print("smoke: the JSON has every workload, both sides, like-for-like checks passed; lockstep max relative loss "
      f"difference {l['loss_trajectories']['max_rel_diff']:.1e}")
EOF
exit $rc
