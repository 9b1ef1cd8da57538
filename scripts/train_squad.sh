#!/usr/bin/env bash
# One-command SQuAD v1.1 fine-tune, then evaluation on the dev set. Prints the dev EM/F1 JSON as the last line.
#
#   scripts/train_squad.sh [MODEL_DIR] [OUTPUT_DIR] [--full] [extra bertqa train flags...]
#
# Recipe: with a GPU, the standard hyperparameters (2 epochs, lr 3e-5, batch 32, max_seq_length 384,
# doc_stride 128) on all of SQuAD v1.1. Without a GPU that would take about 16 hours, so unless a size flag is
# given (--max-train-examples, --max-steps, --max-seq-length, --epochs, --max-eval-examples) or --full, the
# CPU-sized recipe runs instead (2,000 training questions, max_seq_length 256, doc_stride 96, lr 5e-5, 500
# dev questions; about half an hour on 2 cores) and says so.
#
# Data and model are looked up in this order:
#   SQUAD_DIR (holding train-v1.1.json, dev-v1.1.json)   else $BERTQA_ASSETS/squad-v1.1   else ../shared/assets/squad-v1.1
#   MODEL_DIR argument or $BERTQA_MODEL                    else $BERTQA_ASSETS/all-MiniLM-L6-v2  else ../shared/assets/all-MiniLM-L6-v2
# Missing pieces are downloaded where a network exists (SQuAD from its official URL, the model from the
# Hugging Face hub at the pinned revision 1110a243) into $BERTQA_ASSETS (default ../shared/assets where it
# exists, else ./assets); the SQuAD files and model.safetensors are checked against pinned sha256 sums, the
# small config and tokenizer files are not.
# On a GPU machine without the CUDA toolkit headers (a driver-only image), the NVRTC and CUDA-runtime pip
# wheels are installed into ~/.cache/bertqa/cuda-pip (as .ci/run does) so the kernels can be compiled.
# BERTQA_TRAIN_DRY_RUN=1 prints the header directory and the `bertqa train` command instead of running them;
# BERTQA_ASSUME_GPU=1|0 overrides the GPU detection (both for tests/script.rs).
# A MODEL_DIR given (argument or $BERTQA_MODEL) must hold a model (config.json): only the default one is
# downloaded. Relative paths (MODEL_DIR, OUTPUT_DIR, SQUAD_DIR, BERTQA_ASSETS, BERTQA_MODEL) are the caller's;
# the default OUTPUT_DIR is runs/squad-YYYYmmdd-HHMMSS in this repository.
# Logs: OUTPUT_DIR.train.log (stdout), OUTPUT_DIR.stderr.log (progress and messages), OUTPUT_DIR.metrics.json.
set -euo pipefail
CALLER=$(pwd)
abs() { case "$1" in /*|"") printf '%s' "$1" ;; *) printf '%s' "$CALLER/$1" ;; esac; }
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEFAULT_ASSETS="$ROOT/../shared/assets"
[ -d "$DEFAULT_ASSETS" ] || DEFAULT_ASSETS="$ROOT/assets"
ASSETS=$(abs "${BERTQA_ASSETS:-$DEFAULT_ASSETS}")
GIVEN_MODEL=$(abs "${1:-${BERTQA_MODEL:-}}")
MODEL="${GIVEN_MODEL:-$ASSETS/all-MiniLM-L6-v2}"
if [ -n "${2:-}" ]; then OUT=$(abs "$2"); else OUT="$ROOT/runs/squad-$(date +%Y%m%d-%H%M%S)"; fi
shift $(( $# > 2 ? 2 : $# )) || true
SQUAD=$(abs "${SQUAD_DIR:-$ASSETS/squad-v1.1}")
if [ -n "$GIVEN_MODEL" ] && [ ! -f "$GIVEN_MODEL/config.json" ]; then
    echo "error: MODEL_DIR $GIVEN_MODEL holds no config.json (not a model directory); give an HF BERT directory," \
         "or \"\" for all-MiniLM-L6-v2 from the assets" >&2
    exit 2
fi

# --full is ours; everything else goes to `bertqa train`
FULL=""
SIZED=""
ARGS=()
for a in "$@"; do
    case "$a" in
        --full) FULL=1 ;;
        --max-train-examples|--max-train-examples=*|--max-steps|--max-steps=*|--max-seq-length|--max-seq-length=*|\
        --epochs|--epochs=*|--max-eval-examples|--max-eval-examples=*) SIZED=1; ARGS+=("$a") ;;
        *) ARGS+=("$a") ;;
    esac
done

# pinned checksums (official SQuAD v1.1; sentence-transformers/all-MiniLM-L6-v2 revision 1110a243)
SHA_TRAIN=3527663986b8295af4f7fcdff1ba1ff3f72d07d61a20f487cb238a6ef92fd955
SHA_DEV=95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9
SHA_MINILM=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db

fetch() { # url dest sha256
    local url=$1 dest=$2 sum=$3
    if [ -f "$dest" ] && echo "$sum  $dest" | sha256sum -c --quiet 2>/dev/null; then return 0; fi
    mkdir -p "$(dirname "$dest")"
    echo "downloading $url" >&2
    if ! curl -fsSL --retry 3 -o "$dest.part" "$url"; then
        rm -f "$dest.part"
        echo "error: cannot download $url (no network?). Put the file at $dest, or set BERTQA_ASSETS / SQUAD_DIR / BERTQA_MODEL." >&2
        exit 1
    fi
    echo "$sum  $dest.part" | sha256sum -c --quiet || { echo "error: checksum mismatch for $url" >&2; rm -f "$dest.part"; exit 1; }
    mv "$dest.part" "$dest"
}

if [ ! -f "$SQUAD/train-v1.1.json" ] || [ ! -f "$SQUAD/dev-v1.1.json" ]; then
    SQUAD="$ASSETS/squad-v1.1"
    fetch https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json "$SQUAD/train-v1.1.json" $SHA_TRAIN
    fetch https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json "$SQUAD/dev-v1.1.json" $SHA_DEV
fi
if [ ! -f "$MODEL/config.json" ]; then
    MODEL="$ASSETS/all-MiniLM-L6-v2"
    HUB=https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2/resolve/1110a243
    fetch $HUB/model.safetensors "$MODEL/model.safetensors" $SHA_MINILM
    for f in config.json tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json; do
        [ -f "$MODEL/$f" ] || curl -fsSL -o "$MODEL/$f" "$HUB/$f"
    done
fi

# CARGO_TARGET_DIR is resolved where cargo runs: the repository (below)
case "${CARGO_TARGET_DIR:-}" in /*) TGT=$CARGO_TARGET_DIR ;; "") TGT=$ROOT/target ;; *) TGT=$ROOT/$CARGO_TARGET_DIR ;; esac
BIN="$TGT/release/bertqa"

GPU=""
if [ -e /dev/nvidia0 ] || nvidia-smi -L >/dev/null 2>&1; then GPU=1; fi
case "${BERTQA_ASSUME_GPU:-}" in 1) GPU=1 ;; 0) GPU="" ;; esac  # for tests/script.rs
RECIPE=(--epochs 2 --learning-rate 3e-5 --batch-size 32 --max-seq-length 384 --doc-stride 128)
if [ -z "$GPU" ] && [ -z "$FULL" ] && [ -z "$SIZED" ]; then
    echo "bertqa: no GPU found — running the CPU-sized recipe (2,000 training questions, max_seq_length 256, 500 dev" \
         "questions; about 30 minutes on 2 cores). The standard recipe on the CPU takes about 16 hours: add --full to run it." >&2
    RECIPE+=(--max-train-examples 2000 --max-seq-length 256 --doc-stride 96 --max-eval-examples 500 --learning-rate 5e-5)
elif [ -z "$GPU" ]; then
    echo "bertqa: no GPU found — training on the CPU" >&2
fi
if [ -n "$GPU" ]; then
    # NVRTC compiles the kernels at run time and needs cuda_bf16.h (CUDA toolkit headers) and libnvrtc: on a
    # driver-only machine, install the pip wheels that carry both (the same ones .ci/run uses).
    HEADERS=""
    for d in "${BERTQA_CUDA_INCLUDE:-}" "${CUDA_HOME:+$CUDA_HOME/include}" "${CUDA_PATH:+$CUDA_PATH/include}" /usr/local/cuda/include \
             "${BERTQA_CUDA_PIP:+$BERTQA_CUDA_PIP/nvidia/cu13/include}"; do
        if [ -n "$d" ] && [ -f "$d/cuda_bf16.h" ]; then HEADERS=$d; break; fi
    done
    if [ -z "$HEADERS" ]; then
        PIPDIR="${BERTQA_CUDA_PIP:-$HOME/.cache/bertqa/cuda-pip}"
        if [ -n "${BERTQA_TRAIN_DRY_RUN:-}" ]; then
            echo "bertqa: no CUDA toolkit headers found: would install the CUDA pip wheels into $PIPDIR" >&2
        elif [ ! -f "$PIPDIR/nvidia/cu13/include/cuda_bf16.h" ]; then
            echo "bertqa: no CUDA toolkit headers found: installing the NVRTC and CUDA-runtime pip wheels into $PIPDIR" >&2
            python3 -m pip install --quiet --disable-pip-version-check --target "$PIPDIR" \
                "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*" ||
                { echo "error: could not install the CUDA pip wheels; install the CUDA 13 toolkit or set BERTQA_CUDA_INCLUDE" >&2; exit 1; }
        fi
        HEADERS="$PIPDIR/nvidia/cu13/include"
        export BERTQA_CUDA_PIP="$PIPDIR"
        export LD_LIBRARY_PATH="$PIPDIR/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    # several GPUs (--devices) need NCCL, which cudarc opens as libnccl.so; NCCL itself ships libnccl.so.2
    # (libnccl2, or the pip wheel nvidia-nccl-cu13 that torch brings): link it under the name looked for.
    case " ${ARGS[*]:-} " in *" --devices "*|*" --devices="*)
        if ! ldconfig -p 2>/dev/null | grep -q "libnccl.so " && \
           ! ls $(echo "${LD_LIBRARY_PATH:-}" | tr ':' ' ') 2>/dev/null | grep -qx "libnccl.so"; then
            NCCL2=$(ldconfig -p 2>/dev/null | awk '/libnccl.so.2 /{print $NF; exit}')
            [ -n "$NCCL2" ] || NCCL2=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null || true)
            if [ -z "$NCCL2" ] || [ ! -f "$NCCL2" ]; then
                NPIP="${BERTQA_CUDA_PIP:-$HOME/.cache/bertqa/cuda-pip}"
                if [ ! -f "$NPIP/nvidia/nccl/lib/libnccl.so.2" ] && [ -z "${BERTQA_TRAIN_DRY_RUN:-}" ]; then
                    echo "bertqa: installing NCCL (pip wheel nvidia-nccl-cu13) into $NPIP" >&2
                    python3 -m pip install --quiet --disable-pip-version-check --target "$NPIP" "nvidia-nccl-cu13" ||
                        { echo "error: could not install NCCL; install libnccl2 or train on one GPU" >&2; exit 1; }
                fi
                NCCL2="$NPIP/nvidia/nccl/lib/libnccl.so.2"
            fi
            LINKDIR="$HOME/.cache/bertqa/nccl-link"
            mkdir -p "$LINKDIR" && ln -sf "$NCCL2" "$LINKDIR/libnccl.so"
            export LD_LIBRARY_PATH="$LINKDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            echo "bertqa: NCCL from $NCCL2" >&2
        fi ;;
    esac
fi

CMD=("$BIN" train --model "$MODEL" --train-file "$SQUAD/train-v1.1.json" --dev-file "$SQUAD/dev-v1.1.json"
     --output-dir "$OUT" "${RECIPE[@]}" ${ARGS[@]+"${ARGS[@]}"})
if [ -n "${BERTQA_TRAIN_DRY_RUN:-}" ]; then  # print what would run (tests/script.rs)
    echo "headers: ${HEADERS:-none needed}"
    echo "${CMD[*]}"
    exit 0
fi
cargo build --release --quiet --bin bertqa || { echo "error: cargo build failed" >&2; exit 1; }
"$BIN" --version >/dev/null || { echo "error: $BIN does not run" >&2; exit 1; }
mkdir -p "$(dirname "$OUT")"
echo "model $MODEL, data $SQUAD, output $OUT" >&2
set +e
"${CMD[@]}" 2> >(tee "$OUT.stderr.log" >&2) > "$OUT.train.log"
rc=$?
set -e
wait  # for the stderr tee
if [ $rc -ne 0 ]; then
    echo "training failed with exit code $rc (see $OUT.stderr.log and $OUT.train.log)" >&2
    exit $rc
fi
tail -1 "$OUT.train.log" > "$OUT.metrics.json"
# the last evaluation's metrics; best/ holds the best evaluation's model, which may be an earlier one
field() { sed -n "s/^ *\"$1\": *\([^,]*\),*$/\1/p" "$OUT/summary.json" 2>/dev/null | head -1; }
echo "dev metrics of the last evaluation (step $(field steps)); best/ holds the best one's model (step $(field best_step)," \
     "F1 $(field best_f1)); its predictions via: $BIN eval --model $OUT/best --dev-file $SQUAD/dev-v1.1.json" >&2
cat "$OUT.metrics.json"
