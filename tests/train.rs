//! Training on the CPU backend: a tiny random BERT overfits 32 SQuAD questions; resume is bit-exact;
//! AdamW against hand-computed values; fp16 overflow skips the step and halves the loss scale.

use bertqa::cpu::Cpu;
use bertqa::data::features::{featurize, FeatureCfg};
use bertqa::data::squad::Dataset;
use bertqa::data::tokenizer;
use bertqa::eval::postprocess::PostCfg;
use bertqa::model::{checkpoint, BertConfig};
use bertqa::ops::adamw::AdamWHyper;
use bertqa::ops::STATS_LEN;
use bertqa::prelude::*;
use bertqa::train::{self, RunInputs, TrainConfig, Trainer};
use std::path::PathBuf;

fn assets() -> Option<PathBuf> {
    bertqa::util::assets_or_skip()
}

/// The first `n` SQuAD v1.1 training questions and all-MiniLM-L6-v2's tokenizer.
fn squad_subset(a: &std::path::Path, n: usize) -> (Dataset, tokenizer::WordPieceTokenizer) {
    let mut ds = Dataset::load(&a.join("squad-v1.1/train-v1.1.json")).unwrap();
    ds.truncate(n);
    (ds, tokenizer::load(&a.join("all-MiniLM-L6-v2")).unwrap())
}

fn tcfg(fc: FeatureCfg) -> TrainConfig {
    TrainConfig {
        epochs: 1,
        learning_rate: 2e-3,
        batch_size: 16,
        warmup_ratio: 0.05,
        seed: 7,
        save_total_limit: 0,
        hidden_dropout: 0.0,
        attention_dropout: 0.0,
        max_bad_steps: 3,
        eval_batch_size: 32,
        features: fc.into(),
        ..TrainConfig::default()
    }
}

fn tiny_cfg() -> BertConfig {
    BertConfig::tiny(30522, 64, 2, 4, 128, 512)
}

/// HF-style random initial weights of `tiny_cfg()` on the CPU, as f32 master weights.
fn tiny_master(seed: u64) -> (BertConfig, bertqa::model::BertParams<Cpu>) {
    let cfg = tiny_cfg();
    let host = checkpoint::random_init_host(&cfg, seed);
    let stripped: checkpoint::HostTensors = host
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("bert.").map(String::from).unwrap_or(k), v))
        .collect();
    let (master, _) =
        checkpoint::params_from_host(&Cpu::new(), &cfg, &stripped, DType::F32, seed, "random")
            .unwrap();
    (cfg, master)
}

