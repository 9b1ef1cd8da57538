#!/usr/bin/env python3
"""The PyTorch side of scripts/compare_pytorch.sh: Hugging Face transformers (BertForQuestionAnswering, SDPA
attention) fine-tuned on SQuAD v1.1 like bertqa, so that the two differ in the engine only:

- the same windows: bertqa's featurization re-implemented over the HF tokenizer (question cut at
  --max-query-length tokens, context windows of max_seq_length - len(question) - 3 tokens overlapping by
  --doc-stride, labels = the answer's first/last token or [CLS] when the answer is not wholly inside the window,
  questions whose answer_start does not point at their text left out of training); the window count and a
  SHA-256 of every window's tokens and labels (`windows_digest`, = bertqa's summary.json) are printed, and
  compare_pytorch.sh asserts both equal bertqa's;
- the same batches: bertqa's epoch order (xoshiro256** shuffle seeded by --seed and the epoch; `epoch_order`);
- the same loss: per window, softmax cross-entropy over the window's real tokens only (padding masked out of the
  softmax, as bertqa's span loss does), (mean start CE + mean end CE) / 2 — computed here from the logits, not
  BertForQuestionAnswering's built-in loss (which includes padding in the softmax);
- the same optimizer: AdamW (torch, fused), weight decay on matrices only (no decay on biases and LayerNorm: the
  group sizes are printed and compared with bertqa's), linear warmup (ceil(ratio * steps)) and decay, global-norm
  clipping;
- the same statistic: every step timed with a pair of CUDA events (no host synchronisation in the loop: losses
  are kept on the device and read after each epoch), median step time after warm-up (the first
  min(10, steps/2) steps left out; bertqa's `train_step_ms_median` uses the same rule); start-up,
  featurization, training steps and evaluation reported apart, one evaluation per epoch (as bertqa), no saves.

Precision: default `amp` = fp32 weights and AdamW, bf16 autocast (what HF users run); `--bf16-weights`: the
model in bf16, AdamW on bf16 weights (no f32 master), no autocast. bertqa: bf16 working weights, f32 master
weights and Adam moments. Stated in the output's "precision".

Modes (the last stdout line is one JSON object):
  hf_squad.py --model DIR --train-file T.json --dev-file D.json [--epochs 2] [--seed 42] ...   fine-tune
  hf_squad.py --throughput [--config bert-base|DIR] [--steps 60] [--compile] [--bf16-weights]  B x T random
                tokens, every window full (no padding), random weights
  hf_squad.py --measure-peak [--peak-n 8192]           bf16 n^3 torch.matmul, TFLOP/s (the MFU denominator)
  hf_squad.py --windows-only --model DIR --train-file T.json [--dev-file D.json]   featurize, print counts
  hf_squad.py --self-test                              known answers of epoch_order and windows_digest
"""
import time

T_PROCESS = time.time()  # before the heavy imports: start-up is measured from here
import argparse, collections, hashlib, json, math, os, platform, re, statistics, string, subprocess, sys, warnings

import numpy as np
try:
    import torch
    import torch.nn.functional as F
except ImportError:  # --self-test needs neither: cargo test runs it where torch is absent (tests/script.rs)
    torch = F = None

M64 = (1 << 64) - 1


# ---------------------------------------------------------------- bertqa's shuffle (src/rng.rs, src/train)
def splitmix64(x):
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def rotl(x, k):
    return ((x << k) | (x >> (64 - k))) & M64


class Xoshiro:
    """bertqa's Rng (xoshiro256**)."""

    def __init__(self, seed):
        x, self.s = seed, []
        for _ in range(4):
            x = (x + 0x9E3779B97F4A7C15) & M64
            self.s.append(splitmix64(x))

    def next_u64(self):
        s = self.s
        r = (rotl((s[1] * 5) & M64, 7) * 9) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t
        s[3] = rotl(s[3], 45)
        return r

    def below(self, n):
        u = (self.next_u64() >> 11) * (1.0 / (1 << 53))
        return int(u * n) % max(n, 1)


