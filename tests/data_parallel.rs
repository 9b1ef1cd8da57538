//! Data parallelism on CPU replicas (in-process collective): the whole path — splitting a step's windows,
//! the gradient sum, identical updates, rank-0 output, sharded evaluation, resume with another number of
//! devices — checked against one device.
//!
//! - 2 replicas at batch 8 give the bits of one device accumulating 2 micro-batches (the same sums in the
//!   same order), 3 replicas at batch 8 (3+3+2 windows) the bits of 3 micro-batches; both agree with one
//!   device at batch 8 without accumulation within 1e-6 (losses per step, weights per tensor, L2);
//! - the CLI with `--devices cpu,cpu` writes one run (rank 0's), with the same losses and dev scores as
//!   `--device cpu --grad-accum-steps 2`;
//! - a run stopped on 2 devices and resumed on 3 (or 1) continues as the uninterrupted run does;
//! - the rendezvous file: two processes exchange an id through it.

use bertqa::collective::local::Local;
use bertqa::collective::rendezvous::{Rendezvous, RunShape, ID_BYTES};
use bertqa::collective::Collective;
use bertqa::cpu::Cpu;
use bertqa::data::features::{Feature, FeatureCfg};
use bertqa::data::squad::Dataset;
use bertqa::data::tokenizer;
use bertqa::model::{checkpoint, BertConfig, BertParams};
use bertqa::prelude::*;
use bertqa::train::{self, replica, RunInputs, TrainConfig, Trainer};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn assets() -> Option<PathBuf> {
    bertqa::util::assets_or_skip()
}

const FC: FeatureCfg = FeatureCfg {
    max_seq_length: 128,
    doc_stride: 48,
    max_query_length: 32,
};

fn tcfg(batch: usize, accum: usize) -> TrainConfig {
    TrainConfig {
        epochs: 1,
        learning_rate: 1e-3,
        batch_size: batch,
        grad_accum_steps: accum,
        seed: 11,
        save_total_limit: 0,
        // dropout on (the default 0.1): its masks must not depend on which replica computes a window
        max_bad_steps: 3,
        eval_batch_size: 16,
        features: FC.into(),
        ..TrainConfig::default()
    }
}

fn tiny_cfg() -> BertConfig {
    BertConfig::tiny(30522, 64, 2, 4, 128, 512)
}

fn master(be: &Cpu) -> BertParams<Cpu> {
    let cfg = tiny_cfg();
    let host = checkpoint::random_init_host(&cfg, 5);
    let stripped: checkpoint::HostTensors = host
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("bert.").map(String::from).unwrap_or(k), v))
        .collect();
    checkpoint::params_from_host(be, &cfg, &stripped, DType::F32, 5, "random")
        .unwrap()
        .0
}

fn windows(a: &Path) -> Vec<Feature> {
    let mut ds = Dataset::load(&a.join("squad-v1.1/train-v1.1.json")).unwrap();
    ds.truncate(40);
    let tok = tokenizer::load(&a.join("all-MiniLM-L6-v2")).unwrap();
    train::training_features(&ds, &tok, &FC).unwrap()
}

/// Per-step losses and the final weights (per tensor, host f32) of `steps` steps of `batch` windows, on
/// `replicas` CPU replicas (1: no group) accumulating `accum` micro-batches each.
fn trajectory(
    feats: &[Feature],
    replicas: usize,
    batch: usize,
    accum: usize,
    steps: usize,
) -> (Vec<f64>, Vec<Vec<f32>>) {
    let be = Cpu::new();
    let mut tr =
        Trainer::new(&be, tiny_cfg(), master(&be), DType::F32, tcfg(batch, accum)).unwrap();
    let losses = with_replicas(&mut tr, replicas, |tr| {
        let mut losses = vec![];
        for step in 0..steps {
            let b: Vec<&Feature> = feats[step * batch..(step + 1) * batch].iter().collect();
            tr.state.global_step = step;
            let lr = bertqa::optim::linear_schedule(step, 2, steps, 1e-3);
            let o = tr.step(&b, lr).unwrap();
            assert!(o.applied);
            assert_eq!(o.windows, batch);
            losses.push(o.loss);
        }
        losses
    });
    let w = tr
        .master_params()
        .tensors()
        .iter()
        .map(|t| t.to_host::<f32>(&be).unwrap())
        .collect();
    (losses, w)
}

