//! Hugging Face checkpoints in and out.
//!
//! Load: `config.json` + `model.safetensors` (F32/F16/BF16) of a BertModel (names without prefix, e.g.
//! all-MiniLM-L6-v2) or a BertForQuestionAnswering (`bert.` prefix plus `qa_outputs.*`). The pooler and
//! `embeddings.position_ids` are ignored. Without `qa_outputs` the head is initialised normal(0,
//! initializer_range) with zero bias from a seed, and the caller is told.
//! Save: an HF-format BertForQuestionAnswering directory (config.json with `architectures`, model.safetensors
//! with HF names, F32; tokenizer files copied) that `BertForQuestionAnswering.from_pretrained` loads with no
//! missing or unexpected keys.

use crate::model::config::BertConfig;
use crate::model::params::{param_specs, BertParams};
use crate::ops::Backend;
use crate::rng::Rng;
use crate::tensor::DType;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Files copied next to a saved model so that tokenizers and `bertqa eval` find them.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// What loading found.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub had_prefix: bool,
    pub qa_head_initialised: bool,
    pub ignored: Vec<String>,
    pub source_dtype: String,
}

/// Host copies of every HF tensor: name → (shape, f32 values).
pub type HostTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Read a safetensors file into f32 host tensors, naming the file in every error.
pub fn read_safetensors(path: &Path) -> Result<HostTensors> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow!(
            "{}: not a valid safetensors file (truncated or corrupt?): {e}",
            path.display()
        )
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        let vals: Vec<f32> = match view.dtype() {
            StDtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            StDtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            StDtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            StDtype::I64 | StDtype::I32 if name.ends_with("position_ids") => continue,
            other => bail!(
                "{}: tensor {name:?} has unsupported dtype {other:?} (expected F32, F16 or BF16)",
                path.display()
            ),
        };
        if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
            bail!(
                "{}: tensor {name:?} {shape:?} has a non-finite value ({}) at index {i} {:?}: the weights are corrupt \
                 (a diverged training run?), refusing to load them",
                path.display(),
                vals[i],
                unravel(i, &shape)
            );
        }
        out.insert(name, (shape, vals));
    }
    Ok(out)
}

/// The multi-dimensional index of flat index `i` in a row-major `shape`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (k, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            idx[k] = i % d;
            i /= d;
        }
    }
    idx
}

/// The dtype(s) of a safetensors file's tensors, e.g. "F32" or "F16" ("?" if unreadable).
pub fn read_safetensors_dtype(path: &Path) -> String {
    dtype_name(path)
}

fn dtype_name(path: &Path) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return "?".into();
    };
    let Ok(st) = SafeTensors::deserialize(&bytes) else {
        return "?".into();
    };
    let mut names: Vec<String> = st
        .tensors()
        .iter()
        .map(|(_, v)| format!("{:?}", v.dtype()))
        .collect();
    names.sort();
    names.dedup();
    names.join("+")
}

/// HF tensor names for one internal parameter (the fused qkv maps to three).
fn hf_names(internal: &str) -> Vec<String> {
    if let Some(pre) = internal.strip_suffix("attention.self.qkv.weight") {
        return ["query", "key", "value"]
            .iter()
            .map(|p| format!("{pre}attention.self.{p}.weight"))
            .collect();
    }
    if let Some(pre) = internal.strip_suffix("attention.self.qkv.bias") {
        return ["query", "key", "value"]
            .iter()
            .map(|p| format!("{pre}attention.self.{p}.bias"))
            .collect();
    }
    vec![internal.to_string()]
}

/// Build parameters (in `dtype`) from host tensors with HF names (prefix already stripped).
pub fn params_from_host<B: Backend>(
    be: &B,
    cfg: &BertConfig,
    host: &HostTensors,
    dtype: DType,
    seed: u64,
    origin: &str,
) -> Result<(BertParams<B>, bool)> {
    let mut initialised = false;
    let params = BertParams::from_host(be, cfg, dtype, |name, shape| {
        let shape = shape.to_vec();
        let parts = hf_names(name);
        let mut data: Vec<f64> = Vec::with_capacity(shape.iter().product());
        let is_qa = name.starts_with("qa_outputs.");
        if is_qa && !host.contains_key(name) {
            initialised = true;
            if name.ends_with("weight") {
                let mut rng = Rng::new(seed);
                data.extend(
                    (0..shape.iter().product::<usize>())
                        .map(|_| (rng.normal() * cfg.initializer_range as f64) as f32 as f64),
                );
            } else {
                data.resize(shape.iter().product(), 0.0);
            }
        } else {
            let part_rows = shape[0] / parts.len();
            for p in &parts {
                let (s, v) = host
                    .get(p)
                    .ok_or_else(|| anyhow!("{origin}: missing tensor {p:?}"))?;
                let mut expect = shape.clone();
                expect[0] = part_rows;
                if *s != expect {
                    bail!("{origin}: tensor {p:?} has shape {s:?}, config.json implies {expect:?} (config/weights mismatch?)");
                }
                data.extend(v.iter().map(|&x| x as f64));
            }
        }
        Ok(data)
    })?;
    Ok((params, initialised))
}

