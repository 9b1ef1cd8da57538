#!/usr/bin/env python3
"""A SQuAD v1.1 file whose every question makes exactly one window of exactly --max-seq-length real tokens
(no padding anywhere), for the throughput comparison (scripts/compare_pytorch.sh): bertqa trains on it at
B x T with every row a real token, as transformers does on its B x T random tokens — the same GEMM and
attention work on both sides (real SQuAD windows average ~170 tokens, and bertqa's attention skips padding).

Words are whole-word entries of the model's vocab.txt (lowercase ASCII letters, 3+ characters), one token each
under an uncased WordPiece tokenizer; the question is 5 words and "?" (6 tokens), the context
max_seq_length - 6 - 3 words, the answer 2 words of it. compare_pytorch.sh checks the token counts on bertqa's
side (real tokens per window in metrics.jsonl).

  synth_squad.py --vocab MODEL/vocab.txt --examples 1920 --out synth.json [--max-seq-length 384] [--seed 0]
"""
import argparse, json, random, re


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", required=True); ap.add_argument("--out", required=True)
    ap.add_argument("--examples", type=int, default=1920); ap.add_argument("--max-seq-length", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    words = [w.strip() for w in open(a.vocab, encoding="utf-8")]
    words = [w for w in words if re.fullmatch(r"[a-z]{3,}", w)]
    if len(words) < 1000:
        raise SystemExit(f"{a.vocab}: only {len(words)} whole lowercase words: not an uncased BERT vocabulary?")
    r = random.Random(a.seed)
    n_ctx = a.max_seq_length - 6 - 3
    paras = []
    for i in range(a.examples):
        ctx_words = [r.choice(words) for _ in range(n_ctx)]
        k = r.randrange(n_ctx - 1)
        context = " ".join(ctx_words)
        start = len(" ".join(ctx_words[:k])) + (1 if k else 0)
        answer = " ".join(ctx_words[k:k + 2])
        assert context[start:start + len(answer)] == answer
        q = " ".join(r.choice(words) for _ in range(5)) + "?"
        paras.append({"context": context, "qas": [{"id": f"synth-{i}", "question": q,
                                                   "answers": [{"text": answer, "answer_start": start}]}]})
    json.dump({"version": "1.1", "data": [{"title": "synthetic full windows", "paragraphs": paras}]},
              open(a.out, "w"))


if __name__ == "__main__":
    main()
