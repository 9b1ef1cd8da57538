#!/usr/bin/env bash
# Instruction counts (SASS) of one kernels/*.cu module's kernels, without a GPU:
#   scripts/sass_count.sh MODULE [KERNEL-NAME-FILTER] [ARCH]     e.g. attention_tc tc4_forward_bf16_hs64 sm_90
# NVRTC (the pip wheel CI uses) → PTX → ptxas → cuobjdump -sass → scripts/sass_count.py. ptxas and cuobjdump
# come from the pip wheels nvidia-cuda-nvcc / nvidia-cuda-cuobjdump, installed into $SASS_TOOLS on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
MODULE="${1:?usage: sass_count.sh MODULE [FILTER] [ARCH]}"
FILTER="${2:-}"
ARCH="${3:-sm_90}"
PIPDIR="${BERTQA_CUDA_PIP:-$HOME/.cache/bertqa/cuda-pip}"
TOOLS="${SASS_TOOLS:-$HOME/.cache/bertqa/sass-tools}"
if [ ! -x "$TOOLS/nvidia/cu13/bin/ptxas" ] || [ ! -x "$TOOLS/nvidia/cu13/bin/cuobjdump" ] || [ ! -x "$TOOLS/nvidia/cu13/bin/nvdisasm" ]; then
    python3 -m pip install --quiet --no-deps --target "$TOOLS" "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-cuobjdump==13.2.*" \
        "nvidia-cuda-nvdisasm==13.2.*" >&2
fi
export LD_LIBRARY_PATH="$PIPDIR/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export BERTQA_CUDA_PIP="$PIPDIR"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cargo run --quiet --release --example ptx -- "$MODULE" "$ARCH" > "$WORK/m.ptx"
if ! "$TOOLS/nvidia/cu13/bin/ptxas" -arch="$ARCH" -O3 -v "$WORK/m.ptx" -o "$WORK/m.cubin" 2> "$WORK/ptxas.log"; then
    grep -v "^ptxas info\|bytes stack frame" "$WORK/ptxas.log" >&2
    exit 1
fi
if [ -n "$FILTER" ]; then
    grep -A3 "Compiling entry function '[^']*$FILTER" "$WORK/ptxas.log" | grep -E "Compiling|registers|spill" >&2 || true
fi
NVDISASM_PATH="$TOOLS/nvidia/cu13/bin" PATH="$TOOLS/nvidia/cu13/bin:$PATH" "$TOOLS/nvidia/cu13/bin/cuobjdump" -sass "$WORK/m.cubin" | python3 scripts/sass_count.py "$FILTER"
