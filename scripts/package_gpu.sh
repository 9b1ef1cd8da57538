#!/usr/bin/env bash
# Build, here, everything a GPU run needs, into .gpu/ (git-ignored), for a device machine that has CUDA but
# no Rust toolchain. Carry `.gpu` with the run (64 MiB limit). Usage: scripts/package_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/bin
export CARGO_PROFILE_RELEASE_DEBUG=0
cargo build --release --bin bertqa
cp target/release/bertqa .gpu/bin/
# test executables and the bench, located through cargo's JSON messages
cargo test --release --no-run --message-format=json --test parity --test data_parallel 2>/dev/null |
    python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]: print(m["target"]["name"], m["executable"])' |
    while read -r name exe; do cp "$exe" ".gpu/bin/test_$name"; done
cargo bench --no-run --message-format=json --bench ops 2>/dev/null |
    python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["bench"]: print(m["executable"])' |
    while read -r exe; do cp "$exe" .gpu/bin/bench_ops; done
strip .gpu/bin/* 2>/dev/null || true
# the kernels as machine code for the device's architecture (KERNEL_ARCH, default sm_90: H100/H200), so that
# no device step spends its minutes on NVRTC (≈ 58 CPU-seconds here) or on the driver translating PTX:
# scripts/gpu_check.sh and compare_pytorch.sh give the folder as BERTQA_KERNELS. NVRTC and the CUDA headers
# from the pip wheels .ci/run installs; without them the device compiles the kernels itself, as before.
PIPDIR="${BERTQA_CUDA_PIP:-$HOME/.cache/bertqa/cuda-pip}"
if [ -e "$PIPDIR/nvidia/cu13/lib/libnvrtc.so.13" ]; then
    export BERTQA_CUDA_PIP="$PIPDIR" LD_LIBRARY_PATH="$PIPDIR/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if ! .gpu/bin/bertqa kernels --arch "${KERNEL_ARCH:-sm_90}" --out .gpu/kernels > .gpu/kernels.log 2>&1; then
    echo "warning: the kernels could not be compiled here (the device will compile them):" >&2
    tail -3 .gpu/kernels.log >&2
    rm -rf .gpu/kernels
fi
tail -1 .gpu/kernels.log; rm -f .gpu/kernels.log
# data and weights for scripts/compare_pytorch.sh: SQuAD v1.1 and all-MiniLM-L6-v2 as an f16
# BertForQuestionAnswering (the same starting file for both sides; f32 would not fit the 64 MiB transfer)
ASSETS="${BERTQA_ASSETS:-../shared/assets}"
if [ -z "${NO_DATA:-}" ] && [ -d "$ASSETS/squad-v1.1" ]; then
    mkdir -p .gpu/data
    cp "$ASSETS/squad-v1.1/train-v1.1.json" "$ASSETS/squad-v1.1/dev-v1.1.json" .gpu/data/
    chmod u+w .gpu/data/*  # (the shared assets are read-only)
    .gpu/bin/bertqa convert --model "$ASSETS/all-MiniLM-L6-v2" --output .gpu/minilm-f16 --dtype f16 --seed 42
fi
# xz, unpacked by scripts/unpack_gpu.sh on the device: at d945e59's sizes 9 MB smaller than gzip -9 (binaries
# 9.2 -> 6.6 MB, SQuAD train 8.0 -> 5.9, the f16 model 45.1 -> 40.6), which the 64 MiB transfer needs
xz -9 -T0 .gpu/bin/*
[ -d .gpu/data ] && xz -9 -T0 .gpu/data/*
[ -d .gpu/kernels ] && xz -9 -T0 .gpu/kernels/*
[ -d .gpu/minilm-f16 ] && xz -6 -T0 .gpu/minilm-f16/model.safetensors .gpu/minilm-f16/tokenizer.json
git rev-parse --short HEAD > .gpu/COMMIT 2>/dev/null || echo unknown > .gpu/COMMIT
git diff --quiet 2>/dev/null || echo "+dirty" >> .gpu/COMMIT
du -sh .gpu/*/*
du -sh .gpu
# the run tool carries the working tree (tracked and untracked-unignored files) and .gpu: 64 MiB in all.
# Over it, the device call is refused; say so here, where it can be fixed (NO_DATA=1 for a check-only call)
{ git ls-files -z; git ls-files -z --others --exclude-standard; } | python3 -c '
import os, sys
tree = sum(os.path.getsize(p) for p in sys.stdin.buffer.read().split(b"\0") if p and os.path.isfile(p))
carry = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(".gpu") for f in fs)
limit = 64 * 1024 * 1024
print(f"transfer: working tree {tree/1e6:.1f} MB + .gpu {carry/1e6:.1f} MB = {(tree+carry)/1e6:.1f} MB "
      f"of {limit/1e6:.1f} MB")
if tree + carry > limit:
    sys.exit(f"error: the transfer is over the run tool\x27s 64 MiB by {tree + carry - limit} bytes: package "
             "with NO_DATA=1 (no SQuAD/MiniLM: checks and BERT-base throughput only), or remove what is "
             "untracked in the tree")'
