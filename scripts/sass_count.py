#!/usr/bin/env python3
"""Instruction counts of compiled kernels, per kernel and per innermost hot loop — the speed proxy used
without a GPU (docs/perf-log.md). Reads `cuobjdump -sass` output of a cubin on stdin.

For each kernel (optionally only those whose name contains FILTER) it prints the static instruction count,
and, for every loop (a backward branch), the instructions between its target and the branch, by class:
HMMA (tensor core), MUFU (special functions: ex2, rcp), float (F*/HADD2.../FMNMX), integer (I*, LOP3, SHF,
PRMT, LEA, ...), memory (LD*/ST*/LDSM/LDGSTS/RED/ATOM), shuffles (SHFL) and the rest.

  scripts/sass_count.sh attention_tc tc4_forward_bf16_hs64
"""
import re
import sys
from collections import Counter

def klass(op):
    base = op.split(".")[0]
    if base in ("HMMA",):
        return "hmma"
    if base == "MUFU":
        return "mufu"
    if base == "SHFL":
        return "shfl"
    if base in ("LDS", "LDSM", "LDG", "STG", "STS", "LDGSTS", "RED", "ATOM", "ATOMS", "LDL", "STL", "LD", "ST",
                "LDC", "ULDC", "LDGDEPBAR", "DEPBAR"):
        return "mem"
    if base.startswith("I") or base in ("LOP3", "SHF", "PRMT", "LEA", "SEL", "MOV", "POPC", "FLO", "BREV",
                                          "SGXT", "BMSK", "VIADD", "VIMNMX", "IMNMX", "P2R", "R2P", "PLOP3"):
        return "int"
    if base.startswith("F") or base.startswith("H") or base in ("DADD", "DMUL", "DFMA"):
        return "float"
    if base.startswith("U"):
        return "uniform"
    return "other"

def main():
    flt = sys.argv[1] if len(sys.argv) > 1 else ""
    kernels = {}
    preds_all = {}
    name = None
    for line in sys.stdin:
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            name = m.group(1)
            kernels[name] = []
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);", line)
        if m and name is not None:
            addr = int(m.group(1), 16)
            kernels[name].append((addr, m.group(3), m.group(4)))
            preds_all.setdefault(name, []).append(bool(m.group(2)))
    for name, ins in kernels.items():
        if flt not in name:
            continue
        print(f"{name}: {len(ins)} instructions")
        index = {a: k for k, (a, _, _) in enumerate(ins)}
        preds = preds_all.get(name, [])
        loops = []
        for k, (a, op, args) in enumerate(ins):
            if op.startswith("BRA"):
                m = re.search(r"0x([0-9a-f]+)", args)
                if m:
                    t = int(m.group(1), 16)
                    if t <= a and t in index:
                        loops.append((index[t], k))
        # every loop (outer loops too, with their inner ones counted once), in address order; a branch to
        # itself (the kernel's trailing `BRA self`) is not a loop
        for (s, e) in sorted(loops):
            if s == e:
                continue
            body = ins[s:e + 1]
            c = Counter(klass(op) for _, op, _ in body)
            detail = " ".join(f"{k}={c[k]}" for k in ("hmma", "mufu", "float", "int", "shfl", "mem", "uniform", "other") if c[k])
            print(f"  loop {ins[s][0]:#06x}..{ins[e][0]:#06x}: {len(body)} instructions ({detail})")
            # predicated forward branches inside a long loop: the blocks they can skip (e.g. masking that
            # only a partial tile runs), so that the common path's length is the loop's minus those blocks
            if len(body) >= 100:
                for k in range(s, e):
                    a, op, args = ins[k]
                    m = re.search(r"0x([0-9a-f]+)", args)
                    if op.startswith("BRA") and preds[k] and m:
                        t = int(m.group(1), 16)
                        if a < t <= ins[e][0] and t in index:
                            n = index[t] - k - 1
                            if n >= 30:
                                print(f"    {a:#06x}: a predicated branch skips {n} instructions")

if __name__ == "__main__":
    main()