/// Load an HF BERT directory. Returns (config, params in `dtype`, report).
pub fn load<B: Backend>(
    be: &B,
    dir: &Path,
    dtype: DType,
    seed: u64,
) -> Result<(BertConfig, BertParams<B>, LoadReport)> {
    let cfg = BertConfig::from_file(&dir.join("config.json"))?;
    check_tokenizer_fits(dir, &cfg)?;
    let st_path = dir.join("model.safetensors");
    if !st_path.exists() {
        bail!(
            "{}: no model.safetensors (only safetensors checkpoints are supported)",
            dir.display()
        );
    }
    let raw = read_safetensors(&st_path)?;
    let had_prefix = raw.keys().any(|k| k.starts_with("bert."));
    let mut host = HostTensors::new();
    let mut ignored = Vec::new();
    for (k, v) in raw {
        let name = k.strip_prefix("bert.").unwrap_or(&k).to_string();
        if name.starts_with("pooler.") || name.ends_with("position_ids") || name.starts_with("cls.")
        {
            ignored.push(k);
            continue;
        }
        host.insert(name, v);
    }
    let origin = st_path.display().to_string();
    // Unexpected tensors mean the file is not a BERT of this config.
    let known: std::collections::HashSet<String> = param_specs(&cfg)
        .iter()
        .flat_map(|(n, _)| hf_names(n))
        .collect();
    if let Some(extra) = host.keys().find(|k| !known.contains(*k)) {
        bail!("{origin}: unexpected tensor {extra:?} (not part of BertForQuestionAnswering with this config.json)");
    }
    let (params, init) = params_from_host(be, &cfg, &host, dtype, seed, &origin)?;
    Ok((
        cfg,
        params,
        LoadReport {
            had_prefix,
            qa_head_initialised: init,
            ignored,
            source_dtype: dtype_name(&st_path),
        },
    ))
}

/// If `dir` holds tokenizer files: error unless every token id has a row in the embedding table
/// (`vocab_size` of config.json), naming both. Without tokenizer files there is nothing to check.
pub fn check_tokenizer_fits(dir: &Path, cfg: &BertConfig) -> Result<()> {
    if !["tokenizer.json", "vocab.txt"]
        .iter()
        .any(|f| dir.join(f).exists())
    {
        return Ok(());
    }
    let tok = crate::data::tokenizer::load(dir)?;
    tok.check_fits(cfg.vocab_size, &dir.display().to_string())
}

/// HF-named host tensors of a model (with the `bert.` prefix on encoder tensors), f32.
pub fn to_hf_host<B: Backend>(
    be: &B,
    cfg: &BertConfig,
    params: &BertParams<B>,
) -> Result<HostTensors> {
    let mut out = HostTensors::new();
    for ((name, shape), t) in param_specs(cfg).into_iter().zip(params.tensors()) {
        let vals = t.to_f32_vec(be)?;
        let parts = hf_names(&name);
        let rows = shape[0] / parts.len();
        let per = vals.len() / parts.len();
        for (i, p) in parts.iter().enumerate() {
            let mut s = shape.clone();
            s[0] = rows;
            let full = if p.starts_with("qa_outputs.") {
                p.clone()
            } else {
                format!("bert.{p}")
            };
            out.insert(full, (s, vals[i * per..(i + 1) * per].to_vec()));
        }
    }
    Ok(out)
}

/// Serialise host tensors as safetensors bytes (F32, sorted names, optional metadata).
pub fn safetensors_bytes(
    host: &HostTensors,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    safetensors_bytes_as(host, metadata, DType::F32)
}

/// Serialise host tensors as safetensors bytes in `dtype` (F32, F16 or BF16; rounded to nearest even).
pub fn safetensors_bytes_as(
    host: &HostTensors,
    metadata: Option<HashMap<String, String>>,
    dtype: DType,
) -> Result<Vec<u8>> {
    let st_dtype = match dtype {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        other => bail!("cannot write {other} safetensors"),
    };
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = host
        .iter()
        .map(|(n, (s, v))| {
            let b: Vec<u8> = match dtype {
                DType::F16 => v
                    .iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect(),
                DType::BF16 => v
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
                _ => bytemuck::cast_slice(v).to_vec(),
            };
            (n.clone(), s.clone(), b)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(st_dtype, s.clone(), b)?,
            ))
        })
        .collect::<Result<_, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow!("building safetensors: {e}"))?;
    safetensors::serialize(views, metadata).map_err(|e| anyhow!("serialising safetensors: {e}"))
}

