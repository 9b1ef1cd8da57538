#!/usr/bin/env python3
"""Machine-readable results of a GPU run (docs/perf/README.md has the schema). Used by
scripts/compare_pytorch.sh and scripts/device_run.sh; standard library only.

  perf_json.py run --kind ours|hf --workload W --side S --wall SEC --rc RC --out RUN.json
                   [--dir OUTPUT_DIR (ours)] [--stdout FILE (hf)] [--round N] [--seed N] [--note TEXT]
      one run's record: bertqa's summary.json and metrics.jsonl, or hf_squad.py's last JSON line
  perf_json.py check RUN_A.json RUN_B.json [--what throughput|finetune]
      like-for-like assertions between two runs (windows, digests, steps, evaluations, optimizer groups, FLOPs
      per sequence); prints each, exits 1 on a mismatch
  perf_json.py assemble --runs DIR --out-dir DIR [--peak PEAK.json] [--bench BENCH.log] [--warm SEC]
                        [--commit C] [--kernels TEXT] [--extra KEY=VALUE ...]
      the run's JSON, written as OUT_DIR/<date>-<HHMMSS>-<card>-<commit>-<workloads>[-seeds…].json (path printed), and a
      human summary on stderr
  perf_json.py merge FILE.json ...
      the fine-tune workloads of several runs (e.g. one seed per device call) pooled: F1 and wall time per side,
      mean ± std over every seed
"""
import argparse, datetime, glob, json, math, os, re, statistics, subprocess, sys

SCHEMA = 1


def load_json(path):
    with open(path) as f:
        return json.load(f)


def last_json_line(path):
    try:
        lines = [l for l in open(path, errors="replace").read().splitlines() if l.strip().startswith("{")]
    except OSError:
        return None
    for l in reversed(lines):
        try:
            return json.loads(l)
        except ValueError:
            continue
    return None


def ours_result(d):
    """bertqa's output directory → the fields of a run record."""
    s = {}
    p = os.path.join(d, "summary.json")
    if os.path.exists(p):
        s = load_json(p)
    steps, evals = [], []
    mp = os.path.join(d, "metrics.jsonl")
    if os.path.exists(mp):
        for l in open(mp):
            try:
                v = json.loads(l)
            except ValueError:
                continue
            (evals if "eval" in v else steps).append(v)
    res = dict(s)
    if steps:
        # real tokens per window and computed rows per window, averaged over the logged steps
        res["real_tokens_per_window"] = statistics.mean(v["real_tokens_per_s"] / v["seq_per_s"] for v in steps)
        res["rows_per_window"] = statistics.mean(v["computed_tokens_per_s"] / v["seq_per_s"] for v in steps)
        res["losses_logged"] = [v["loss"] for v in steps[:20]]
    if evals:
        res.update(evals[-1]["eval"])
    if s.get("train_step_ms_median"):
        res["seq_per_s"] = s["batch_size"] * 1e3 / s["train_step_ms_median"]
    return res


def cmd_run(a):
    if a.kind == "ours":
        res = ours_result(a.dir)
        if "seconds" in res:
            res["startup_seconds"] = a.wall - res["seconds"]  # process start to the run's start (model load, ...)
    else:
        res = last_json_line(a.stdout) or {}
    rec = {"workload": a.workload, "side": a.side, "round": a.round, "seed": a.seed, "rc": a.rc, "wall_s": a.wall,
           "ok": a.rc == 0 and bool(res), "note": a.note, "result": res}
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1)
    r = res
    msg = f"{a.workload} {a.side}" + (f" round {a.round}" if a.round is not None else "") + \
          (f" seed {a.seed}" if a.seed is not None else "") + f": rc {a.rc}, wall {a.wall:.1f}s"
    if r.get("seq_per_s"):
        msg += f", {r['seq_per_s']:.1f} seq/s (median step {r.get('train_step_ms_median') or r.get('step_ms_median'):.2f} ms)"
    if r.get("f1") is not None:
        msg += f", EM {r.get('exact_match'):.2f} F1 {r['f1']:.2f}"
    print(msg)


LIKE = {
    "finetune": ["train_windows", "train_windows_with_answer", "train_windows_sha256", "dev_windows",
                 "dev_windows_sha256", "steps", "evaluations", "batch_size", "max_seq_length", "doc_stride",
                 "max_query_length", "params", "params_decay", "params_no_decay"],
    "throughput": ["batch_size", "max_seq_length", "params", "params_decay", "params_no_decay", "flops_per_seq"],
}