#[test]
fn tiny_random_bert_overfits_32_questions() {
    let Some(a) = assets() else { return };
    let t0 = std::time::Instant::now();
    let be = Cpu::new();
    let (ds, tok) = squad_subset(&a, 32);
    let fc = FeatureCfg {
        max_seq_length: 256,
        doc_stride: 96,
        max_query_length: 48,
    };
    let feats = train::training_features(&ds, &tok, &fc).unwrap();
    let (cfg, master) = tiny_master(1);
    let mut tr = Trainer::new(&be, cfg, master, DType::F32, tcfg(fc)).unwrap();
    let mut last = f64::INFINITY;
    let steps = 100;
    for step in 0..steps {
        let batch: Vec<_> = feats.iter().collect(); // full batch: plain gradient descent on 32 questions
        let lr = bertqa::optim::linear_schedule(step, 5, steps, 4e-3);
        let st = tr.step(&batch, lr).unwrap();
        let (loss, applied) = (st.loss, st.applied);
        assert!(applied);
        last = loss;
        if step % 10 == 0 {
            println!("step {step}: loss {loss:.4}");
        }
    }
    // loss over all training windows, then exact match on the same questions
    let all: Vec<_> = feats.iter().collect();
    let mut total = 0.0;
    for ch in all.chunks(16) {
        let l = tr.step(ch, 0.0).unwrap().loss; // lr 0: a pure evaluation of the loss (weights unchanged)
        total += l * ch.len() as f64;
    }
    let mean = total / all.len() as f64;
    let eval_feats = featurize(&ds, &tok, &fc, false).unwrap().features;
    let m = tr.evaluate(&ds, &eval_feats, &PostCfg::default()).unwrap();
    let em = m["exact_match"].as_f64().unwrap();
    println!(
        "final batch loss {last:.4}, loss over all windows {mean:.4}, {m} in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    assert!(mean < 0.1, "loss {mean}");
    assert!(em >= 90.0, "EM {em}");
}

fn run_steps(out: &std::path::Path, stop_after: Option<usize>, resume: bool) -> Vec<String> {
    let a = assets().unwrap();
    let be = Cpu::new();
    let (ds, tok) = squad_subset(&a, 24);
    let fc = FeatureCfg {
        max_seq_length: 128,
        doc_stride: 48,
        max_query_length: 32,
    };
    let model_dir = out.join("init");
    let cfg = tiny_cfg();
    if !model_dir.exists() {
        checkpoint::write_random_model(&model_dir, &cfg, 3, &a.join("all-MiniLM-L6-v2")).unwrap();
    }
    let mut c = tcfg(fc);
    c.epochs = 2;
    c.batch_size = 8;
    c.grad_accum_steps = 2;
    c.hidden_dropout = 0.1; // dropout on: its masks must also resume exactly
    c.attention_dropout = 0.1;
    c.learning_rate = 1e-3;
    let mut tr = if resume {
        let r = bertqa::train::checkpoint::restore(
            &be,
            &bertqa::train::checkpoint::latest(&out.join("run")).unwrap(),
        )
        .unwrap();
        bertqa::train::checkpoint::into_trainer(&be, r).unwrap()
    } else {
        let (bc, master, _) = checkpoint::load(&be, &model_dir, DType::F32, 0).unwrap();
        Trainer::new(&be, bc, master, DType::F32, c).unwrap()
    };
    let inp = RunInputs {
        train: &ds,
        dev: None,
        tokenizer: &tok,
        output_dir: out.join("run"),
        model_dir: model_dir.clone(),
        precision: DType::F32,
        resume_from: None,
        show_progress: false,
        interrupt: None,
        stop_after_steps: stop_after,
    };
    train::run(&mut tr, &inp).unwrap();
    std::fs::read_to_string(out.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!(
                "{} {} {}",
                v["step"],
                v["loss"].as_f64().map(|x| x.to_bits()).unwrap_or(0),
                v["grad_norm"].as_f64().map(|x| x.to_bits()).unwrap_or(0)
            )
        })
        .collect()
}