/// Save as an HF BertForQuestionAnswering directory; copies tokenizer files from `tokenizer_src` if given.
/// Every file is written atomically.
pub fn save<B: Backend>(
    be: &B,
    dir: &Path,
    cfg: &BertConfig,
    params: &BertParams<B>,
    tokenizer_src: Option<&Path>,
    extra_config: Option<&serde_json::Value>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let host = to_hf_host(be, cfg, params)?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    crate::util::write_atomic(
        &dir.join("model.safetensors"),
        &safetensors_bytes(&host, Some(meta))?,
    )?;
    // config.json: the original fields (if any) with ours on top.
    let mut conf = match extra_config {
        Some(serde_json::Value::Object(m)) => serde_json::Value::Object(m.clone()),
        _ => serde_json::json!({}),
    };
    let ours = serde_json::to_value(cfg)?;
    if let (Some(c), Some(o)) = (conf.as_object_mut(), ours.as_object()) {
        for (k, v) in o {
            c.insert(k.clone(), v.clone());
        }
        c.insert(
            "architectures".into(),
            serde_json::json!(["BertForQuestionAnswering"]),
        );
        c.insert("model_type".into(), serde_json::json!("bert"));
        c.entry("pad_token_id").or_insert(serde_json::json!(0));
        c.entry("position_embedding_type")
            .or_insert(serde_json::json!("absolute"));
        c.insert("torch_dtype".into(), serde_json::json!("float32"));
    }
    crate::util::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&conf)?.as_bytes(),
    )?;
    if let Some(src) = tokenizer_src {
        for f in TOKENIZER_FILES {
            let p = src.join(f);
            if p.exists() {
                let bytes =
                    std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                crate::util::write_atomic(&dir.join(f), &bytes)?;
            }
        }
    }
    Ok(())
}

/// The raw config.json of a model directory as JSON (to carry unknown fields through a save).
pub fn raw_config(dir: &Path) -> Option<serde_json::Value> {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
}

/// Host tensors (HF names, `bert.` prefix) of a freshly initialised BertForQuestionAnswering, as HF's
/// `_init_weights` does: linear and embedding weights normal(0, initializer_range), biases 0, LayerNorm
/// weight 1 and bias 0, the \[PAD\] embedding row 0.
pub fn random_init_host(cfg: &BertConfig, seed: u64) -> HostTensors {
    let mut rng = Rng::new(seed);
    let mut out = HostTensors::new();
    for (name, shape) in param_specs(cfg) {
        let n: usize = shape.iter().product();
        let parts = hf_names(&name);
        let per = n / parts.len();
        for p in parts {
            let mut s = shape.clone();
            s[0] /= hf_names(&name).len();
            let vals: Vec<f32> = if p.contains("LayerNorm.weight") {
                vec![1.0; per]
            } else if p.ends_with(".bias") {
                vec![0.0; per]
            } else {
                let mut v: Vec<f32> = (0..per)
                    .map(|_| (rng.normal() * cfg.initializer_range as f64) as f32)
                    .collect();
                if p == "embeddings.word_embeddings.weight" {
                    if let Some(pad) = cfg.pad_token_id.filter(|&p| p >= 0) {
                        let c = cfg.hidden_size;
                        v[pad as usize * c..(pad as usize + 1) * c]
                            .iter_mut()
                            .for_each(|x| *x = 0.0);
                    }
                }
                v
            };
            let full = if p.starts_with("qa_outputs.") {
                p
            } else {
                format!("bert.{p}")
            };
            out.insert(full, (s, vals));
        }
    }
    out
}

/// Write a randomly initialised model directory (config + weights + the tokenizer files of `tokenizer_src`).
pub fn write_random_model(
    dir: &Path,
    cfg: &BertConfig,
    seed: u64,
    tokenizer_src: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::util::write_atomic(
        &dir.join("model.safetensors"),
        &safetensors_bytes(&random_init_host(cfg, seed), None)?,
    )?;
    let mut conf = serde_json::to_value(cfg)?;
    conf["architectures"] = serde_json::json!(["BertForQuestionAnswering"]);
    conf["model_type"] = serde_json::json!("bert");
    crate::util::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&conf)?.as_bytes(),
    )?;
    for f in TOKENIZER_FILES {
        let p = tokenizer_src.join(f);
        if p.exists() {
            // read + write (not fs::copy): the source may be read-only and its mode must not follow
            std::fs::write(
                dir.join(f),
                std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
            )?;
        }
    }
    Ok(())
}