def like_fields(rec):
    r = dict(rec["result"])
    if "train_flops_per_seq_at_max_len" in r:
        r["flops_per_seq"] = r["train_flops_per_seq_at_max_len"]
    if "seq_len" in r:
        r["max_seq_length"] = r["seq_len"]
    return r


def check(ra, rb, what):
    a, b = like_fields(ra), like_fields(rb)
    rows, ok = [], True
    for k in LIKE[what]:
        va, vb = a.get(k), b.get(k)
        num = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (va, vb))
        same = va == vb or (num and math.isclose(va, vb, rel_tol=1e-9))
        if va is None or vb is None:
            same = False
        ok &= same
        rows.append((k, va, vb, same))
    if what == "throughput":
        rt = a.get("real_tokens_per_window")
        full = rt is not None and abs(rt - a.get("max_seq_length", 384)) < 1e-6
        rows.append(("bertqa windows all full (real tokens per window)", rt, a.get("max_seq_length"), full))
        ok &= full
    return ok, rows


def cmd_check(a):
    ra, rb = load_json(a.a), load_json(a.b)
    between = f"{ra['side']} vs {rb['side']}" + (f" (seed {ra['seed']})" if ra.get("seed") is not None else "") + \
              (f" (round {ra['round']})" if ra.get("round") is not None else "")
    failed = [r["side"] for r in (ra, rb) if not r["ok"]]
    if failed:
        # a run that failed has nothing to compare: not a mismatch (its failure is reported as such, and the
        # other sides' comparisons stand)
        ok, rows = None, []
        print(f"like-for-like {ra['workload']} {between}: not compared ({', '.join(failed)} failed)")
    else:
        ok, rows = check(ra, rb, a.what)
        for k, va, vb, same in rows:
            print(f"  {'ok      ' if same else 'MISMATCH'} {k}: {ra['side']} {va} | {rb['side']} {vb}")
        print(f"like-for-like {ra['workload']} {between}: {'all equal' if ok else 'CHECK FAILED'}")
    if a.record:
        with open(a.record, "w") as f:
            json.dump({"workload": ra["workload"], "side": "check", "round": ra.get("round"), "seed": ra.get("seed"),
                       "rc": 0, "wall_s": 0.0, "ok": True, "note": None,
                       "result": {"between": between, "ok": ok, "failed": failed,
                                  "fields": {k: {"a": va, "b": vb, "equal": same} for k, va, vb, same in rows}}},
                      f, indent=1)
    sys.exit(1 if ok is False else 0)


def mean_std(v):
    v = [x for x in v if x is not None]
    if not v:
        return None, None
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def nvidia_smi():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
        name, driver, memory, clock, power = [x.strip() for x in out.splitlines()[0].split(",")]
        cuda = re.search(r"CUDA Version:\s*([\d.]+)", subprocess.run(["nvidia-smi"], capture_output=True, text=True,
                                                                      timeout=20).stdout)
        return {"card": name, "driver": driver, "memory": memory, "max_sm_clock": clock, "power_limit": power,
                "cuda_driver_api": cuda.group(1) if cuda else None}
    except Exception:
        return {}


def card_slug(name):
    m = re.search(r"(H100|H200|A100|L40S|L4|B200|GB200|A10G|T4|V100)", name or "", re.I)
    s = m.group(1) if m else (name or "unknown")
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "unknown"


def parse_bench(path):
    """scripts/gpu_check.sh's bench log (benches/ops.rs): the measured GEMM peak, the training-step lines and the
    per-kernel profile of the default step, per model."""
    out = {"peak_tflops": None, "steps": {}, "profiles": {}}
    if not path or not os.path.exists(path):
        return out
    model, label, in_prof = None, None, False
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        m = re.search(r"cuBLAS bf16 GEMM 8192³ ([\d.]+) TFLOP/s", line)
        if m:
            out["peak_tflops"] = float(m.group(1))
        m = re.match(r"\n?== (.+?): L=", line)
        if m:
            model, in_prof = m.group(1), False
            continue
        m = re.match(r"TRAINING STEP(.*?)\s+B\d+ T\d+", line)
        if m:
            label = m.group(1).lstrip(", ") or "defaults"
            continue
        m = re.match(r"\s+=> ([\d.]+) seq/s.*device memory peak ([\d.]+) GiB", line)
        if m and model:
            mfu = re.search(r"([\d.]+)% MFU", line)
            out["steps"].setdefault(model, {})[label] = {"seq_per_s": float(m.group(1)),
                                                         "mfu": float(mfu.group(1)) / 100 if mfu else None,
                                                         "peak_mem_gib": float(m.group(2))}
            continue
        if line.strip().startswith("per-kernel profile of the step"):
            in_prof = label == "defaults"
            continue
        if in_prof:
            if line.startswith("kernel or GEMM"):
                continue
            if line.startswith("sum of kernel times") or not line.strip():
                in_prof = False
                continue
            m = re.match(r"^(.*\S)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%$", line)
            if m:
                out["profiles"].setdefault(model, {})[m.group(1)] = float(m.group(3))
    return out


