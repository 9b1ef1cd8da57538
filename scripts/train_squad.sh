#!/usr/bin/env bash
# One-command SQuAD v1.1 fine-tune with the standard hyperparameters (2 epochs, lr 3e-5, batch 32,
# max_seq_length 384, doc_stride 128), then evaluation on the dev set. Prints EM/F1 as the last line.
#
#   scripts/train_squad.sh [MODEL_DIR] [OUTPUT_DIR] [extra bertqa train flags...]
#
# Data and model are looked up in this order:
#   SQUAD_DIR (holding train-v1.1.json, dev-v1.1.json)   else $BERTQA_ASSETS/squad-v1.1   else ../shared/assets/squad-v1.1
#   MODEL_DIR argument or $BERTQA_MODEL                    else $BERTQA_ASSETS/all-MiniLM-L6-v2  else ../shared/assets/all-MiniLM-L6-v2
# Missing pieces are downloaded where a network exists (SQuAD from its official URL, the model from the
# Hugging Face hub), each checked against a pinned sha256, into $BERTQA_ASSETS (default ./assets).
# Without a GPU it runs on the CPU and says so; add e.g. `--max-train-examples 2000 --max-seq-length 256`
# for a quick run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEFAULT_ASSETS="$ROOT/../shared/assets"
[ -d "$DEFAULT_ASSETS" ] || DEFAULT_ASSETS="$ROOT/assets"
ASSETS="${BERTQA_ASSETS:-$DEFAULT_ASSETS}"
MODEL="${1:-${BERTQA_MODEL:-$ASSETS/all-MiniLM-L6-v2}}"
OUT="${2:-runs/squad-$(date +%Y%m%d-%H%M%S)}"
shift $(( $# > 2 ? 2 : $# )) || true
SQUAD="${SQUAD_DIR:-$ASSETS/squad-v1.1}"

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

cargo build --release --quiet
BIN=target/release/bertqa
if ! "$BIN" train --help >/dev/null 2>&1; then echo "error: build failed" >&2; exit 1; fi
if [ -z "$(ls /dev/nvidia0 2>/dev/null)" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "bertqa: no GPU found — training on the CPU (slow: for a quick run add --max-train-examples 2000 --max-seq-length 256 --max-eval-examples 500)" >&2
fi
echo "model $MODEL, data $SQUAD, output $OUT" >&2
"$BIN" train --model "$MODEL" --train-file "$SQUAD/train-v1.1.json" --dev-file "$SQUAD/dev-v1.1.json" \
    --output-dir "$OUT" --epochs 2 --learning-rate 3e-5 --batch-size 32 --max-seq-length 384 --doc-stride 128 "$@" \
    | tee "$OUT.train.log" | tail -1 > "$OUT.metrics.json" || { echo "training failed (see $OUT.train.log)" >&2; exit 1; }
echo "final dev metrics (model in $OUT/best, predictions via: $BIN eval --model $OUT/best --dev-file $SQUAD/dev-v1.1.json):" >&2
cat "$OUT.metrics.json"
