#!/usr/bin/env bash
# On the device machine: unpack the gzipped binaries that scripts/package_gpu.sh put in .gpu/bin.
cd "$(dirname "$0")/.."
for f in .gpu/bin/*.gz; do [ -e "$f" ] && gunzip -kf "$f" && chmod +x "${f%.gz}"; done
true
