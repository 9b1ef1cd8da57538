#!/usr/bin/env python3
"""The PyTorch side of scripts/compare_pytorch.sh: Hugging Face transformers fine-tuning on SQuAD v1.1 with
exactly bertqa's hyperparameters and windows (BertForQuestionAnswering, torch AdamW with no decay on biases and
LayerNorm weights, linear warmup/decay, global-norm clipping 1.0, bf16 autocast, SDPA attention; optionally
torch.compile). Prints one JSON line of results last.

  python3 hf_squad.py --model DIR --train-file train.json --dev-file dev.json [--epochs 2] ...
  python3 hf_squad.py --throughput --config bert-base --steps 40          # random weights, full 384 windows
"""
import argparse, collections, json, math, os, re, string, sys, time
import torch
from transformers import BertConfig, BertForQuestionAnswering, BertTokenizerFast


def flops_per_seq(cfg, t):  # same count as bertqa's BertConfig::train_flops_per_seq
    c, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    gemm = 2 * t * (4 * c * c + 2 * c * f) * l + 2 * t * c * 2
    attn = 2 * 2 * t * t * c * l
    return 3 * (gemm + attn)


def features(tok, examples, a, train):
    qs = [e["question"].lstrip() for e in examples]
    cs = [e["context"] for e in examples]
    enc = tok(qs, cs, truncation="only_second", max_length=a.max_seq_length, stride=a.doc_stride,
              return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
    smap = enc.pop("overflow_to_sample_mapping")
    out = {"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"], "attention_mask": enc["attention_mask"],
           "example": smap, "offsets": []}
    starts, ends = [], []
    for i, offs in enumerate(enc["offset_mapping"]):
        seq = enc.sequence_ids(i)
        out["offsets"].append([o if seq[k] == 1 else None for k, o in enumerate(offs)])
        if train:
            ex = examples[smap[i]]
            a0 = ex["answers"][0]
            sc, ec = a0["answer_start"], a0["answer_start"] + len(a0["text"])
            ts = seq.index(1)
            te = len(seq) - 1 - seq[::-1].index(1)
            if not (offs[ts][0] <= sc and offs[te][1] >= ec):
                starts.append(0); ends.append(0)
            else:
                while ts < len(offs) and offs[ts][0] <= sc:
                    ts += 1
                while offs[te][1] >= ec:
                    te -= 1
                starts.append(ts - 1); ends.append(te + 1)
    out["start"], out["end"] = starts, ends
    return out


def load(path, n=None):
    data = json.load(open(path))["data"]
    ex = []
    for art in data:
        for p in art["paragraphs"]:
            for qa in p["qas"]:
                ex.append({"id": qa["id"], "question": qa["question"], "context": p["context"], "answers": qa["answers"]})
    return ex[:n] if n else ex


# official evaluate-v1.1
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
        gts = [a["text"] for a in e["answers"]]
        p = preds.get(e["id"], "")
        em += max(float(normalize_answer(p) == normalize_answer(g)) for g in gts)
        f1 += max(f1_score(p, g) for g in gts)
    return {"exact_match": 100 * em / len(examples), "f1": 100 * f1 / len(examples)}


