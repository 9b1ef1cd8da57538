#!/usr/bin/env python3
"""Instruction counts of compiled kernels, per kernel and per innermost hot loop — the speed proxy used
without a GPU (docs/perf-log.md). Reads `cuobjdump -sass` output of a cubin on stdin.

For each kernel (optionally only those whose name contains FILTER) it prints the static instruction count,
and, for every loop (a backward branch), the instructions between its target and the branch, by class:
HMMA (tensor core), MUFU (special functions: ex2, rcp), float (F*/HADD2.../FMNMX), integer (I*, LOP3, SHF,
PRMT, LEA, ...), memory (LD*/ST*/LDSM/LDGSTS/RED/ATOM), shuffles (SHFL) and the rest. For a long loop it
also prints the blocks that predicated branches skip and the *common path*: the instructions one steady-state
tile executes (common_path below) — the number the perf log compares. A runtime branch that every tile takes
but that holds no tensor-core product, copy, reduction or shared store (variant 3's dropout, tested at run
time) is left out of it: read such kernels' loop totals instead.

  scripts/sass_count.sh attention_tc tc4_forward_bf16_hs64
"""
import re
import sys
from collections import Counter

def klass(op):
    base = op.split(".")[0]
    if base in ("HMMA", "HGMMA"):
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

# Instructions that every full tile executes: tensor-core products, the tile copies (cp.async), the reductions
# and shared-memory stores. Staging code, partial-tile masking and rare rescaling are not in this list.
ESSENTIAL = ("HMMA", "HGMMA", "LDGSTS", "RED", "REDG", "STS", "LDSM")


def common_path(ins, s, e):
    """The path from the loop's first instruction to its back edge, over forward branches only (an inner loop
    runs once), that executes the most essential instructions (ESSENTIAL: a full tile's products, copies,
    reductions and stores) and, among those, the fewest instructions: the steady-state tile, without a partial
    tile's masking and clamping or the last tile's missing copies, without a rare branch such as rebasing, with
    a loop's staging done by its first warps. Returns (count, Counter by class)."""
    best = [None] * (e - s + 2)  # best[k - s]: (essential, -count, classes) of the best path from k to e
    for k in range(e, s - 1, -1):
        a, op, args = ins[k]
        ess = 1 if op.split(".")[0] in ESSENTIAL else 0
        if k == e:
            best[k - s] = (ess, -1, Counter({klass(op): 1}))
            continue
        succ = []
        m = re.search(r"0x([0-9a-f]+)", args)
        target = int(m.group(1), 16) if op.startswith("BRA") and m else None
        pred = PRED[k]  # the guard ("@P0", "@!UP1", "@PT", ...) or ""
        if pred == "@!PT":  # never runs: falls through
            best[k - s] = best[k + 1 - s] and (best[k + 1 - s][0], best[k + 1 - s][1] - 1, best[k + 1 - s][2] + Counter({klass(op): 1}))
            continue
        guarded = pred not in ("", "@PT")
        # a branch on a predicate or register operand (BRA P1, …; BRA.DIV UR4, …) may fall through as well
        conditional = not op.startswith("BRA") or guarded or bool(re.match(r"!?U?P\d|U?R\d", args)) or ".DIV" in op
        if op.startswith("EXIT") and not guarded:
            continue
        if conditional or target is None:
            succ.append(k + 1)
        if target is not None and ins[k][0] < target <= ins[e][0]:
            succ.append(next(j for j in range(k + 1, e + 1) if ins[j][0] == target))
        cands = [best[j - s] for j in succ if best[j - s] is not None]
        if not cands:
            continue
        b = max(cands, key=lambda t: (t[0], t[1]))
        cl = b[2].copy()
        cl[klass(op)] += 1
        best[k - s] = (b[0] + ess, b[1] - 1, cl)
    if best[0] is None:
        return None
    return -best[0][1], best[0][2]


PRED = []


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
            preds_all.setdefault(name, []).append((m.group(2) or "").strip())
    for name, ins in kernels.items():
        if flt not in name:
            continue
        print(f"{name}: {len(ins)} instructions")
        index = {a: k for k, (a, _, _) in enumerate(ins)}
        preds = preds_all.get(name, [])
        PRED[:] = preds
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
            # only a partial tile runs), and the common path through the loop (common_path)
            if len(body) >= 100:
                r = common_path(ins, s, e)
                if r is None:
                    print("    common path: none found (no path from the loop's start reaches its back edge)")
                else:
                    n, c = r
                    detail = " ".join(f"{k}={c[k]}" for k in ("hmma", "mufu", "float", "int", "shfl", "mem", "uniform", "other") if c[k])
                    print(f"    common path: {n} instructions ({detail})")
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