def epoch_order(n, seed, epoch):
    """bertqa's `epoch_order`: the windows' order in `epoch`."""
    order = list(range(n))
    r = Xoshiro(splitmix64((seed ^ (0xE90C << 32) ^ epoch) & M64))
    for i in range(n - 1, 0, -1):
        j = r.below(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def warmup_steps(n):  # bertqa: src/train/mod.rs `warmup_steps`
    return min(10, n // 2)


def step_stats(times):
    """(median, mean) of the step times after warm-up, seconds."""
    v = times[warmup_steps(len(times)):]
    if not v:
        return None, None
    return statistics.median(v), sum(v) / len(v)


def flops_per_seq(cfg, t):  # bertqa's BertConfig::train_flops_per_seq
    c, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    gemm = 2 * t * (4 * c * c + 2 * c * f) * l + 2 * t * c * 2
    attn = 2 * 2 * t * t * c * l
    return 3 * (gemm + attn)


# ---------------------------------------------------------------- data: bertqa's windows (src/data/features.rs)
def load(path, n=None):
    raw = json.load(open(path, encoding="utf-8"))
    ex, para = [], 0
    for art in raw["data"]:
        for p in art["paragraphs"]:
            for qa in p["qas"]:
                ans = [{"text": a["text"], "start": max(0, int(a["answer_start"]))} for a in qa.get("answers", [])]
                aligned = True
                if ans and not qa.get("is_impossible", False):
                    a = ans[0]
                    # as bertqa: at answer_start, and not empty or only whitespace (no tokens to label)
                    aligned = a["text"].strip() != "" and p["context"][a["start"]:a["start"] + len(a["text"])] == a["text"]
                ex.append({"id": qa["id"], "question": qa["question"], "context": p["context"], "paragraph": para,
                           "answers": ans, "impossible": bool(qa.get("is_impossible", False)), "aligned": aligned})
            para += 1
    return ex[:n] if n else ex


def ctx_windows(n_ctx, max_ctx, stride):
    step, out, s = max(max_ctx - stride, 1), [], 0
    while True:
        e = min(s + max_ctx, n_ctx)
        out.append((s, e))
        if e >= n_ctx:
            return out
        s += step


class Windows:
    """Every window of a set of examples, as bertqa builds them: ids (N, T) int32 padded with [PAD], types,
    real lengths, labels, and for evaluation the context tokens' character offsets."""

    def __init__(self, tok, examples, a, training):
        t0 = time.time()
        T = a.max_seq_length
        budget = T - a.max_query_length - 3
        if budget <= 0 or a.doc_stride >= budget:  # bertqa's EvalOpts::validate
            raise SystemExit(f"--doc-stride ({a.doc_stride}) must be below the window budget of {budget} context tokens "
                             f"(--max-seq-length {T} - --max-query-length {a.max_query_length} - 3)")
        first = {}
        for i, e in enumerate(examples):
            first.setdefault(e["paragraph"], i)
        paras = sorted(first)
        enc_c = tok([examples[first[p]]["context"] for p in paras], add_special_tokens=False,
                    return_offsets_mapping=True, return_attention_mask=False, return_token_type_ids=False)
        ctx = {p: (np.asarray(ids, dtype=np.int32), offs) for p, ids, offs in
               zip(paras, enc_c["input_ids"], enc_c["offset_mapping"])}
        enc_q = tok([e["question"] for e in examples], add_special_tokens=False, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
        cls, sep, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
        rows = []  # (example, question ids, paragraph, ws, we, start, end, has_answer)
        for i, e in enumerate(examples):
            if training and not e["aligned"]:
                continue  # bertqa's training_features: misaligned answers are not trained on
            q = enc_q[i][:a.max_query_length]
            if len(q) + 3 >= T:
                raise SystemExit(f"max_seq_length {T} leaves no room for the context after a {len(q)}-token question")
            cids, offs = ctx[e["paragraph"]]
            max_ctx = T - len(q) - 3
            span = None
            if training and not e["impossible"] and e["aligned"] and e["answers"]:
                a0 = e["answers"][0]
                span = (a0["start"], a0["start"] + len(a0["text"]))
                if not any(s < span[1] and t > span[0] for s, t in offs):
                    continue  # as bertqa: an answer that covers no token (e.g. "\x1c", "\u200b") is not trained on
            for ws, we in ctx_windows(len(cids), max_ctx, a.doc_stride):
                sp = ep = 0
                has = False
                if span and we > ws and offs[ws][0] <= span[0] and offs[we - 1][1] >= span[1]:
                    s_tok = ws
                    while s_tok + 1 < we and offs[s_tok + 1][0] <= span[0]:
                        s_tok += 1
                    e_tok = we - 1
                    while e_tok > s_tok and offs[e_tok - 1][1] >= span[1]:
                        e_tok -= 1
                    sp, ep, has = len(q) + 2 + s_tok - ws, len(q) + 2 + e_tok - ws, True
                rows.append((i, q, e["paragraph"], ws, we, sp, ep, has))
        n = len(rows)
        self.ids = np.full((n, T), pad, dtype=np.int32)
        self.types = np.zeros((n, T), dtype=np.int32)
        self.lens = np.zeros(n, dtype=np.int32)
        self.start = np.zeros(n, dtype=np.int64)
        self.end = np.zeros(n, dtype=np.int64)
        self.example = np.zeros(n, dtype=np.int64)
        self.ctx_start = np.zeros(n, dtype=np.int32)
        self.span = []  # (paragraph, ws, we) per window, for the offsets
        self.with_answer = 0
        for k, (i, q, p, ws, we, sp, ep, has) in enumerate(rows):
            cs = len(q) + 2
            L = cs + (we - ws) + 1
            r = self.ids[k]
            r[0] = cls
            r[1:1 + len(q)] = q
            r[1 + len(q)] = sep
            r[cs:cs + we - ws] = ctx[p][0][ws:we]
            r[L - 1] = sep
            self.types[k, cs:L] = 1
            self.lens[k], self.start[k], self.end[k], self.example[k], self.ctx_start[k] = L, sp, ep, i, cs
            self.span.append((p, ws, we))
            self.with_answer += has
        self.ctx = ctx
        self.n = n
        self.seconds = time.time() - t0

    def digest(self, labels):
        """bertqa's `windows_digest` (src/train/mod.rs)."""
        h = hashlib.sha256()
        for k in range(self.n):
            L = int(self.lens[k])
            parts = [np.array([L], dtype="<i4"), self.ids[k, :L].astype("<i4")]
            if labels:
                parts.append(np.array([self.start[k], self.end[k]], dtype="<i4"))
            h.update(np.concatenate(parts).tobytes())
        return h.hexdigest()


# ---------------------------------------------------------------- official evaluate-v1.1 and post-processing
def normalize_answer(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(p, g):
    pt, gt = normalize_answer(p).split(), normalize_answer(g).split()
    common = collections.Counter(pt) & collections.Counter(gt)
    ns = sum(common.values())
    if ns == 0:
        return 0
    pr, rc = ns / len(pt), ns / len(gt)
    return 2 * pr * rc / (pr + rc)


def evaluate(examples, preds):
    em = f1 = 0.0
    for e in examples:
        gts = [a["text"] for a in e["answers"]] or [""]
        p = preds.get(e["id"], "")
        em += max(float(normalize_answer(p) == normalize_answer(g)) for g in gts)
        f1 += max(f1_score(p, g) for g in gts)
    return {"exact_match": 100 * em / len(examples), "f1": 100 * f1 / len(examples)}


def postprocess(examples, W, s_all, e_all, n_best=20, max_len=30):
    """bertqa's post-processing (src/eval/postprocess.rs): per window the top-n start and end logits, spans of
    context tokens with end >= start and at most max_len tokens, best start+end over the example's windows."""
    best = {}
    for k in range(W.n):
        sl, el = s_all[k], e_all[k]
        p, ws, we = W.span[k]
        cs = int(W.ctx_start[k]); ce = cs + we - ws  # the context tokens: positions [cs, ce)
        si = np.argsort(-sl, kind="stable")[:n_best]
        ej = np.argsort(-el, kind="stable")[:n_best]
        si = si[(si >= cs) & (si < ce)]
        ej = ej[(ej >= cs) & (ej < ce)]
        if not len(si) or not len(ej):
            continue
        score = sl[si][:, None].astype(np.float64) + el[ej][None, :].astype(np.float64)
        ok = (ej[None, :] >= si[:, None]) & (ej[None, :] - si[:, None] + 1 <= max_len)
        if not ok.any():
            continue
        score = np.where(ok, score, -np.inf)
        i, j = np.unravel_index(int(np.argmax(score)), score.shape)
        ei = int(W.example[k])
        if ei not in best or score[i, j] > best[ei][0]:
            offs = W.ctx[p][1]
            best[ei] = (score[i, j], offs[ws + si[i] - cs][0], offs[ws + ej[j] - cs][1])
    return {ex["id"]: (ex["context"][best[i][1]:best[i][2]] if i in best else "") for i, ex in enumerate(examples)}


# ---------------------------------------------------------------- environment
def environment():
    import transformers
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda_runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update({"gpu": p.name, "sm": f"{p.major}.{p.minor}", "gpu_memory_gib": p.total_memory / 2**30})
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:
            env["driver"] = None
        env["sdpa_enabled"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                               "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                               "math": torch.backends.cuda.math_sdp_enabled(),
                               "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)()}
    else:
        env["gpu"] = None
    return env


# the SDPA backend from the kernel names, most specific first (cuDNN's names contain "flash" and "sdpa",
# the memory-efficient kernels are CUTLASS "fmha_cutlass*" / "*efficient_attention*")
SDPA_PATTERNS = [("cudnn", ("cudnn",)),
                 ("mem_efficient", ("efficient_attention", "fmha_cutlass", "mem_eff", "attentionkernel", "attention_kernel")),
                 ("flash", ("flash",)), ("math", ("_scaled_dot_product_attention_math", "softmax"))]


def profile_step(step, dev):
    """Run `step` once under torch.profiler: (per-kernel ms of the step, largest first; attention kernels and the
    SDPA backend they show)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if dev == "cuda":
            torch.cuda.synchronize()
    rows = {}
    for ev in prof.key_averages():
        if dev == "cuda":
            t = getattr(ev, "self_device_time_total", None)
            if t is None:
                t = getattr(ev, "self_cuda_time_total", 0)
            if not t or ev.key.startswith(("aten::", "cuda", "Memcpy", "Memset", "Torch-Compiled", "CompiledFunction", "##")):
                continue
        else:
            t = ev.self_cpu_time_total
            if not ev.key.startswith("aten::"):
                continue
        rows[ev.key[:120]] = rows.get(ev.key[:120], 0.0) + t / 1e3
    kernels = dict(sorted(rows.items(), key=lambda kv: -kv[1]))
    names = [k for k in kernels if any(p in k.lower() for p in ("attention", "flash", "fmha", "sdpa", "scaled_dot"))]
    backend = None
    for name, pats in SDPA_PATTERNS:
        if any(p in k.lower() for k in names for p in pats):
            backend = name
            break
    return kernels, {"kernels": names, "backend": backend}


def measure_peak(n, dev):
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)
    for _ in range(3):
        a @ b
    reps, times = 20, []
    if dev == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in ev:
            s.record(); a @ b; e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1e3 for s, e in ev]
    else:
        for _ in range(reps):
            t = time.perf_counter(); a @ b; times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"mode": "peak", "gemm": f"torch.matmul {n}x{n}x{n} {str(dt).replace('torch.', '')}", "reps": reps,
            "ms_median": med * 1e3, "tflops": 2 * n ** 3 / med / 1e12, "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"}


class SyncCounter:
    """The host synchronisations inside a block (torch.cuda.set_sync_debug_mode "warn"): where the training
    loop, or the model's own code, waits for the GPU. Used on one step after the first (excluded from the
    statistic as warm-up)."""

    def __init__(self, dev):
        self.dev, self.where = dev, []

    def __enter__(self):
        if self.dev == "cuda":
            self._cw = warnings.catch_warnings(record=True)
            self._rec = self._cw.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.dev == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self._cw.__exit__(*exc)
            self.where = [f"{os.path.basename(w.filename)}:{w.lineno}: {str(w.message)[:80]}" for w in self._rec
                          if "synchroniz" in str(w.message).lower()]
        return False

    def report(self):
        return {"per_step": len(self.where), "where": self.where[:6]} if self.dev == "cuda" else None


class StepTimer:
    """Per-step times without host synchronisation: a pair of CUDA events around each step, read once."""

    def __init__(self, dev):
        self.dev, self.pairs, self.host = dev, [], []

    def start(self):
        if self.dev == "cuda":
            e = torch.cuda.Event(enable_timing=True); e.record(); self.pairs.append([e, None])
        else:
            self.host.append([time.perf_counter(), None])

    def stop(self):
        if self.dev == "cuda":
            e = torch.cuda.Event(enable_timing=True); e.record(); self.pairs[-1][1] = e
        else:
            self.host[-1][1] = time.perf_counter()

    def seconds(self):
        if self.dev == "cuda":
            torch.cuda.synchronize()
            return [s.elapsed_time(e) / 1e3 for s, e in self.pairs]
        return [e - s for s, e in self.host]


# ---------------------------------------------------------------- model, loss, optimizer
def decays(name):  # bertqa's params::decays: matrices only
    return not (name.endswith(".bias") or "LayerNorm" in name)


def make_optimizer(model, a, dev):
    named = list(model.named_parameters())
    dec = [p for n, p in named if decays(n)]
    nodec = [p for n, p in named if not decays(n)]
    groups = [{"params": dec, "weight_decay": a.weight_decay}, {"params": nodec, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_eps,
                            fused=(dev == "cuda"))
    sizes = {"params": sum(p.numel() for _, p in named), "params_decay": sum(p.numel() for p in dec),
             "params_no_decay": sum(p.numel() for p in nodec)}
    return opt, sizes


def span_loss(start_logits, end_logits, real, sp, ep):
    """bertqa's span loss: softmax over each window's real tokens (`real` (B, t) bool), targets -100 ignored;
    (mean start CE + mean end CE) / 2, in f32."""
    neg = torch.finfo(torch.float32).min
    s = start_logits.float().masked_fill(~real, neg)
    e = end_logits.float().masked_fill(~real, neg)
    return (F.cross_entropy(s, sp, ignore_index=-100) + F.cross_entropy(e, ep, ignore_index=-100)) / 2


def load_model(a, dev, cfg=None):
    from transformers import BertConfig, BertForQuestionAnswering
    if cfg is not None:
        if a.no_dropout:
            cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
        try:
            cfg._attn_implementation = "sdpa"
        except Exception:
            pass
        torch.manual_seed(a.seed)
        model = BertForQuestionAnswering(cfg)
    else:
        kw = {"attn_implementation": "sdpa"}
        if a.no_dropout:
            kw.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        try:
            model = BertForQuestionAnswering.from_pretrained(a.model, dtype=torch.float32, **kw)
        except TypeError:
            model = BertForQuestionAnswering.from_pretrained(a.model, torch_dtype=torch.float32, **kw)
    if a.bf16_weights:
        model = model.to(torch.bfloat16)
    return model.to(dev)


def precision_text(a, amp):
    if a.bf16_weights:
        return "bf16 weights, bf16 AdamW state, no f32 master copy, no autocast"
    if amp:
        return "fp32 weights and AdamW state, bf16 autocast (matmuls and SDPA in bf16)"
    return "fp32 throughout"


def compiled(model, a):
    if not a.compile:
        return model
    return torch.compile(model, mode=a.compile_mode or None, dynamic=False)


def mem(dev):
    if dev != "cuda":
        return {"peak_mem_gib": None, "peak_mem_reserved_gib": None}
    return {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def throughput(a, dev, amp, env):
    from transformers import BertConfig
    cfg = BertConfig() if a.config == "bert-base" else BertConfig.from_pretrained(a.config)
    model = load_model(a, dev, cfg)
    opt, sizes = make_optimizer(model, a, dev)
    fwd = compiled(model, a)
    B, T = a.batch_size, a.max_seq_length
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(1000, cfg.vocab_size, (B, T), generator=g).to(dev)
    tt = torch.zeros_like(ids)
    tt[:, T // 8:] = 1
    real = torch.ones(B, T, dtype=torch.bool, device=dev)
    sp = torch.randint(T // 8, T, (B,), generator=g).to(dev)
    ep = torch.clamp(sp + 3, max=T - 1)
    model.train()

    def step():
        # every window is full: no attention mask (the mask-free SDPA path, HF's fastest)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
            out = fwd(input_ids=ids, token_type_ids=tt)
        loss = span_loss(out.start_logits, out.end_logits, real, sp, ep)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm)
        opt.step(); opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    step()  # the first step (compilation under --compile), timed apart
    if dev == "cuda":
        torch.cuda.synchronize()
    first_s = time.time() - t0
    timer = StepTimer(dev)
    for _ in range(a.steps - 1):
        timer.start(); step(); timer.stop()
    times = [first_s] + timer.seconds()
    med, mean = step_stats(times)
    # after the timed steps: one step under the profiler (kernels, the SDPA backend), one counting host syncs
    profile, sdpa = profile_step(step, dev) if not a.no_profile else ({}, {})
    with SyncCounter(dev) as sc:
        step()
    sps = B / med
    fl = flops_per_seq(cfg, T)
    res = {"side": "transformers", "mode": "throughput", "config": a.config, "compile": a.compile,
           "compile_mode": a.compile_mode if a.compile else None, "precision": precision_text(a, amp),
           "attention_mask": None, "batch_size": B, "seq_len": T, "steps": a.steps, "timed_steps": len(times),
           "warmup_steps_excluded": warmup_steps(len(times)), "first_step_seconds": first_s,
           "step_ms_median": med * 1e3, "step_ms_mean": mean * 1e3, "step_ms": [x * 1e3 for x in times],
           "seq_per_s": sps, "tokens_per_s": sps * T, "flops_per_seq": fl, "tflops": fl * sps / 1e12,
           **sizes, **mem(dev), "sdpa": sdpa, "profile_ms_per_step": dict(list(profile.items())[:25]),
           "host_syncs": sc.report(),
           "loss": "span CE over real tokens (custom, = bertqa's)", "env": env,
           "startup_seconds": t0 - T_PROCESS, "wall_seconds": time.time() - T_PROCESS}
    if a.peak_tflops:
        res["mfu"] = res["tflops"] / a.peak_tflops
        res["peak_tflops"] = a.peak_tflops
    return res


def finetune(a, dev, amp, env):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.model, use_fast=True)
    model = load_model(a, dev)
    opt, sizes = make_optimizer(model, a, dev)
    fwd = compiled(model, a)
    # the SQuAD files are read before the clock of featurization starts, as bertqa reads them before its run
    train_ex = load(a.train_file, a.max_train_examples)
    dev_ex = load(a.dev_file, a.max_eval_examples) if a.dev_file else []
    t_ready = time.time()
    TW = Windows(tok, train_ex, a, True)
    DW = Windows(tok, dev_ex, a, False) if dev_ex else None
    t_feat = time.time() - t_ready
    info = {"train_windows": TW.n, "train_windows_with_answer": TW.with_answer, "dev_windows": DW.n if DW else 0}
    print(f"hf_squad: {len(train_ex)} examples -> {TW.n} training windows ({TW.with_answer} with the answer), "
          f"{info['dev_windows']} dev windows; featurized in {t_feat:.1f}s", file=sys.stderr, flush=True)
    T = a.max_seq_length
    # labels as bertqa counts them: a target outside the window's real tokens is ignored (none is, in SQuAD)
    st = np.where(TW.start < TW.lens, TW.start, -100)
    en = np.where(TW.end < TW.lens, TW.end, -100)
    X = {"input_ids": torch.from_numpy(TW.ids.astype(np.int64)).to(dev),
         "token_type_ids": torch.from_numpy(TW.types.astype(np.int64)).to(dev),
         "lens": torch.from_numpy(TW.lens.astype(np.int64)).to(dev),
         "start": torch.from_numpy(st).to(dev), "end": torch.from_numpy(en).to(dev)}
    pos = torch.arange(T, device=dev)
    n, B = TW.n, a.batch_size
    spe = math.ceil(n / B)
    total = spe * a.epochs if not a.max_steps else min(a.max_steps, spe * a.epochs)
    warm = math.ceil(a.warmup_ratio * total)

    def lr_at(s):  # bertqa's linear_schedule
        if s < warm:
            return a.learning_rate * s / max(1, warm)
        return a.learning_rate * max(0.0, (total - s) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s) / a.learning_rate)
    torch.manual_seed(a.seed)
    step, seen, times, losses, eval_s, evals, m, syncs = 0, 0, [], [], 0.0, 0, {}, None
    pred = None
    for ep_i in range(a.epochs):
        if step >= total:
            break
        order = np.asarray(epoch_order(n, a.seed, ep_i), dtype=np.int64)
        order_dev = torch.from_numpy(order).to(dev)
        timer, ep_losses = StepTimer(dev), []
        model.train()
        for bi in range(spe):
            if step >= total:
                break
            lo, hi = bi * B, min((bi + 1) * B, n)
            longest = int(TW.lens[order[lo:hi]].max())  # on the host: no synchronisation
            tl = min(T, -(-longest // a.pad_multiple) * a.pad_multiple)
            sc = SyncCounter(dev if step == 2 else "off")
            sc.__enter__()
            timer.start()
            idx = order_dev[lo:hi]
            real = pos[:tl][None, :] < X["lens"][idx][:, None]
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
                out = fwd(input_ids=X["input_ids"][idx, :tl], token_type_ids=X["token_type_ids"][idx, :tl],
                          attention_mask=real.long())
            loss = span_loss(out.start_logits, out.end_logits, real, X["start"][idx], X["end"][idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm)
            opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
            timer.stop()
            sc.__exit__(None, None, None)
            if step == 2:
                syncs = sc.report()
            ep_losses.append(loss.detach())
            step += 1
            seen += hi - lo
        times += timer.seconds()  # the epoch's one synchronisation
        lv = torch.stack(ep_losses).float().cpu().tolist() if ep_losses else []
        losses += lv
        for k in range(0, len(lv), 200):
            print(f"epoch {ep_i} step {step - len(lv) + k + 1}/{total} loss {lv[k]:.4f}", file=sys.stderr)
        if DW is not None:  # one evaluation per epoch, as bertqa
            te = time.time()
            pred, m = run_eval(model, DW, dev_ex, a, dev, amp, pos)
            eval_s += time.time() - te
            evals += 1
            print(f"eval after epoch {ep_i}: {m}", file=sys.stderr, flush=True)
    if pred is not None:
        os.makedirs(a.output_dir, exist_ok=True)
        json.dump(pred, open(os.path.join(a.output_dir, "predictions.json"), "w"))
    med, mean = step_stats(times)
    train_s = sum(times)
    res = {"side": "transformers", "mode": "finetune", "model": a.model, "seed": a.seed, "compile": a.compile,
           "precision": precision_text(a, amp), "padding": f"longest, rounded up to {a.pad_multiple}",
           "loss": "span CE over real tokens (custom, = bertqa's)", **info,
           "train_windows_sha256": TW.digest(True), "dev_windows_sha256": DW.digest(False) if DW else "",
           "steps": step, "epochs": a.epochs, "batch_size": B, "max_seq_length": T, "doc_stride": a.doc_stride,
           "max_query_length": a.max_query_length, **sizes,
           "startup_seconds": t_ready - T_PROCESS, "featurize_seconds": t_feat, "train_step_seconds": train_s,
           "first_step_seconds": times[0] if times else None,
           "train_step_ms_median": med * 1e3 if med else None, "train_step_ms_mean": mean * 1e3 if mean else None,
           "warmup_steps_excluded": warmup_steps(len(times)), "eval_seconds": eval_s, "evaluations": evals,
           "train_seq_per_s": seen / train_s if train_s else None,
           "final_loss": losses[-1] if losses else None, "losses_first_20": losses[:20], "losses_every_200": losses[::200],
           "host_syncs": syncs, **mem(dev), "env": env, **m}
    res["wall_seconds"] = time.time() - T_PROCESS
    return res


def run_eval(model, DW, dev_ex, a, dev, amp, pos):
    model.eval()
    s_all, e_all = [], []
    T = a.max_seq_length
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
        for i in range(0, DW.n, a.eval_batch_size):
            j = min(DW.n, i + a.eval_batch_size)
            tl = min(T, -(-int(DW.lens[i:j].max()) // a.pad_multiple) * a.pad_multiple)
            ids = torch.from_numpy(DW.ids[i:j, :tl].astype(np.int64)).to(dev)
            tt = torch.from_numpy(DW.types[i:j, :tl].astype(np.int64)).to(dev)
            real = pos[:tl][None, :] < torch.from_numpy(DW.lens[i:j].astype(np.int64)).to(dev)[:, None]
            o = model(input_ids=ids, token_type_ids=tt, attention_mask=real.long())
            s = o.start_logits.float().masked_fill(~real, float("-inf"))
            e = o.end_logits.float().masked_fill(~real, float("-inf"))
            s = F.pad(s, (0, T - tl), value=float("-inf")); e = F.pad(e, (0, T - tl), value=float("-inf"))
            s_all.append(s.cpu().numpy()); e_all.append(e.cpu().numpy())
    model.train()
    s_all, e_all = np.concatenate(s_all), np.concatenate(e_all)
    preds = postprocess(dev_ex, DW, s_all, e_all, a.n_best_size, a.max_answer_length)
    return preds, evaluate(dev_ex, preds)


def windows_only(a):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.model, use_fast=True)
    t0 = time.time()
    TW = Windows(tok, load(a.train_file, a.max_train_examples), a, True)
    res = {"mode": "windows", "train_windows": TW.n, "train_windows_with_answer": TW.with_answer,
           "train_windows_sha256": TW.digest(True)}
    if a.dev_file:
        DW = Windows(tok, load(a.dev_file, a.max_eval_examples), a, False)
        res.update({"dev_windows": DW.n, "dev_windows_sha256": DW.digest(False)})
    res["featurize_seconds"] = time.time() - t0
    return res


def self_test():
    assert epoch_order(10, 42, 0) == EPOCH_ORDER_10_42_0, epoch_order(10, 42, 0)
    assert epoch_order(10, 42, 1) == EPOCH_ORDER_10_42_1, epoch_order(10, 42, 1)
    assert ctx_windows(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert ctx_windows(0, 4, 2) == [(0, 0)]
    assert warmup_steps(3) == 1 and warmup_steps(100) == 10
    assert step_stats([9.0, 1.0, 3.0]) == (2.0, 2.0)
    w = Windows.__new__(Windows)  # the window of src/train/mod.rs `windows_digest_known_answer`
    w.n, w.ids = 1, np.array([[101, 7, 102, 8, 9, 102, 0, 0]], dtype=np.int32)
    w.lens, w.start, w.end = np.array([6]), np.array([3]), np.array([4])
    assert w.digest(True) == "10ef0c56f0ee800bc0ff43cde1f880a24fd271fde4ae2c401bb4473d53dfd30a"
    assert w.digest(False) == "d343be784e22e3becfd78a8a8cab96fe8fbe8591bb7471c1f597d3582472ea3d"
    return {"mode": "self-test", "ok": True}


# bertqa's epoch_order(10, 42, 0) and (10, 42, 1) (pinned on the Rust side too: src/train/mod.rs tests)
EPOCH_ORDER_10_42_0 = [2, 6, 4, 8, 5, 1, 7, 9, 0, 3]
EPOCH_ORDER_10_42_1 = [2, 3, 0, 1, 7, 4, 8, 6, 5, 9]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model"); ap.add_argument("--train-file"); ap.add_argument("--dev-file")
    ap.add_argument("--output-dir", default="hf-out")
    ap.add_argument("--epochs", type=int, default=2); ap.add_argument("--learning-rate", type=float, default=3e-5)
    ap.add_argument("--batch-size", type=int, default=32); ap.add_argument("--max-seq-length", type=int, default=384)
    ap.add_argument("--doc-stride", type=int, default=128); ap.add_argument("--max-query-length", type=int, default=64)
    ap.add_argument("--warmup-ratio", type=float, default=0.1); ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--adam-beta1", type=float, default=0.9); ap.add_argument("--adam-beta2", type=float, default=0.999)
    ap.add_argument("--adam-eps", type=float, default=1e-8); ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=42); ap.add_argument("--max-steps", type=int)
    ap.add_argument("--max-train-examples", type=int); ap.add_argument("--max-eval-examples", type=int)
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--n-best-size", type=int, default=20); ap.add_argument("--max-answer-length", type=int, default=30)
    ap.add_argument("--pad-multiple", type=int, default=8,
                    help="batches padded to their longest window rounded up to this (8: HF's usual pad_to_multiple_of)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (dynamic=False)")
    ap.add_argument("--compile-mode", default="", help="torch.compile mode (default: the default mode)")
    ap.add_argument("--fp32", action="store_true", help="no autocast (fp32 throughout)")
    ap.add_argument("--bf16-weights", action="store_true", help="the model in bf16 (no f32 master), no autocast")
    ap.add_argument("--no-dropout", action="store_true", help="dropout 0 (as bertqa's --hidden-dropout 0 --attention-dropout 0)")
    ap.add_argument("--throughput", action="store_true"); ap.add_argument("--config", default="bert-base")
    ap.add_argument("--steps", type=int, default=60); ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the measured bf16 GEMM peak, for MFU")
    ap.add_argument("--measure-peak", action="store_true"); ap.add_argument("--peak-n", type=int, default=8192)
    ap.add_argument("--windows-only", action="store_true"); ap.add_argument("--self-test", action="store_true")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    a = ap.parse_args()
    if a.self_test:
        print(json.dumps(self_test()))
        return
    if torch is None:
        sys.exit("hf_squad.py: PyTorch is not installed (pip install torch transformers)")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    amp = (not a.fp32) and (not a.bf16_weights) and dev == "cuda"
    if a.measure_peak:
        res = measure_peak(a.peak_n, dev)
    elif a.windows_only:
        res = windows_only(a)
    elif a.throughput:
        res = throughput(a, dev, amp, environment())
    else:
        if not (a.model and a.train_file):
            ap.error("fine-tuning needs --model and --train-file")
        res = finetune(a, dev, amp, environment())
    print(json.dumps(res))


if __name__ == "__main__":
    main()
