#!/usr/bin/env python3
"""Write the Hugging Face reference fixtures used by tests/hf_parity.rs (run by hand, not by CI).

Needs torch, transformers, safetensors. Usage:
    python3 scripts/make_reference.py                       # writes tests/fixtures/{tiny_bert_qa,minilm_window}
    python3 scripts/make_reference.py --check-saved DIR     # checks a model saved by bertqa loads in transformers

1. tiny_bert_qa/: a tiny random BertForQuestionAnswering (2 layers, hidden 32, 4 heads, intermediate 37),
   config.json + model.safetensors (HF names, `bert.` prefix), and reference.safetensors with a padded batch
   (input_ids, token_type_ids, attention_mask, start/end positions), the start/end logits, the loss and the
   gradient of every parameter — computed in float64 (model.double()), dropout off (eval mode).
2. minilm_window/: the first SQuAD v1.1 dev question as HF's tokenizer windows it (max_length 384, stride 128,
   only_second), a seeded qa_outputs head, and all-MiniLM-L6-v2's start/end logits on that window (float32).
3. tokenizer_settings.json: the token ids transformers' AutoTokenizer gives for a few texts (accents, CJK,
   case) in tokenizer directories made from all-MiniLM-L6-v2's vocab.txt / tokenizer.json with each
   tokenizer_config.json setting changed (tests/squad.rs rebuilds the same directories).
"""
import argparse, json, os, shutil, sys, tempfile
import torch
from safetensors.torch import save_file, load_file
from transformers import BertConfig, BertForQuestionAnswering, BertTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
ASSETS = os.environ.get("BERTQA_ASSETS", os.path.join(ROOT, "..", "shared", "assets"))


def tiny():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                     max_position_embeddings=24, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.2)
    model = BertForQuestionAnswering(cfg).eval()
    # make every parameter non-trivial (HF inits LayerNorm to 1/0 and biases to 0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "LayerNorm.weight" not in n else 0.2) + (1.0 if "LayerNorm.weight" in n else 0.0))
            p.copy_(p.float())  # values representable in f32, so the f32 and f64 runs see the same weights
    B, T = 3, 16
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg.vocab_size, (B, T), generator=g)
    lens = [16, 11, 7]
    mask = torch.zeros(B, T, dtype=torch.long)
    types = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
        types[b, n // 2:n] = 1
    ids = ids * mask
    starts = torch.tensor([3, 0, 2])
    ends = torch.tensor([5, 0, 4])
    out_dir = os.path.join(FIX, "tiny_bert_qa")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)  # float32 weights, HF names
    m64 = BertForQuestionAnswering.from_pretrained(out_dir).double().eval()
    m64.zero_grad()
    out = m64(input_ids=ids, token_type_ids=types, attention_mask=mask, start_positions=starts, end_positions=ends)
    out.loss.backward()
    ref = {"input_ids": ids.int(), "token_type_ids": types.int(), "attention_mask": mask.int(),
           "start_positions": starts.int(), "end_positions": ends.int(),
           "start_logits": out.start_logits.detach(), "end_logits": out.end_logits.detach(),
           "loss": out.loss.detach().reshape(1)}
    for n, p in m64.named_parameters():
        if p.grad is not None:
            ref["grad." + n] = p.grad.detach().contiguous()
    save_file(ref, os.path.join(out_dir, "reference.safetensors"))
    print(f"tiny: loss {out.loss.item():.12f}, {sum(1 for k in ref if k.startswith('grad.'))} gradient tensors -> {out_dir}")


def minilm():
    src = os.path.join(ASSETS, "all-MiniLM-L6-v2")
    dev = json.load(open(os.path.join(ASSETS, "squad-v1.1", "dev-v1.1.json")))
    para = dev["data"][0]["paragraphs"][0]
    qa = para["qas"][0]
    tok = BertTokenizerFast.from_pretrained(src)
    enc = tok(qa["question"], para["context"], truncation="only_second", max_length=384, stride=128,
              return_overflowing_tokens=True, padding="max_length", return_tensors="pt")
    model = BertForQuestionAnswering.from_pretrained(src).eval()  # qa_outputs freshly initialised...
    torch.manual_seed(3)
    with torch.no_grad():  # ...and replaced by a seeded head stored in the fixture
        model.qa_outputs.weight.copy_(torch.randn(2, 384) * 0.05)
        model.qa_outputs.bias.copy_(torch.randn(2) * 0.05)
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"][:1], token_type_ids=enc["token_type_ids"][:1], attention_mask=enc["attention_mask"][:1])
    out_dir = os.path.join(FIX, "minilm_window")
    os.makedirs(out_dir, exist_ok=True)
    save_file({"input_ids": enc["input_ids"][:1].int().contiguous(), "token_type_ids": enc["token_type_ids"][:1].int().contiguous(),
               "attention_mask": enc["attention_mask"][:1].int().contiguous(),
               "qa_outputs.weight": model.qa_outputs.weight.detach().contiguous(), "qa_outputs.bias": model.qa_outputs.bias.detach().contiguous(),
               "start_logits": out.start_logits.contiguous(), "end_logits": out.end_logits.contiguous()},
              os.path.join(out_dir, "reference.safetensors"), metadata={"question_id": qa["id"]})
    print(f"minilm: question {qa['id']}, {int(enc['attention_mask'][0].sum())} tokens -> {out_dir}")


