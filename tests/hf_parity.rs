//! Parity with Hugging Face transformers (fixtures written by scripts/make_reference.py), checkpoint round
//! trips and checkpoint error messages.

mod common;
use bertqa::cpu::Cpu;
use bertqa::data::features::Feature;
use bertqa::model::batch::{pack, Padding};
use bertqa::model::checkpoint;
use bertqa::model::{ActPlan, BertParams, BertQa, DropoutCfg};
use bertqa::prelude::*;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// All tensors of a safetensors file as f64 (F64/F32/I32/I64).
fn read_all(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let d = v.data();
            let vals: Vec<f64> = match v.dtype() {
                Dtype::F64 => d
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::I32 => d
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::I64 => d
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{n}: {other:?}"),
            };
            (n, (v.shape().to_vec(), vals))
        })
        .collect()
}

fn ints(v: &[f64]) -> Vec<i32> {
    v.iter().map(|&x| x as i32).collect()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// The HF gradient of an internal parameter (the fused qkv concatenates query, key, value).
fn hf_grad(reference: &HashMap<String, (Vec<usize>, Vec<f64>)>, internal: &str) -> Vec<f64> {
    let key = |n: &str| {
        if n.starts_with("qa_outputs") {
            format!("grad.{n}")
        } else {
            format!("grad.bert.{n}")
        }
    };
    if let Some(pre) = internal
        .strip_suffix("attention.self.qkv.weight")
        .or(internal.strip_suffix("attention.self.qkv.bias"))
    {
        let suffix = if internal.ends_with("weight") {
            "weight"
        } else {
            "bias"
        };
        return ["query", "key", "value"]
            .iter()
            .flat_map(|p| {
                reference[&key(&format!("{pre}attention.self.{p}.{suffix}"))]
                    .1
                    .clone()
            })
            .collect();
    }
    reference[&key(internal)].1.clone()
}

fn tiny_parity(dt: DType, tol: f64) {
    let be = Cpu::new();
    let dir = fixture("tiny_bert_qa");
    let (cfg, params, rep) = checkpoint::load(&be, &dir, dt, 0).unwrap();
    assert!(rep.had_prefix && !rep.qa_head_initialised);
    let mut model = BertQa::new(cfg.clone(), params);
    model.mask_padding_in_loss = false; // HF's BertForQuestionAnswering does not mask padding in the loss
    let r = read_all(&dir.join("reference.safetensors"));
    let (b, t) = (r["input_ids"].0[0], r["input_ids"].0[1]);
    let pos = |k: &str| r[k].1.iter().map(|&x| x as i64).collect::<Vec<_>>();
    // HF's padded (B,T) batch as is: every window padded to T (our `max` layout)
    let feats = common::feature_windows(
        &ints(&r["input_ids"].1),
        &ints(&r["token_type_ids"].1),
        &ints(&r["attention_mask"].1),
        t,
        &pos("start_positions"),
        &pos("end_positions"),
    );
    assert_eq!(feats.len(), b);
    let refs: Vec<&Feature> = feats.iter().collect();
    let hb = pack(&refs, 0, Padding::Max).unwrap();
    let mut plan = ActPlan::new(&be, &cfg, hb.n(), b, dt, true).unwrap();
    let (batch, acts) = plan.load(&be, &hb).unwrap();
    model.forward(&be, acts, batch, DropoutCfg::OFF).unwrap();
    let lo = model.loss_mean(&be, acts, batch, 1.0).unwrap();
    let lg = acts.logits.to_f64_vec(&be).unwrap();
    let (s, e): (Vec<f64>, Vec<f64>) = (
        lg.iter().step_by(2).copied().collect(),
        lg.iter().skip(1).step_by(2).copied().collect(),
    );
    let es = max_rel(&s, &r["start_logits"].1);
    let ee = max_rel(&e, &r["end_logits"].1);
    let el = (lo - r["loss"].1[0]).abs() / r["loss"].1[0];
    println!(
        "[{dt}] start logits {es:.2e}, end logits {ee:.2e}, loss {el:.2e} (ours {} vs HF {})",
        lo, r["loss"].1[0]
    );
    assert!(es < tol && ee < tol && el < tol);
    let mut grads = BertParams::zeros(&be, &cfg, bertqa::model::bert::grad_dtype(dt)).unwrap();
    model
        .backward(&be, &mut grads, acts, batch, DropoutCfg::OFF)
        .unwrap();
    let names = bertqa::model::params::param_specs(&cfg);
    let mut worst = 0.0f64;
    for ((name, _), g) in names.iter().zip(grads.tensors()) {
        let ours = g.to_f64_vec(&be).unwrap();
        let theirs = hf_grad(&r, name);
        // floor the scale: the last LayerNorm bias and the span head's bias have an exactly-zero true gradient
        // (softmax over positions is shift-invariant), so HF holds only rounding noise there (and we hold noise
        // for the first and exactly 0 for the second: the model computes none)
        let scale = theirs
            .iter()
            .fold(0.0f64, |m, x| m.max(x.abs()))
            .max(if dt == DType::F64 { 1e-4 } else { 1e-2 });
        let err = ours
            .iter()
            .zip(&theirs)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
            / scale;
        worst = worst.max(err);
        println!("[{dt}] grad {name:<48} {err:.2e}");
        assert!(err < tol, "{name}: {err}");
    }
    println!("[{dt}] worst gradient error {worst:.2e}");
}

#[test]
fn tiny_model_matches_transformers_in_f64() {
    tiny_parity(DType::F64, 1e-9);
}

#[test]
fn tiny_model_matches_transformers_in_f32() {
    tiny_parity(DType::F32, 2e-5);
}

#[test]
fn minilm_logits_match_transformers_on_a_real_squad_window() {
    let Some(assets) = bertqa::util::assets_or_skip() else {
        return;
    };
    let be = Cpu::new();
    let dir = assets.join("all-MiniLM-L6-v2");
    let (cfg, mut params, rep) = checkpoint::load(&be, &dir, DType::F32, 0).unwrap();
    assert!(!rep.had_prefix && rep.qa_head_initialised, "{rep:?}");
    let r = read_all(&fixture("minilm_window").join("reference.safetensors"));
    params
        .qa_w
        .copy_from_f64(&be, &r["qa_outputs.weight"].1)
        .unwrap();
    params
        .qa_b
        .copy_from_f64(&be, &r["qa_outputs.bias"].1)
        .unwrap();
    let model = BertQa::new(cfg.clone(), params);
    let ids = ints(&r["input_ids"].1);
    // our featurizer builds the same window from the same question
    let ds = bertqa::data::squad::Dataset::load(&assets.join("squad-v1.1/dev-v1.1.json")).unwrap();
    let tok = bertqa::data::tokenizer::load(&dir).unwrap();
    let mut one = ds;
    one.truncate(1);
    let f = bertqa::data::features::featurize(&one, &tok, &Default::default(), false).unwrap();
    // HF's arrays are padded to the full length; our window holds the real tokens and the length it was
    // cut for, and the `max` layout pads it with id 0 — HF's [PAD] here (padded rows are compared below)
    let real = ints(&r["attention_mask"].1)
        .iter()
        .rposition(|&m| m != 0)
        .unwrap()
        + 1;
    assert_eq!(
        f.features[0].input_ids,
        ids[..real],
        "our window's token ids differ from HF's tokenizer"
    );
    assert_eq!(
        f.features[0].token_type_ids,
        ints(&r["token_type_ids"].1)[..real]
    );
    assert_eq!(f.features[0].max_len, ids.len());
    assert_eq!(tok.pad, 0);
    assert!(ids[real..].iter().all(|&x| x == tok.pad));
    let t = ids.len();
    // the window as HF ran it: padded to its full length (our `max` layout)
    let hb = pack(&[&f.features[0]], 0, Padding::Max).unwrap();
    assert_eq!(hb.n(), t);
    let mut plan = ActPlan::new(&be, &cfg, t, 1, DType::F32, false).unwrap();
    let (batch, acts) = plan.load(&be, &hb).unwrap();
    model.forward(&be, acts, batch, DropoutCfg::OFF).unwrap();
    let lg = acts.logits.to_f64_vec(&be).unwrap();
    let (s, e): (Vec<f64>, Vec<f64>) = (
        lg.iter().step_by(2).copied().collect(),
        lg.iter().skip(1).step_by(2).copied().collect(),
    );
    let abs = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
    };
    let (ds_, de_) = (abs(&s, &r["start_logits"].1), abs(&e, &r["end_logits"].1));
    println!("all-MiniLM-L6-v2 on dev question 56be4db0acb8001400a502ec: max |Δ start logit| {ds_:.3e}, max |Δ end logit| {de_:.3e} (logit scale {:.3})", r["start_logits"].1.iter().fold(0.0f64, |m, x| m.max(x.abs())));
    assert!(ds_ < 1e-4 && de_ < 1e-4);
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bertqa-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn save_load_round_trip_is_bit_identical() {
    let be = Cpu::new();
    let (cfg, params, _) = checkpoint::load(&be, &fixture("tiny_bert_qa"), DType::F32, 0).unwrap();
    // BERTQA_KEEP_SAVED=DIR keeps the saved model there, for `scripts/make_reference.py --check-saved DIR`
    let keep = std::env::var("BERTQA_KEEP_SAVED").ok().map(PathBuf::from);
    let out = keep.clone().unwrap_or_else(|| tmpdir("roundtrip"));
    checkpoint::save(
        &be,
        &out,
        &cfg,
        &params,
        None,
        checkpoint::raw_config(&fixture("tiny_bert_qa")).as_ref(),
    )
    .unwrap();
    let (cfg2, p2, rep) = checkpoint::load(&be, &out, DType::F32, 0).unwrap();
    assert_eq!(cfg, cfg2);
    assert!(rep.had_prefix && !rep.qa_head_initialised);
    for (a, b) in params.tensors().iter().zip(p2.tensors()) {
        let (x, y) = (a.to_f32_vec(&be).unwrap(), b.to_f32_vec(&be).unwrap());
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
    // the saved file uses HF names only (what transformers expects)
    let saved = read_all(&out.join("model.safetensors"));
    let orig = read_all(&fixture("tiny_bert_qa").join("model.safetensors"));
    let mut a: Vec<_> = saved.keys().cloned().collect();
    let mut b: Vec<_> = orig
        .keys()
        .filter(|k| !k.contains("position_ids") && !k.contains("pooler"))
        .cloned()
        .collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    let conf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(conf["architectures"][0], "BertForQuestionAnswering");
    if keep.is_none() {
        std::fs::remove_dir_all(&out).ok();
    }
}

#[test]
fn checkpoint_errors_name_the_problem() {
    let be = Cpu::new();
    let src = fixture("tiny_bert_qa");
    let host = checkpoint::read_safetensors(&src.join("model.safetensors")).unwrap();
    let cfg_text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let write = |name: &str, h: &checkpoint::HostTensors, cfg: &str| {
        let d = tmpdir(name);
        std::fs::write(d.join("config.json"), cfg).unwrap();
        std::fs::write(
            d.join("model.safetensors"),
            checkpoint::safetensors_bytes(h, None).unwrap(),
        )
        .unwrap();
        d
    };
    let err = |d: &Path| {
        format!(
            "{:#}",
            checkpoint::load(&be, d, DType::F32, 0)
                .err()
                .expect("should fail")
        )
    };
    // missing tensor
    let mut h = host.clone();
    h.remove("bert.encoder.layer.1.attention.self.key.weight");
    let e = err(&write("missing", &h, &cfg_text));
    assert!(
        e.contains("missing tensor") && e.contains("encoder.layer.1.attention.self.key.weight"),
        "{e}"
    );
    // wrong shape
    let mut h = host.clone();
    h.insert(
        "bert.encoder.layer.0.intermediate.dense.bias".into(),
        (vec![36], vec![0.0; 36]),
    );
    let e = err(&write("shape", &h, &cfg_text));
    assert!(
        e.contains("intermediate.dense.bias") && e.contains("[36]") && e.contains("[37]"),
        "{e}"
    );
    // config/weights mismatch
    let e = err(&write(
        "cfg",
        &host,
        &cfg_text.replace("\"hidden_size\": 32", "\"hidden_size\": 64"),
    ));
    assert!(e.contains("shape") && e.contains("config"), "{e}");
    // unexpected tensor
    let mut h = host.clone();
    h.insert(
        "bert.encoder.layer.7.output.dense.weight".into(),
        (vec![2], vec![0.0; 2]),
    );
    let e = err(&write("unexpected", &h, &cfg_text));
    assert!(e.contains("unexpected tensor"), "{e}");
    // truncated file
    let d = write("trunc", &host, &cfg_text);
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );
    // unsupported dtype
    let d = tmpdir("dtype");
    std::fs::write(d.join("config.json"), &cfg_text).unwrap();
    let data = vec![0u8; 8 * 4];
    let view = safetensors::tensor::TensorView::new(Dtype::F64, vec![4], &data).unwrap();
    std::fs::write(
        d.join("model.safetensors"),
        safetensors::serialize(
            vec![("bert.embeddings.LayerNorm.bias".to_string(), view)],
            None,
        )
        .unwrap(),
    )
    .unwrap();
    let e = err(&d);
    assert!(
        e.contains("unsupported dtype") && e.contains("LayerNorm.bias"),
        "{e}"
    );
    // bad config
    let e = err(&write(
        "act",
        &host,
        &cfg_text.replace("\"gelu\"", "\"relu\""),
    ));
    assert!(e.contains("hidden_act"), "{e}");
}

/// The fixture's weights as loaded (f32 values of every parameter, in order).
fn loaded_values(dir: &Path) -> Vec<Vec<f32>> {
    let be = Cpu::new();
    let (_, p, _) = checkpoint::load(&be, dir, DType::F32, 0).unwrap();
    p.tensors()
        .iter()
        .map(|t| t.to_f32_vec(&be).unwrap())
        .collect()
}

/// Checkpoints transformers loads and bertqa now loads the same way (a helper's probe against
/// transformers 5.24 found each refused or read differently): sharded safetensors, LayerNorm gamma/beta
/// names, another task's head (classifier.*). A tensor stored with and without the `bert.` prefix is refused.
#[test]
fn checkpoint_variants_transformers_loads_give_the_same_weights() {
    let src = fixture("tiny_bert_qa");
    let host = checkpoint::read_safetensors(&src.join("model.safetensors")).unwrap();
    let cfg_text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let want = loaded_values(&src);
    let load_err = |d: &Path| {
        format!(
            "{:#}",
            checkpoint::load(&Cpu::new(), d, DType::F32, 0)
                .err()
                .expect("should fail")
        )
    };
    // sharded: two files and the index transformers writes (save_pretrained(max_shard_size=...))
    let d = tmpdir("sharded");
    std::fs::write(d.join("config.json"), &cfg_text).unwrap();
    let (mut a, mut b) = (
        checkpoint::HostTensors::new(),
        checkpoint::HostTensors::new(),
    );
    let mut map = serde_json::Map::new();
    for (i, (k, v)) in host.iter().enumerate() {
        let (part, file) = if i % 2 == 0 {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        part.insert(k.clone(), v.clone());
        map.insert(k.clone(), file.into());
    }
    for (part, file) in [
        (&a, "model-00001-of-00002.safetensors"),
        (&b, "model-00002-of-00002.safetensors"),
    ] {
        std::fs::write(
            d.join(file),
            checkpoint::safetensors_bytes(part, None).unwrap(),
        )
        .unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(loaded_values(&d), want, "sharded");
    // an index that lies about where a tensor is, or lists one no shard holds: named
    let mut bad = index.clone();
    let first = host.keys().next().unwrap().clone();
    bad["weight_map"][&first] = "model-00002-of-00002.safetensors".into();
    std::fs::write(d.join("model.safetensors.index.json"), bad.to_string()).unwrap();
    let e = load_err(&d);
    assert!(e.contains(&first) && e.contains("is not where"), "{e}");
    // a tensor the index leaves out is read from its shard all the same (as transformers reads every
    // key of a listed shard)
    let mut partial = index.clone();
    partial["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove(&first);
    std::fs::write(d.join("model.safetensors.index.json"), partial.to_string()).unwrap();
    assert_eq!(loaded_values(&d), want, "a tensor the index does not list");
    let mut bad = index.clone();
    bad["weight_map"]["bert.extra"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(d.join("model.safetensors.index.json"), bad.to_string()).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("\"bert.extra\"") && e.contains("does not hold it"),
        "{e}"
    );
    // LayerNorm gamma/beta (older checkpoints) and a classifier head (BertForSequenceClassification)
    let d = tmpdir("gamma");
    std::fs::write(d.join("config.json"), &cfg_text).unwrap();
    let mut h = checkpoint::HostTensors::new();
    for (k, v) in &host {
        let k = k
            .replace("LayerNorm.weight", "LayerNorm.gamma")
            .replace("LayerNorm.bias", "LayerNorm.beta");
        h.insert(k, v.clone());
    }
    assert!(h.keys().any(|k| k.ends_with("LayerNorm.gamma")));
    h.insert("classifier.weight".into(), (vec![3, 32], vec![0.5; 96]));
    h.insert("classifier.bias".into(), (vec![3], vec![0.5; 3]));
    std::fs::write(
        d.join("model.safetensors"),
        checkpoint::safetensors_bytes(&h, None).unwrap(),
    )
    .unwrap();
    assert_eq!(loaded_values(&d), want, "gamma/beta + classifier");
    let (_, _, rep) = checkpoint::load(&Cpu::new(), &d, DType::F32, 0).unwrap();
    assert!(
        rep.ignored.contains(&"classifier.weight".to_string()),
        "{:?}",
        rep.ignored
    );
    // the same tensor twice (with and without the prefix): which one would be meant?
    let mut h = host.clone();
    let (s, v) = h["bert.embeddings.LayerNorm.weight"].clone();
    h.insert(
        "embeddings.LayerNorm.weight".into(),
        (s, v.iter().map(|x| x + 1.0).collect()),
    );
    std::fs::write(
        d.join("model.safetensors"),
        checkpoint::safetensors_bytes(&h, None).unwrap(),
    )
    .unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("\"bert.embeddings.LayerNorm.weight\"")
            && e.contains("\"embeddings.LayerNorm.weight\"")
            && e.contains("which one is meant"),
        "{e}"
    );
    // weights transformers saves but bertqa does not read: the error says how to convert them
    let d = tmpdir("bin");
    std::fs::write(d.join("config.json"), &cfg_text).unwrap();
    std::fs::write(d.join("pytorch_model.bin"), b"pickle").unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("pytorch_model.bin")
            && e.contains("save_file")
            && e.contains("weights_only=True"),
        "{e}"
    );
    // configs whose computation this BERT does not implement are refused, not ignored
    for (key, value, says) in [
        ("is_decoder", serde_json::json!(true), "is_decoder"),
        (
            "position_embedding_type",
            serde_json::json!("relative_key"),
            "position_embedding_type \"relative_key\"",
        ),
    ] {
        let mut c: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
        c[key] = value;
        std::fs::write(d.join("config.json"), c.to_string()).unwrap();
        std::fs::write(
            d.join("model.safetensors"),
            checkpoint::safetensors_bytes(&host, None).unwrap(),
        )
        .unwrap();
        let e = load_err(&d);
        assert!(e.contains(says) && e.contains("unsupported config"), "{e}");
    }
}