/// `f` on the leader `tr` with `replicas − 1` CPU followers in threads (1: no group); then the run ends
/// for every replica (their weights and optimizer state checked equal to the leader's).
fn with_replicas<R>(
    tr: &mut Trainer<'_, Cpu>,
    replicas: usize,
    f: impl FnOnce(&mut Trainer<'_, Cpu>) -> R,
) -> R {
    std::thread::scope(|s| {
        let mut groups = Local::group(replicas).into_iter();
        let lead = groups.next().unwrap();
        let followers: Vec<_> = groups
            .map(|g| s.spawn(move || replica::follow(&Cpu::new(), Box::new(g))))
            .collect();
        if replicas > 1 {
            replica::lead(tr, Box::new(lead)).unwrap();
        } else {
            drop(lead);
        }
        let r = f(tr);
        tr.leave_group().unwrap();
        for h in followers {
            h.join().unwrap().unwrap();
        }
        r
    })
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}

fn assert_close(what: &str, a: &(Vec<f64>, Vec<Vec<f32>>), b: &(Vec<f64>, Vec<Vec<f32>>)) {
    for (i, (x, y)) in a.0.iter().zip(&b.0).enumerate() {
        let r = (x - y).abs() / y.abs();
        assert!(r <= 1e-6, "{what}: step {i} loss {x} vs {y} (rel {r:.2e})");
    }
    // Parameters without a true gradient: softmax is invariant to a constant added to every score. The
    // span head's bias gets none at all (the model computes none: src/model/bert.rs), so it keeps its
    // initial value exactly in both runs. The last LayerNorm's bias (it only shifts every token's logits
    // alike) and, on the CPU, the key bias (it adds q·b to every key's score alike) receive rounding noise
    // only, which Adam turns into ±lr steps: their values differ between any two summation orders
    // (PyTorch's too), so they are left out.
    let cfg = tiny_cfg();
    let last_ln = format!(
        "encoder.layer.{}.output.LayerNorm.bias",
        cfg.num_hidden_layers - 1
    );
    let c = cfg.hidden_size;
    let mut worst: f64 = 0.0;
    for ((name, _), (x, y)) in bertqa::model::params::param_specs(&cfg)
        .into_iter()
        .zip(a.1.iter().zip(&b.1))
    {
        if name == "qa_outputs.bias" {
            assert!(x == y, "{what}: {name} moved: {x:?} vs {y:?}");
            continue;
        }
        if name == last_ln {
            continue;
        }
        let r = if name.ends_with("attention.self.qkv.bias") {
            // queries and values only
            let qv = |v: &[f32]| [&v[..c], &v[2 * c..]].concat();
            rel_l2(&qv(x), &qv(y))
        } else {
            rel_l2(x, y)
        };
        if r > 1e-6 {
            println!("{what}: {name} differs by {r:.2e} (relative L2)");
        }
        worst = worst.max(r);
    }
    println!("{what}: worst per-tensor relative L2 {worst:.2e}");
    assert!(
        worst <= 1e-6,
        "{what}: weights differ by {worst:.2e} (relative L2)"
    );
}

#[test]
fn replicas_give_the_bits_of_accumulation_and_one_device_within_1e_6() {
    let Some(a) = assets() else { return };
    let feats = windows(&a);
    let steps = 10;
    assert!(feats.len() >= 8 * steps, "{} windows", feats.len());
    let single = trajectory(&feats, 1, 8, 1, steps);
    // 2 replicas at batch 8 (4 + 4 windows), 3 replicas (3 + 3 + 2)
    for n in [2, 3] {
        let accum = trajectory(&feats, 1, 8, n, steps);
        let dp = trajectory(&feats, n, 8, 1, steps);
        // the same sums in the same order: bit for bit
        assert_eq!(dp.0, accum.0, "{n} replicas vs {n} micro-batches: losses");
        assert!(
            dp.1 == accum.1,
            "{n} replicas vs {n} micro-batches: weights differ"
        );
        assert_close(&format!("{n} replicas vs one device"), &dp, &single);
        println!("losses ({n} replicas): {:?}", dp.0);
    }
}

/// A run of 6 steps on `devices` CPU replicas (1: no group), stopped after `stop` steps, or resumed.
fn run_dp(out: &Path, devices: usize, stop: Option<usize>, resume: bool) -> Vec<f64> {
    let a = assets().unwrap();
    let be = Cpu::new();
    let mut ds = Dataset::load(&a.join("squad-v1.1/train-v1.1.json")).unwrap();
    ds.truncate(16);
    let tok = tokenizer::load(&a.join("all-MiniLM-L6-v2")).unwrap();
    let model_dir = out.join("init");
    if !model_dir.exists() {
        checkpoint::write_random_model(&model_dir, &tiny_cfg(), 3, &a.join("all-MiniLM-L6-v2"))
            .unwrap();
    }
    let mut tr = if resume {
        let r =
            train::checkpoint::restore(&be, &train::checkpoint::latest(&out.join("run")).unwrap())
                .unwrap();
        train::checkpoint::into_trainer(&be, r).unwrap()
    } else {
        let (bc, m, _) = checkpoint::load(&be, &model_dir, DType::F32, 0).unwrap();
        let mut c = tcfg(6, 1);
        c.max_steps = Some(6);
        Trainer::new(&be, bc, m, DType::F32, c).unwrap()
    };
    with_replicas(&mut tr, devices, |tr| {
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
            stop_after_steps: stop,
        };
        train::run(tr, &inp).unwrap();
    });
    std::fs::read_to_string(out.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect()
}

#[test]
fn a_run_stopped_on_two_devices_resumes_on_three_or_one() {
    if assets().is_none() {
        return;
    }
    let base = std::env::temp_dir().join(format!("bertqa-dp-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let whole = run_dp(&base.join("whole"), 2, None, false);
    assert_eq!(whole.len(), 6);
    for (k, devices) in [(1, 3), (2, 1)] {
        let dir = base.join(format!("resumed{k}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(base.join("whole/init")).unwrap();
        let first = run_dp(&dir, 2, Some(3), false);
        assert_eq!(first.len(), 3);
        let all = run_dp(&dir, devices, None, true);
        assert_eq!(all.len(), 6, "one metrics line per step, from rank 0 only");
        assert_eq!(all[..3], whole[..3], "the first 3 steps are the same run");
        for (i, (x, y)) in all.iter().zip(&whole).enumerate().skip(3) {
            let r = (x - y).abs() / y.abs();
            assert!(
                r <= 1e-6,
                "resumed on {devices}: step {i} loss {x} vs {y} ({r:.2e})"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bertqa"))
}

#[test]
fn cli_devices_cpu_cpu_is_one_run_with_the_losses_of_accumulation() {
    let Some(a) = assets() else { return };
    let base = std::env::temp_dir().join(format!("bertqa-dp-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let model = base.join("init");
    checkpoint::write_random_model(&model, &tiny_cfg(), 3, &a.join("all-MiniLM-L6-v2")).unwrap();
    let train_file = a.join("squad-v1.1/train-v1.1.json");
    let dev_file = a.join("squad-v1.1/dev-v1.1.json");
    let run = |name: &str, extra: &[&str]| -> (String, serde_json::Value, Vec<String>) {
        let out = base.join(name);
        let o = Command::new(bin())
            .args(["train", "--model"])
            .arg(&model)
            .arg("--train-file")
            .arg(&train_file)
            .arg("--dev-file")
            .arg(&dev_file)
            .arg("--output-dir")
            .arg(&out)
            .args([
                "--max-train-examples",
                "24",
                "--max-eval-examples",
                "12",
                "--max-seq-length",
                "128",
                "--doc-stride",
                "48",
                "--max-query-length",
                "32",
                "--batch-size",
                "8",
                "--max-steps",
                "3",
                "--epochs",
                "1",
                "--learning-rate",
                "1e-3",
                "--no-progress",
                "--save-every",
                "2",
            ])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{name}: {err}");
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap())
                .unwrap();
        let lines = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                match v.get("eval") {
                    Some(e) => format!("eval {} {}", e["exact_match"], e["f1"]),
                    None => format!("{} {}", v["step"], v["loss"].as_f64().unwrap().to_bits()),
                }
            })
            .collect();
        (err, summary, lines)
    };
    let (err, summary, dp) = run("dp", &["--devices", "cpu,cpu"]);
    assert!(err.contains("data parallel over 2 CPU replicas"), "{err}");
    assert_eq!(summary["devices"], 2);
    let (_, _, acc) = run("accum", &["--device", "cpu", "--grad-accum-steps", "2"]);
    assert_eq!(
        dp, acc,
        "2 replicas vs 2 micro-batches: losses and dev scores"
    );
    assert_eq!(
        dp.len(),
        4,
        "3 steps and one evaluation, written once: {dp:?}"
    );
    let ckpts: Vec<_> = std::fs::read_dir(base.join("dp"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert!(ckpts.contains(&"checkpoint-2".to_string()), "{ckpts:?}");
    // both flags: an error naming them
    let o = Command::new(bin())
        .args([
            "train",
            "--model",
            "m",
            "--train-file",
            "t",
            "--output-dir",
            "o",
        ])
        .args(["--device", "cpu", "--devices", "cpu,cpu"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("--devices") && e.contains("--device"),
        "{e}"
    );
    // several machines: the flags they need, and GPUs
    let cases: [(&[&str], &str); 5] = [
        (&["--devices", "0,1", "--nnodes", "2"], "--rendezvous"),
        (
            &[
                "--devices",
                "cpu,cpu",
                "--nnodes",
                "2",
                "--rendezvous",
                "tcp:h:1",
            ],
            "several machines need GPUs",
        ),
        (
            &[
                "--devices",
                "0",
                "--nnodes",
                "2",
                "--node-rank",
                "2",
                "--rendezvous",
                "tcp:h:1",
            ],
            "--node-rank",
        ),
        (&["--devices", "0,0"], "listed twice"),
        (
            &["--devices", "cpu,cpu,cpu", "--batch-size", "2"],
            "at least one window",
        ),
    ];
    for (extra, says) in cases {
        let o = Command::new(bin())
            .args([
                "train",
                "--model",
                "m",
                "--train-file",
                "t",
                "--output-dir",
                "o",
            ])
            .args(extra)
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(says), "{extra:?}: {e}");
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// The run both processes of the rendezvous test say they belong to.
const SHAPE: RunShape = RunShape {
    nnodes: 2,
    devices_per_node: 1,
};

/// The child half of the rendezvous test (does nothing unless the parent started it).
#[test]
fn rendezvous_child_process() {
    let Ok(path) = std::env::var("BERTQA_TEST_RDZV_FILE") else {
        return;
    };
    let r = Rendezvous::parse(&format!("file:{path}")).unwrap();
    let id = r.fetch(1, SHAPE, Duration::from_secs(60)).unwrap();
    std::fs::write(format!("{path}.child"), id).unwrap();
}

#[test]
fn rendezvous_file_hands_the_id_to_another_process() {
    let dir = std::env::temp_dir().join(format!("bertqa-rdzv-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("run.rdzv");
    // the child starts first and waits for the file
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "rendezvous_child_process", "--nocapture"])
        .env("BERTQA_TEST_RDZV_FILE", &path)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let id: [u8; ID_BYTES] = std::array::from_fn(|i| (i * 7 + 3) as u8);
    let r = Rendezvous::parse(&format!("file:{}", path.display())).unwrap();
    r.publish(&id, SHAPE, Duration::from_secs(10)).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(
        std::fs::read(dir.join("run.rdzv.child")).unwrap(),
        id.to_vec()
    );
    // a second run with the same file is refused (the other nodes could read the stale id)
    let e = r.publish(&id, SHAPE, Duration::from_secs(1)).unwrap_err();
    assert!(format!("{e:#}").contains("exists already"), "{e:#}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The child half of the next test: node 0 waiting at a file rendezvous, ended by an early exit
/// (`rendezvous::exit`, what a signal before the training starts calls) while it waits.
#[test]
fn rendezvous_node_zero_child_process() {
    let Ok(path) = std::env::var("BERTQA_TEST_RDZV_NODE0") else {
        return;
    };
    let r = Rendezvous::parse(&format!("file:{path}")).unwrap();
    std::thread::spawn(move || r.publish(&[1u8; ID_BYTES], SHAPE, Duration::from_secs(60)));
    let t = std::time::Instant::now();
    while !std::path::Path::new(&path).exists() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    bertqa::collective::rendezvous::exit(130);
}

/// Node 0 ended while it waits for the other nodes (a signal, an error that exits at once) removes its
/// rendezvous file: the next run must not find it (before, the file stayed and the next node 0 refused to
/// start until someone removed it).
#[test]
fn node_zero_ending_early_removes_its_rendezvous_file() {
    let dir = std::env::temp_dir().join(format!("bertqa-rdzv-exit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("run.rdzv");
    let o = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "rendezvous_node_zero_child_process",
            "--nocapture",
        ])
        .env("BERTQA_TEST_RDZV_NODE0", &path)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(130), "{o:?}");
    assert!(!path.exists(), "the rendezvous file outlived node 0");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nccl_without_the_library_is_a_clear_error() {
    // this machine has no libnccl (CI neither): the error says what to install; with it, nothing to check
    match bertqa::collective::nccl::unavailable() {
        Some(why) => {
            assert!(
                why.contains("NCCL") && why.contains("LD_LIBRARY_PATH"),
                "{why}"
            );
            let e = bertqa::collective::nccl::unique_id().unwrap_err();
            assert!(format!("{e:#}").contains("NCCL"), "{e:#}");
        }
        None => println!("SKIPPED: libnccl is loadable here"),
    }
}

#[test]
fn a_follower_error_reaches_the_leader_instead_of_a_hang() {
    let be = Cpu::new();
    let mut g = Local::group(2).into_iter();
    let (lead, follower) = (g.next().unwrap(), g.next().unwrap());
    // the "leader" sends a message that is not a configuration: the follower fails and leaves
    let h = std::thread::spawn(move || replica::follow(&Cpu::new(), Box::new(follower)));
    let lead: Box<dyn Collective<Cpu>> = Box::new(lead);
    let mut junk = b"not json".to_vec();
    lead.broadcast_bytes(&be, &mut junk, 0).unwrap();
    let e = h.join().unwrap().unwrap_err();
    assert!(format!("{e:#}").contains("replica 1"), "{e:#}");
    let mut t = Tensor::from_f64(&be, &[1.0], &[1], DType::F32).unwrap();
    let e = lead.all_reduce_sum(&be, &mut t).unwrap_err();
    assert!(
        format!("{e:#}").contains("replica 1 of 2 has stopped"),
        "{e:#}"
    );
    // with the follower's own reason
    assert!(format!("{e:#}").contains("configuration message"), "{e:#}");
}

#[test]
fn replicas_that_diverge_are_detected_when_the_run_ends() {
    let be = Cpu::new();
    let mut tr = Trainer::new(&be, tiny_cfg(), master(&be), DType::F32, tcfg(8, 1)).unwrap();
    std::thread::scope(|s| {
        let mut g = Local::group(2).into_iter();
        let lead = g.next().unwrap();
        let f = g.next().unwrap();
        let h = s.spawn(move || replica::follow(&Cpu::new(), Box::new(f)));
        replica::lead(&mut tr, Box::new(lead)).unwrap();
        tr.verify_replicas().unwrap();
        // change one weight of the leader only
        let mut w = tr.model.params.flat().to_host::<f32>(&be).unwrap();
        w[7] += 1e-3;
        let shape = tr.model.params.flat().shape().to_vec();
        let t = Tensor::from_host(&be, &w, &shape).unwrap();
        tr.model.params.flat_mut().assign(&be, &t).unwrap();
        let e = tr.leave_group().unwrap_err();
        assert!(
            format!("{e:#}").contains("replica 1 of 2 no longer holds"),
            "{e:#}"
        );
        h.join().unwrap().unwrap();
    });
}

/// `n` random windows of `t` tokens (real lengths between t/2 and t), labels inside each window.
fn synthetic(n: usize, t: usize, vocab: usize) -> Vec<Feature> {
    let mut r = bertqa::rng::Rng::new(17);
    (0..n)
        .map(|i| {
            let len = t / 2 + (r.uniform() * (t / 2) as f64) as usize;
            let mut ids: Vec<i32> = (0..t)
                .map(|_| 1000 + (r.uniform() * (vocab - 1000) as f64) as i32)
                .collect();
            ids[0] = 101;
            let mask: Vec<i32> = (0..t).map(|j| i32::from(j < len)).collect();
            ids.iter_mut().zip(&mask).for_each(|(x, m)| *x *= m);
            let s = 1 + (r.uniform() * (len - 2) as f64) as i64;
            let types: Vec<i32> = (0..t).map(|j| i32::from(j >= 16 && j < len)).collect();
            Feature::from_padded(i, &ids, &types, &mask, (s, (s + 3).min(len as i64 - 1))).unwrap()
        })
        .collect()
}

#[test]
fn gpu_nccl_one_rank_matches_the_plain_path() {
    use bertqa::cuda::Cuda;
    use bertqa::kernel::KernelConfig;
    let be = match Cuda::new(0, KernelConfig::default()) {
        Ok(b) => b,
        Err(e) => {
            println!("SKIPPED: no usable GPU ({e:#})");
            return;
        }
    };
    if let Some(why) = bertqa::collective::nccl::unavailable() {
        println!("SKIPPED: {why}");
        return;
    }
    let cfg = BertConfig::tiny(30522, 384, 6, 12, 1536, 512); // all-MiniLM-L6-v2's shapes
    let feats = synthetic(4 * 32, 384, 30522);
    let run = |nccl: bool| -> (Vec<f64>, Vec<f64>) {
        let mut r = bertqa::rng::Rng::new(3);
        let m = BertParams::from_host(&be, &cfg, DType::F32, |name, shape| {
            let n: usize = shape.iter().product();
            let scale = if name.contains("LayerNorm.weight") {
                1.0
            } else {
                0.02
            };
            Ok((0..n).map(|_| (r.uniform() * 2.0 - 1.0) * scale).collect())
        })
        .unwrap();
        let mut tr = Trainer::new(&be, cfg.clone(), m, DType::BF16, tcfg(32, 1)).unwrap();
        if nccl {
            let id = bertqa::collective::nccl::unique_id().unwrap();
            let g = bertqa::collective::nccl::Nccl::join(&be, &id, 0, 1).unwrap();
            println!("{}", Collective::<Cuda>::describe(&g));
            replica::lead(&mut tr, Box::new(g)).unwrap();
        }
        let (mut losses, mut ms) = (vec![], vec![]);
        for (k, b) in feats.chunks(32).enumerate() {
            tr.state.global_step = k;
            let refs: Vec<&Feature> = b.iter().collect();
            let o = tr.step(&refs, 1e-4).unwrap();
            losses.push(o.loss);
            ms.extend(o.allreduce_ms);
        }
        tr.leave_group().unwrap();
        (losses, ms)
    };
    let (plain, _) = run(false);
    let (nccl, ms) = run(true);
    println!("losses plain {plain:?}\nlosses NCCL  {nccl:?}");
    // one rank: the all-reduce leaves the gradient as it is, so the steps are the plain path's
    assert_eq!(plain, nccl);
    // the all-reduce per step of this model's flat f32 gradient (22.7M values, 91 MB), one rank
    println!(
        "all-reduce per step (1 rank, {:.1} MB f32): {:?} ms",
        4.0 * cfg.num_params() as f64 / 1e6,
        ms
    );
    // and of BERT-base's (110M values), timed alone
    let n = BertConfig::bert_base().num_params();
    let mut buf = Tensor::<Cuda>::zeros(&be, &[n], DType::F32).unwrap();
    let id = bertqa::collective::nccl::unique_id().unwrap();
    let g = bertqa::collective::nccl::Nccl::join(&be, &id, 0, 1).unwrap();
    let mut times = vec![];
    for _ in 0..5 {
        be.synchronize().unwrap();
        let t = std::time::Instant::now();
        g.all_reduce_sum(&be, &mut buf).unwrap();
        be.synchronize().unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "all-reduce of BERT-base's gradient (1 rank, {:.0} MB f32): {times:?} ms",
        4.0 * n as f64 / 1e6
    );
}
