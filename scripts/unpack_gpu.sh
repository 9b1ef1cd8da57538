#!/usr/bin/env bash
# On the device machine: decompress what scripts/package_gpu.sh xz-compressed in a .gpu-like folder (default
# .gpu): the executables in bin/, SQuAD in data/, the model's largest files. Each FILE.xz becomes FILE (the .xz
# removed), so a second call has nothing left to do. With the xz tool where there is one, else Python's lzma
# module. Usage: scripts/unpack_gpu.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.gpu}"
unxz_one() { # FILE.xz -> FILE, written whole before the .xz goes
    if command -v xz >/dev/null; then
        xz -d -f -T0 "$1"
    else
        python3 - "$1" <<'PYEOF'
import lzma, os, shutil, sys
src = sys.argv[1]
dst, part = src[:-3], src[:-3] + ".part"
try:
    with lzma.open(src) as i, open(part, "wb") as o:
        shutil.copyfileobj(i, o, 1 << 20)
except BaseException:
    if os.path.exists(part):
        os.remove(part)
    raise
os.replace(part, dst)
os.remove(src)
PYEOF
    fi
}
shopt -s nullglob
for f in "$DIR"/*/*.xz; do
    unxz_one "$f" || { echo "unpack_gpu.sh: cannot decompress $f" >&2; exit 1; }
done
for f in "$DIR"/bin/*; do chmod +x "$f"; done