def postprocess(examples, feats, s_all, e_all, n_best=20, max_len=30):
    by_ex = collections.defaultdict(list)
    for i, ei in enumerate(feats["example"]):
        by_ex[ei].append(i)
    preds = {}
    for ei, ex in enumerate(examples):
        best, best_s = "", -1e30
        for fi in by_ex[ei]:
            sl, el, offs = s_all[fi], e_all[fi], feats["offsets"][fi]
            si = sorted(range(len(sl)), key=lambda k: -sl[k])[:n_best]
            ej = sorted(range(len(el)), key=lambda k: -el[k])[:n_best]
            for s in si:
                for e in ej:
                    if offs[s] is None or offs[e] is None or e < s or e - s + 1 > max_len:
                        continue
                    sc = sl[s] + el[e]
                    if sc > best_s:
                        best_s, best = sc, ex["context"][offs[s][0]:offs[e][1]]
        preds[ex["id"]] = best
    return preds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model"); ap.add_argument("--train-file"); ap.add_argument("--dev-file"); ap.add_argument("--output-dir", default="hf-out")
    ap.add_argument("--epochs", type=int, default=2); ap.add_argument("--learning-rate", type=float, default=3e-5)
    ap.add_argument("--batch-size", type=int, default=32); ap.add_argument("--max-seq-length", type=int, default=384)
    ap.add_argument("--doc-stride", type=int, default=128); ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.01); ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=42); ap.add_argument("--max-steps", type=int)
    ap.add_argument("--max-train-examples", type=int); ap.add_argument("--max-eval-examples", type=int)
    ap.add_argument("--eval-batch-size", type=int, default=128)
    ap.add_argument("--compile", action="store_true"); ap.add_argument("--fp32", action="store_true")
    ap.add_argument("--no-dynamic-padding", action="store_true", help="pad every batch to max_seq_length (default: trim to the batch's longest window, as bertqa does)")
    ap.add_argument("--throughput", action="store_true"); ap.add_argument("--config", default="bert-base"); ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="measured bf16 GEMM peak for MFU")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    amp = (not a.fp32) and dev == "cuda"
    if a.throughput:
        cfg = BertConfig() if a.config == "bert-base" else BertConfig.from_pretrained(a.config)
        cfg._attn_implementation = "sdpa"
        model = BertForQuestionAnswering(cfg).to(dev)
    else:
        model = BertForQuestionAnswering.from_pretrained(a.model, attn_implementation="sdpa", torch_dtype=torch.float32).to(dev)
        cfg = model.config
    nd = ["bias", "LayerNorm.weight"]
    groups = [{"params": [p for n, p in model.named_parameters() if not any(x in n for x in nd)], "weight_decay": a.weight_decay},
              {"params": [p for n, p in model.named_parameters() if any(x in n for x in nd)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=a.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=(dev == "cuda"))
    fwd = torch.compile(model) if a.compile else model
    T = a.max_seq_length
    if a.throughput:
        B = a.batch_size
        ids = torch.randint(1, cfg.vocab_size, (B, T), device=dev)
        tt = torch.zeros_like(ids); am = torch.ones_like(ids)
        sp = torch.randint(0, T, (B,), device=dev); ep = sp
        times = []
        model.train()
        for s in range(a.steps):
            if dev == "cuda": torch.cuda.synchronize()
            t0 = time.time()
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
                loss = fwd(input_ids=ids, token_type_ids=tt, attention_mask=am, start_positions=sp, end_positions=ep).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm)
            opt.step(); opt.zero_grad(set_to_none=True)
            if dev == "cuda": torch.cuda.synchronize()
            times.append(time.time() - t0)
        st = sorted(times[5:])[len(times[5:]) // 2]
        sps = B / st
        res = {"side": "hf", "mode": "throughput", "config": a.config, "compile": a.compile, "seq_per_s": sps, "tokens_per_s": sps * T,
               "tflops": flops_per_seq(cfg, T) * sps / 1e12,
               "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None}
        if a.peak_tflops:
            res["mfu"] = res["tflops"] / a.peak_tflops
        print(json.dumps(res)); return
    tok = BertTokenizerFast.from_pretrained(a.model)
    t0 = time.time()
    train_ex = load(a.train_file, a.max_train_examples)
    tf = features(tok, train_ex, a, True)
    dev_ex = load(a.dev_file, a.max_eval_examples)
    df = features(tok, dev_ex, a, False)
    t_feat = time.time() - t0
    X = {k: torch.tensor(tf[k], device=dev) for k in ["input_ids", "token_type_ids", "attention_mask", "start", "end"]}
    n = X["input_ids"].shape[0]
    spe = math.ceil(n / a.batch_size)
    total = spe * a.epochs if not a.max_steps else min(a.max_steps, spe * a.epochs)
    warm = math.ceil(a.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    g = torch.Generator().manual_seed(a.seed)
    step, times, losses = 0, [], []
    model.train()
    t_train = time.time()
    for ep in range(a.epochs):
        perm = torch.randperm(n, generator=g).to(dev)
        for bi in range(spe):
            if step >= total: break
            idx = perm[bi * a.batch_size:(bi + 1) * a.batch_size]
            if dev == "cuda": torch.cuda.synchronize()
            ts = time.time()
            tl = T
            if not a.no_dynamic_padding:  # trim to the longest window, rounded up to 64 like bertqa
                tl = min(T, int(math.ceil(int(X["attention_mask"][idx].sum(1).max()) / 64) * 64))
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
                out = fwd(input_ids=X["input_ids"][idx, :tl], token_type_ids=X["token_type_ids"][idx, :tl], attention_mask=X["attention_mask"][idx, :tl],
                          start_positions=X["start"][idx], end_positions=X["end"][idx])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm)
            opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
            if dev == "cuda": torch.cuda.synchronize()
            times.append((time.time() - ts, len(idx)))
            if step % 200 == 0:
                losses.append(out.loss.item())
                print(f"step {step}/{total} loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
            step += 1
    train_s = time.time() - t_train
    steady = times[10:] if len(times) > 20 else times
    sps = sum(b for _, b in steady) / sum(t for t, _ in steady)
    model.eval()
    te = time.time()
    s_all, e_all = [], []
    Xd = {k: torch.tensor(df[k], device=dev) for k in ["input_ids", "token_type_ids", "attention_mask"]}
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
        for i in range(0, Xd["input_ids"].shape[0], a.eval_batch_size):
            o = model(**{k: v[i:i + a.eval_batch_size] for k, v in Xd.items()})
            s_all += o.start_logits.float().cpu().tolist(); e_all += o.end_logits.float().cpu().tolist()
    preds = postprocess(dev_ex, df, s_all, e_all)
    eval_s = time.time() - te
    os.makedirs(a.output_dir, exist_ok=True)
    json.dump(preds, open(os.path.join(a.output_dir, "predictions.json"), "w"))
    m = evaluate(dev_ex, preds)
    res = {"side": "hf", "mode": "finetune", "compile": a.compile, "dynamic_padding": not a.no_dynamic_padding, "train_windows": n, "steps": step, "train_seconds": train_s,
           "featurize_seconds": t_feat, "seq_per_s": sps, "tokens_per_s": sps * T, "tflops": flops_per_seq(cfg, T) * sps / 1e12,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None, "eval_seconds": eval_s, **m}
    if a.peak_tflops:
        res["mfu"] = res["tflops"] / a.peak_tflops
    print(json.dumps(res))


if __name__ == "__main__":
    main()