#[test]
fn resume_reproduces_the_uninterrupted_loss_trajectory_bit_for_bit() {
    if assets().is_none() {
        return;
    }
    let base = std::env::temp_dir().join(format!("bertqa-resume-{}", std::process::id()));
    let (a, b) = (base.join("a"), base.join("b"));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let straight = run_steps(&a, None, false);
    let first = run_steps(&b, Some(3), false); // "interrupted" after step 3: checkpoint-3 saved
    assert_eq!(first.len(), 3);
    assert!(b.join("run/checkpoint-3/optimizer.safetensors").exists());
    let resumed = run_steps(&b, None, true);
    println!(
        "uninterrupted: {} steps; interrupted at 3 then resumed: {} lines",
        straight.len(),
        resumed.len()
    );
    assert!(straight.len() > 4, "need steps after the interruption");
    assert_eq!(
        straight, resumed,
        "loss/grad-norm trajectories differ after resume"
    );
    // a checkpoint of the layout-dependent dropout stream (version 1: no "dropout_stream" field) is not
    // resumed: its masks would change mid-run
    let ck = bertqa::train::checkpoint::latest(&b.join("run")).unwrap();
    let st_path = ck.join("trainer_state.json");
    let mut st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&st_path).unwrap()).unwrap();
    st.as_object_mut().unwrap().remove("dropout_stream");
    std::fs::write(&st_path, st.to_string()).unwrap();
    let e = bertqa::train::checkpoint::restore(&Cpu::new(), &ck)
        .err()
        .expect("an old stream must be refused")
        .to_string();
    assert!(
        e.contains("dropout stream 1") && e.contains("--model"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn adamw_matches_hand_computed_values() {
    let be = Cpu::new();
    // p = 1.0, g = 0.5 (loss scale 0.5 → 1.0), m = v = 0, t = 1, lr 0.1, wd 0.01 (decayed), eps 1e-8
    // p ← 1 − 0.1·0.01·1 = 0.999; m = 0.1; v = 0.001; m̂ = 1; v̂ = 1; p ← 0.999 − 0.1·1/(1 + 1e-8)
    let mut p = Tensor::from_f64(&be, &[1.0, -2.0], &[2], DType::F64).unwrap();
    let g = Tensor::from_f64(&be, &[0.5, 0.25], &[2], DType::F64).unwrap();
    let mut m = Tensor::zeros(&be, &[2], DType::F64).unwrap();
    let mut v = Tensor::zeros(&be, &[2], DType::F64).unwrap();
    let hp = AdamWHyper {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 1,
        loss_scale: 0.5,
        max_grad_norm: 0.0,
    };
    // the step's statistics: finite loss sums, Σ g² (no clipping here)
    let stats = Tensor::from_f64(&be, &[1.0, 2.0, 0.3125], &[STATS_LEN], DType::F64).unwrap();
    // both elements before the decay boundary
    be.adamw_step(&mut p, None, &g, &mut m, &mut v, 2, &stats, &hp)
        .unwrap();
    let pv = p.to_f64_vec(&be).unwrap();
    assert!(
        (pv[0] - (0.999 - 0.1 / (1.0 + 1e-8))).abs() < 1e-15,
        "{}",
        pv[0]
    );
    // second element: p = −2 → −2·(1−0.001) = −1.998; g = 0.5 → m̂ = 0.5, v̂ = 0.25 → step 0.1·0.5/(0.5+1e-8)
    assert!(
        (pv[1] - (-1.998 - 0.1 * 0.5 / (0.5 + 1e-8))).abs() < 1e-15,
        "{}",
        pv[1]
    );
    let (mv, vv) = (m.to_f64_vec(&be).unwrap(), v.to_f64_vec(&be).unwrap());
    assert!((mv[0] - 0.1).abs() < 1e-15 && (vv[0] - 0.001).abs() < 1e-15);
    // step 2, no decay, g = 1 → m = 0.19, v = 0.001999; m̂ = 0.19/0.19 = 1; v̂ = 0.001999/0.001999 = 1
    let before = p.to_f64_vec(&be).unwrap()[0];
    let hp2 = AdamWHyper {
        step: 2,
        weight_decay: 0.0,
        ..hp
    };
    be.adamw_step(&mut p, None, &g, &mut m, &mut v, 0, &stats, &hp2)
        .unwrap();
    assert!((p.to_f64_vec(&be).unwrap()[0] - (before - 0.1 / (1.0 + 1e-8))).abs() < 1e-14);
    // the decay boundary: with n_decay = 1 only element 0 is decayed
    let mut p = Tensor::from_f64(&be, &[1.0, 1.0], &[2], DType::F64).unwrap();
    let zero = Tensor::zeros(&be, &[2], DType::F64).unwrap();
    let (mut m, mut v) = (
        zero.cast(&be, DType::F64).unwrap(),
        zero.cast(&be, DType::F64).unwrap(),
    );
    be.adamw_step(&mut p, None, &zero, &mut m, &mut v, 1, &stats, &hp)
        .unwrap();
    assert_eq!(p.to_f64_vec(&be).unwrap(), vec![1.0 - 0.1 * 0.01, 1.0]);
}

/// AdamW takes its gradient multiplier from the step's statistics on the device: global-norm clipping from
/// Σ g² (as torch.nn.utils.clip_grad_norm_), and no update at all when a loss sum or Σ g² is non-finite.
#[test]
fn adamw_clips_and_skips_from_the_step_statistics() {
    let be = Cpu::new();
    let g = Tensor::from_f64(&be, &[0.5, 0.25], &[2], DType::F64).unwrap();
    let hp = AdamWHyper {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
        loss_scale: 1.0,
        max_grad_norm: 0.1,
    };
    let run = |st: [f64; 3]| {
        let mut p = Tensor::from_f64(&be, &[1.0, -2.0], &[2], DType::F64).unwrap();
        let (mut m, mut v) = (
            Tensor::zeros(&be, &[2], DType::F64).unwrap(),
            Tensor::zeros(&be, &[2], DType::F64).unwrap(),
        );
        let mut stats = Tensor::from_f64(&be, &st, &[STATS_LEN], DType::F64).unwrap();
        be.grad_sq_norm(&mut stats, &g).unwrap();
        be.adamw_step(&mut p, None, &g, &mut m, &mut v, 0, &stats, &hp)
            .unwrap();
        let out = |t: &Tensor<Cpu>| t.to_f64_vec(&be).unwrap();
        (out(&p), out(&m), out(&v), out(&stats))
    };
    // norm = √(0.25 + 0.0625) = 0.5590…; clip = 0.1 / (norm + 1e-6); m = (1 − β1)·g·clip
    let (p, m, _, stats) = run([3.0, 4.0, 0.0]);
    assert_eq!(stats, vec![3.0, 4.0, 0.3125]);
    let clip = 0.1 / (0.3125f64.sqrt() + 1e-6);
    assert!((m[0] - 0.1 * 0.5 * clip).abs() < 1e-16, "{m:?}");
    assert!((m[1] - 0.1 * 0.25 * clip).abs() < 1e-16, "{m:?}");
    assert!(p[0] < 1.0 && p[1] < -2.0, "{p:?}");
    // a non-finite loss sum, or a non-finite Σ g²: nothing changes
    for st in [
        [f64::INFINITY, 4.0, 0.0],
        [3.0, f64::NAN, 0.0],
        [3.0, 4.0, f64::INFINITY],
    ] {
        let (p, m, v, _) = run(st);
        assert_eq!(
            (p, m, v),
            (vec![1.0, -2.0], vec![0.0; 2], vec![0.0; 2]),
            "{st:?}"
        );
    }
}

#[test]
fn fp16_overflow_skips_the_step_and_halves_the_loss_scale() {
    let Some(a) = assets() else { return };
    let be = Cpu::new();
    let (ds, tok) = squad_subset(&a, 4);
    let fc = FeatureCfg {
        max_seq_length: 128,
        doc_stride: 48,
        max_query_length: 32,
    };
    let feats = train::training_features(&ds, &tok, &fc).unwrap();
    let (cfg, master) = tiny_master(2);
    let mut tr = Trainer::new(&be, cfg, master, DType::F16, tcfg(fc)).unwrap();
    assert!(tr.scaler.enabled);
    let batch: Vec<_> = feats.iter().take(4).collect();
    let before: Vec<f64> = tr.master_params().qa_w.to_f64_vec(&be).unwrap();
    tr.scaler.scale = 1e12; // dlogits overflow f16 (max 65504)
    let st = tr.step(&batch, 1e-3).unwrap();
    let (norm, applied) = (st.grad_norm, st.applied);
    assert!(!applied && !norm.is_finite());
    assert_eq!(tr.scaler.scale, 5e11);
    assert_eq!(
        tr.master_params().qa_w.to_f64_vec(&be).unwrap(),
        before,
        "a skipped step must not touch the weights"
    );
    tr.scaler.scale = 1024.0;
    let st = tr.step(&batch, 1e-3).unwrap();
    let (loss, norm, applied) = (st.loss, st.grad_norm, st.applied);
    assert!(applied && norm.is_finite() && loss.is_finite());
    assert_ne!(tr.master_params().qa_w.to_f64_vec(&be).unwrap(), before);
}