def side_summary(runs, kind, peak):
    ok = [r for r in runs if r["ok"]]
    res = [r["result"] for r in ok]
    d = {"runs": len(ok), "failed_runs": len(runs) - len(ok)}
    if not res:
        return d
    r0 = res[0]
    if kind == "throughput":
        sps = [r.get("seq_per_s") for r in res]
        d["seq_per_s"], d["seq_per_s_std"] = mean_std(sps)
        d["seq_per_s_runs"] = sps
        d["step_ms_median_runs"] = [r.get("train_step_ms_median") or r.get("step_ms_median") for r in res]
        fl = r0.get("flops_per_seq") or r0.get("train_flops_per_seq_at_max_len")
        d["flops_per_seq"] = fl
        if peak and fl and d["seq_per_s"]:
            d["mfu"] = d["seq_per_s"] * fl / (peak * 1e12)
            d["mfu_std"] = (d["seq_per_s_std"] or 0) * fl / (peak * 1e12)
        mem = [r.get("peak_mem_gib", r.get("peak_device_memory_gib")) for r in res]
        mem = [m for m in mem if m is not None]
        d["peak_mem_gib"] = max(mem) if mem else None
        rv = [r.get("peak_mem_reserved_gib") for r in res if r.get("peak_mem_reserved_gib") is not None]
        if rv:
            d["peak_mem_reserved_gib"] = max(rv)
        d["first_step_seconds_runs"] = [r.get("first_step_seconds") for r in res]
    else:
        for k_out, k_in in [("f1", "f1"), ("exact_match", "exact_match"), ("wall_s", None),
                            ("startup_s", "startup_seconds"), ("featurize_s", "featurize_seconds"),
                            ("train_s", "train_step_seconds"), ("first_step_s", "first_step_seconds"),
                            ("step_ms_median", "train_step_ms_median"), ("eval_s", "eval_seconds"),
                            ("save_s", "save_seconds"), ("train_seq_per_s", "train_seq_per_s")]:
            v = [r["wall_s"] for r in ok] if k_in is None else [x.get(k_in) for x in res]
            m, s = mean_std(v)
            if m is not None:
                d[k_out], d[k_out + "_std"] = m, s
        d["seeds"] = [r["seed"] for r in ok]
        d["per_seed"] = [{"seed": r["seed"], "f1": r["result"].get("f1"), "exact_match": r["result"].get("exact_match"),
                          "wall_s": r["wall_s"], "train_s": r["result"].get("train_step_seconds"),
                          "step_ms_median": r["result"].get("train_step_ms_median")} for r in ok]
        d["evaluations"] = r0.get("evaluations")
        mem = [r.get("peak_mem_gib", r.get("peak_device_memory_gib")) for r in res]
        mem = [m for m in mem if m is not None]
        d["peak_mem_gib"] = max(mem) if mem else None
    for k in ("precision", "weight_precision", "padding", "span_loss", "loss", "sdpa", "host_syncs", "compile_mode"):
        if r0.get(k) is not None:
            d[k] = r0[k]
    if "env" in r0:
        d["env"] = r0["env"]
    return d