# name: (with tokenizer.json, tokenizer_config.json or None for none, tokenizer.json's "lowercase" or None to keep)
TOKENIZER_VARIANTS = {
    "vocab_default": (False, {}, None),
    "vocab_cased": (False, {"do_lower_case": False}, None),
    "vocab_keep_accents": (False, {"do_lower_case": True, "strip_accents": False}, None),
    "vocab_cased_strip_accents": (False, {"do_lower_case": False, "strip_accents": True}, None),
    "vocab_no_chinese": (False, {"tokenize_chinese_chars": False}, None),
    "json_no_config": (True, None, None),
    "json_config_cased": (True, {"do_lower_case": False}, None),
    "json_cased_no_config": (True, None, False),
    "json_cased_config_cased": (True, {"do_lower_case": False}, False),
    # BERT's pipeline is rebuilt whatever tokenizer.json holds (clean_text off, another pre-tokenizer)...
    "json_odd_pipeline": (True, {}, None),
    # ...unless the class says to keep tokenizer.json as it is
    "json_odd_pipeline_kept": (True, {"tokenizer_class": "PreTrainedTokenizerFast"}, None),
}


def odd_pipeline(j):
    """tokenizer.json with clean_text off and the Whitespace pre-tokenizer (not BERT's)."""
    j["normalizer"]["clean_text"] = False
    j["pre_tokenizer"] = {"type": "Whitespace"}
TOKENIZER_TEXTS = ["Café Zoë, naïve résumé!", "北京 is in 中国; Tokyo is 東京.",
                   "The Denver Broncos (AFC) defeated Panthers 24–10.", "ÅNGSTRÖM Ünïcödé Straße",
                   "a [SEP] b [sep] [MASK]x [UNK]", "Hello\x0cWorld what?! tab\there"]


def tokenizer_settings():
    from transformers import AutoTokenizer
    src = os.path.join(ASSETS, "all-MiniLM-L6-v2")
    out = {"texts": TOKENIZER_TEXTS, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (use_json, cfg, json_lower) in TOKENIZER_VARIANTS.items():
            d = os.path.join(tmp, name)
            os.makedirs(d)
            shutil.copy(os.path.join(src, "vocab.txt"), d)
            if use_json:
                j = json.load(open(os.path.join(src, "tokenizer.json")))
                j["truncation"], j["padding"] = None, None
                if json_lower is not None:
                    j["normalizer"]["lowercase"] = json_lower
                if name.startswith("json_odd_pipeline"):
                    odd_pipeline(j)
                json.dump(j, open(os.path.join(d, "tokenizer.json"), "w"))
            written = None if cfg is None else dict({"tokenizer_class": "BertTokenizer"}, **cfg)
            if written is not None:
                json.dump(written, open(os.path.join(d, "tokenizer_config.json"), "w"))
            json.dump({"model_type": "bert"}, open(os.path.join(d, "config.json"), "w"))  # for AutoTokenizer
            tok = AutoTokenizer.from_pretrained(d)
            out["variants"][name] = {"tokenizer_json": use_json, "tokenizer_json_lowercase": json_lower,
                                     "odd_pipeline": name.startswith("json_odd_pipeline"),
                                     "tokenizer_config": written,
                                     "ids": [tok(t, add_special_tokens=False)["input_ids"] for t in TOKENIZER_TEXTS]}
    import transformers
    out["transformers"] = transformers.__version__
    with open(os.path.join(FIX, "tokenizer_settings.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    print(f"tokenizer settings: {len(out['variants'])} variants -> tests/fixtures/tokenizer_settings.json")


def check_saved(d):
    model, info = BertForQuestionAnswering.from_pretrained(d, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    print("loading info:", info)
    if bad:
        sys.exit(f"FAIL: {d} loaded with {bad}")
    msg = f"OK: {d} loads in transformers with no missing/unexpected keys"
    ref_dir = os.path.join(FIX, "tiny_bert_qa")
    if model.config.hidden_size == BertConfig.from_pretrained(ref_dir).hidden_size:  # the tiny fixture model
        ref = load_file(os.path.join(ref_dir, "reference.safetensors"))
        model = model.double().eval()
        out = model(input_ids=ref["input_ids"].long(), token_type_ids=ref["token_type_ids"].long(), attention_mask=ref["attention_mask"].long())
        msg += f"; start-logit max diff vs the fixture {(out.start_logits - ref['start_logits']).abs().max().item():.3g}"
    print(msg)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-saved")
    a = ap.parse_args()
    if a.check_saved:
        check_saved(a.check_saved)
    else:
        tiny()
        minilm()
        tokenizer_settings()