def assemble(runs, peak, bench, args):
    by = {}
    for r in runs:
        by.setdefault(r["workload"], {}).setdefault(r["side"], []).append(r)
    peak_t = (peak or {}).get("tflops")
    out = {"schema": SCHEMA}
    smi = nvidia_smi()
    env = next((r["result"]["env"] for r in runs if r["result"].get("env")), {})
    out["card"] = smi.get("card") or env.get("gpu") or "unknown"
    out["driver"] = smi.get("driver") or env.get("driver")
    out["commit"] = args.commit
    out["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out["device"] = smi
    out["software"] = {k: env.get(k) for k in ("python", "torch", "transformers", "cuda_runtime", "cudnn")} if env else {}
    out["bertqa_kernels"] = args.kernels or "defaults"
    out["step_time"] = {
        "bertqa": "host clock from a step's start to the device's end: the trainer's own one synchronisation per "
                  "step (it reads the loss and the gradient norm's statistics after AdamW), batch packing and "
                  "upload included; median over the steps after the first min(10, n/2)",
        "transformers": "CUDA events around each step (optimizer step included), no per-step host "
                        "synchronisation; median over the same steps"}
    out["peak"] = {"tflops": peak_t, "how": (peak or {}).get("gemm"), "ms_median": (peak or {}).get("ms_median"),
                   "note": "measured in this call (scripts/hf_squad.py --measure-peak); every mfu below is "
                           "seq/s x train_flops_per_seq(T) / this peak, the same formula for both sides"}
    if bench.get("peak_tflops"):
        out["peak"]["bench_cublas_8192_tflops"] = bench["peak_tflops"]
    if args.warm is not None:
        out["nvrtc_warm_seconds"] = args.warm
    out["workloads"] = {}
    for w, sides in by.items():
        kind = "throughput" if re.search(r"-b\d+-t\d+$", w) else "finetune"
        entry = {s: side_summary(rs, kind, peak_t) for s, rs in sides.items() if s != "check"}
        if kind == "throughput" and entry.get("bertqa", {}).get("seq_per_s"):
            ours = entry["bertqa"]["seq_per_s"]
            entry["ratios"] = {f"bertqa/{s}": ours / e["seq_per_s"] for s, e in entry.items()
                               if s != "bertqa" and isinstance(e, dict) and e.get("seq_per_s")}
        if w.startswith("lockstep"):
            a = next((r["result"] for r in sides.get("bertqa", []) if r["ok"]), {})
            b = next((r["result"] for r in sides.get("transformers_eager", []) if r["ok"]), {})
            la, lb = a.get("losses_logged") or [], b.get("losses_first_20") or []
            n = min(len(la), len(lb))
            if n:
                entry["loss_trajectories"] = {"bertqa": la[:n], "transformers": lb[:n],
                                              "max_rel_diff": max(abs(x - y) / abs(y) for x, y in zip(la, lb))}
        checks = [r for r in runs if r["workload"] == w and r["side"] == "check"]
        if checks:
            entry["like_for_like"] = [c["result"] for c in checks]
            compared = [c["result"]["ok"] for c in checks if c["result"]["ok"] is not None]
            # over the pairs that could be compared (a failed run is reported by its side's failed_runs)
            entry["like_for_like_ok"] = all(compared) if compared else None
        out["workloads"][w] = entry
    base = bench.get("profiles", {}).get("BERT-base")
    out["profile"] = base or {}
    if bench.get("profiles"):
        out["profiles"] = bench["profiles"]
        out["bench_steps"] = bench["steps"]
    for kv in args.extra or []:
        k, _, v = kv.partition("=")
        out[k] = v
    return out


def human(out):
    lines = [f"{out['card']} (driver {out['driver']}), commit {out['commit']}, peak {out['peak']['tflops']} TFLOP/s"]
    for w, e in out["workloads"].items():
        lines.append(f"== {w}")
        for s, d in e.items():
            if not isinstance(d, dict) or "runs" not in d:
                continue
            if d.get("seq_per_s") is not None and "f1" not in d:
                lines.append(f"  {s:<28} {d['seq_per_s']:8.1f} ± {d['seq_per_s_std']:.1f} seq/s over {d['runs']} runs"
                             + (f", MFU {100 * d['mfu']:.1f}%" if d.get("mfu") else "")
                             + (f", peak mem {d['peak_mem_gib']:.2f} GiB" if d.get("peak_mem_gib") else ""))
            elif d.get("f1") is not None:
                lines.append(f"  {s:<28} F1 {d['f1']:.2f} ± {d['f1_std']:.2f} (EM {d['exact_match']:.2f}) over seeds "
                             f"{d['seeds']}; wall {d['wall_s']:.1f}s = start-up {d.get('startup_s', 0):.1f} + featurize "
                             f"{d.get('featurize_s', 0):.1f} + steps {d.get('train_s', 0):.1f} (median "
                             f"{d.get('step_ms_median', 0):.2f} ms) + {d.get('evaluations')} evaluations "
                             f"{d.get('eval_s', 0):.1f} + saves {d.get('save_s', 0):.1f} + rest")
            else:
                lines.append(f"  {s:<28} {d['runs']} ok runs, {d['failed_runs']} failed")
        for k, v in (e.get("ratios") or {}).items():
            lines.append(f"  {k}: {v:.2f}x")
        if "loss_trajectories" in e:
            lines.append(f"  lockstep max relative loss difference: {e['loss_trajectories']['max_rel_diff']:.2e}")
        for c in e.get("like_for_like", []):
            verdict = {True: "equal", False: "MISMATCH", None: "not compared (a run failed)"}[c.get("ok")]
            lines.append(f"  like-for-like {c.get('between')}: {verdict}")
    return "\n".join(lines)


def load_peak(path):
    """The peak measurement's record, or one that says it is missing (a failed or cut measurement must not
    cost the call its JSON: every mfu is then null)."""
    if not path or not os.path.exists(path):
        return None
    try:
        return load_json(path)
    except ValueError:
        return last_json_line(path) or {"tflops": None, "error": f"no JSON in {os.path.basename(path)}: the "
                                                                   "peak measurement failed or was cut"}


def cmd_assemble(a):
    runs = [load_json(p) for p in sorted(glob.glob(os.path.join(a.runs, "*.json")))]
    peak = load_peak(a.peak)
    bench = parse_bench(a.bench)
    out = assemble(runs, peak, bench, a)
    if peak and peak.get("error"):
        out["peak"]["error"] = peak["error"]
    wl = "+".join(sorted(out["workloads"])) or ("profile" if out["profile"] else "none")
    # the time and the seeds too: two calls on one day and commit (one seed each) must not share a name
    seeds = sorted({r["seed"] for r in runs if r.get("seed") is not None and r["side"] != "check"})
    tag = ("-seeds" + "_".join(str(x) for x in seeds)) if seeds else ""
    name = (f"{out['date'][:10]}-{out['date'][11:19].replace(':', '')}-{card_slug(out['card'])}-"
            f"{a.commit or 'unknown'}-{wl}{tag}.json")
    os.makedirs(a.out_dir, exist_ok=True)
    path = os.path.join(a.out_dir, re.sub(r"[^A-Za-z0-9_.+-]", "_", name))
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(human(out), file=sys.stderr)
    print(path)


def cmd_merge(a):
    per = {}
    # one entry per (workload, side, seed, commit): the same run written by two files (a file copied or
    # assembled twice) counts once — the later file's, by its date
    files = sorted(((load_json(p), p) for p in a.files), key=lambda jp: jp[0].get("date") or "")
    for j, p in files:
        for w, e in j.get("workloads", {}).items():
            for s, d in e.items():
                if isinstance(d, dict) and d.get("per_seed"):
                    for x in d["per_seed"]:
                        if x.get("f1") is None:
                            continue
                        xs = per.setdefault((w, s), [])
                        xs[:] = [y for y in xs if (y["seed"], y["commit"]) != (x["seed"], j.get("commit"))]
                        xs.append({**x, "commit": j.get("commit"), "file": os.path.basename(p)})
    out = {}
    for (w, s), xs in sorted(per.items()):
        f1, f1s = mean_std([x["f1"] for x in xs])
        wall, walls = mean_std([x["wall_s"] for x in xs])
        out.setdefault(w, {})[s] = {"f1": f1, "f1_std": f1s, "wall_s": wall, "wall_s_std": walls,
                                    "seeds": [x["seed"] for x in xs], "commits": sorted({x["commit"] for x in xs}),
                                    "per_seed": xs}
        print(f"{w} {s}: F1 {f1:.2f} ± {f1s:.2f}, wall {wall:.1f} ± {walls:.1f}s over seeds "
              f"{[x['seed'] for x in xs]} (commits {sorted({x['commit'] for x in xs})})", file=sys.stderr)
    print(json.dumps(out, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = ap.add_subparsers(dest="cmd", required=True)
    r = sp.add_parser("run")
    r.add_argument("--kind", choices=["ours", "hf"], required=True)
    r.add_argument("--workload", required=True); r.add_argument("--side", required=True)
    r.add_argument("--wall", type=float, required=True); r.add_argument("--rc", type=int, required=True)
    r.add_argument("--out", required=True); r.add_argument("--dir"); r.add_argument("--stdout")
    r.add_argument("--round", type=int); r.add_argument("--seed", type=int); r.add_argument("--note")
    c = sp.add_parser("check")
    c.add_argument("a"); c.add_argument("b"); c.add_argument("--what", choices=list(LIKE), default="finetune")
    c.add_argument("--record", help="also write the result as a run record (side \"check\") for assemble")
    s = sp.add_parser("assemble")
    s.add_argument("--runs", required=True); s.add_argument("--out-dir", required=True)
    s.add_argument("--peak"); s.add_argument("--bench"); s.add_argument("--warm", type=float)
    s.add_argument("--commit"); s.add_argument("--kernels"); s.add_argument("--extra", nargs="*")
    m = sp.add_parser("merge")
    m.add_argument("files", nargs="+")
    a = ap.parse_args()
    {"run": cmd_run, "check": cmd_check, "assemble": cmd_assemble, "merge": cmd_merge}[a.cmd](a)


if __name__ == "__main__":
    main()
