//! Hugging Face checkpoints in and out.
//!
//! Load: `config.json` + `model.safetensors` (F32/F16/BF16), or the shards listed by
//! `model.safetensors.index.json`, of a BertModel (names without prefix, e.g. all-MiniLM-L6-v2) or a
//! BertForQuestionAnswering (`bert.` prefix plus `qa_outputs.*`) — or of any other BERT head: the pooler, the
//! pre-training heads (`cls.*`), a classifier (`classifier.*`) and `embeddings.position_ids` are ignored,
//! and LayerNorm `gamma`/`beta` (older checkpoints) read as `weight`/`bias`, as transformers does. A tensor
//! present both with and without the `bert.` prefix is an error (which one would be meant?). Without
//! `qa_outputs` the head is initialised normal(0, initializer_range) with zero bias from a seed, and the
//! caller is told.
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

/// The dtype(s) of a model directory's weights (every shard's), e.g. "F32" or "BF16+F32" ("?" if
/// unreadable): from the files' headers only.
pub fn model_dtype(dir: &Path) -> String {
    let files = match weight_files(dir) {
        Ok((files, _)) => files,
        Err(_) => return "?".into(),
    };
    let mut names = vec![];
    for path in files {
        match header_dtypes(&path) {
            Some(d) => names.extend(d),
            None => return "?".into(),
        }
    }
    names.sort();
    names.dedup();
    names.join("+")
}

/// The dtypes named in a safetensors file's header (its first 8 + n bytes), without reading the data.
fn header_dtypes(path: &Path) -> Option<Vec<String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    Some(
        v.as_object()?
            .iter()
            .filter(|(k, _)| k.as_str() != "__metadata__")
            .filter_map(|(_, t)| t.get("dtype")?.as_str().map(String::from))
            .collect(),
    )
}

/// The index of sharded weights (transformers' `save_pretrained` with `max_shard_size`).
const SHARD_INDEX: &str = "model.safetensors.index.json";

/// Per tensor name, the shard file that holds it (model.safetensors.index.json's weight_map).
type ShardMap = BTreeMap<String, String>;

/// The safetensors files holding a model directory's weights: `model.safetensors`, or the shards
/// `model.safetensors.index.json` lists (with, per tensor name, its shard). An error that says what to do
/// when there are none (a PyTorch or TensorFlow checkpoint).
fn weight_files(dir: &Path) -> Result<(Vec<std::path::PathBuf>, Option<ShardMap>)> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok((vec![single], None));
    }
    let index = dir.join(SHARD_INDEX);
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("reading {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: no \"weight_map\" object", index.display()))?;
        let mut by_name = BTreeMap::new();
        let mut files = vec![];
        for (name, f) in map {
            let f = f.as_str().ok_or_else(|| {
                anyhow!("{}: weight_map.{name} is not a file name", index.display())
            })?;
            // a shard beside the index, nothing else
            if f.is_empty() || f.contains('/') || f.contains('\\') || f == ".." {
                bail!(
                    "{}: weight_map.{name} = {f:?} is not a file in this directory",
                    index.display()
                );
            }
            let path = dir.join(f);
            if !files.contains(&path) {
                files.push(path);
            }
            by_name.insert(name.clone(), f.to_string());
        }
        if files.is_empty() {
            bail!("{}: the weight_map is empty", index.display());
        }
        return Ok((files, Some(by_name)));
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.exists() {
        // the tensors as they are, names included (a head the file lacks stays absent: bertqa initialises
        // it from --seed and says so, rather than taking transformers' unseeded one)
        bail!(
            "{}: has pytorch_model.bin but no model.safetensors: bertqa reads safetensors only (no pickle); \
             convert it once, keeping the tensors as they are: python3 -c 'import torch; from \
             safetensors.torch import save_file; sd = torch.load({:?}, weights_only=True); \
             save_file({{k: v.contiguous().clone() for k, v in sd.items()}}, {:?}, metadata={{\"format\": \"pt\"}})'",
            dir.display(),
            bin.display().to_string(),
            dir.join("model.safetensors").display().to_string()
        );
    }
    match ["tf_model.h5", "flax_model.msgpack"]
        .into_iter()
        .find(|f| dir.join(f).exists())
    {
        Some(f) => bail!(
            "{}: has {f} but no model.safetensors: bertqa reads safetensors only (convert the model to \
             PyTorch/safetensors with a transformers version that still reads {f})",
            dir.display()
        ),
        None => bail!(
            "{}: no model.safetensors (nor {SHARD_INDEX}): not a model directory?",
            dir.display()
        ),
    }
}

/// Every tensor of a model directory's weights (one file or its shards), f32, with the file each came
/// from.
fn read_weights(dir: &Path) -> Result<(HostTensors, BTreeMap<String, std::path::PathBuf>)> {
    let (files, index) = weight_files(dir)?;
    let mut all = HostTensors::new();
    let mut from: BTreeMap<String, std::path::PathBuf> = BTreeMap::new();
    for path in &files {
        for (name, t) in read_safetensors(path)? {
            if let Some(prev) = from.get(&name) {
                bail!(
                    "tensor {name:?} is in both {} and {}",
                    prev.display(),
                    path.display()
                );
            }
            // (a tensor the index does not list is read, as transformers reads every key of a listed
            // shard; one it lists in another shard is a contradiction)
            if let Some(listed) = index.as_ref().and_then(|idx| idx.get(&name)) {
                if dir.join(listed) != *path {
                    bail!(
                        "{}: tensor {name:?} is not where {SHARD_INDEX} puts it ({listed})",
                        path.display()
                    );
                }
            }
            from.insert(name.clone(), path.clone());
            all.insert(name, t);
        }
    }
    if let Some(idx) = &index {
        if let Some((name, f)) = idx.iter().find(|(n, _)| !all.contains_key(*n)) {
            bail!(
                "{}: {SHARD_INDEX} lists tensor {name:?} in {f}, which does not hold it",
                dir.display()
            );
        }
    }
    Ok((all, from))
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
    let (raw, from) = read_weights(dir)?;
    let had_prefix = raw.keys().any(|k| k.starts_with("bert."));
    let mut host = HostTensors::new();
    // the stored name of each tensor kept (for messages)
    let mut stored: BTreeMap<String, String> = BTreeMap::new();
    let mut ignored = Vec::new();
    for (k, v) in raw {
        let name = hf_name_of_stored(&k);
        if name.starts_with("pooler.")
            || name.ends_with("position_ids")
            || name.starts_with("cls.")
            || name.starts_with("classifier.")
        {
            ignored.push(k);
            continue;
        }
        if let Some(first) = stored.get(&name) {
            bail!(
                "{}: tensors {first:?} and {k:?} are both {name:?}: which one is meant? (a checkpoint \
                 holding two copies; transformers would take one silently)",
                from[&k].display()
            );
        }
        stored.insert(name.clone(), k);
        host.insert(name, v);
    }
    // Unexpected tensors mean the file is not a BERT of this config.
    let known: std::collections::HashSet<String> = param_specs(&cfg)
        .iter()
        .flat_map(|(n, _)| hf_names(n))
        .collect();
    if let Some(extra) = host.keys().find(|k| !known.contains(*k)) {
        let k = &stored[extra];
        bail!(
            "{}: unexpected tensor {k:?} (not part of BertForQuestionAnswering with this config.json)",
            from[k].display()
        );
    }
    let origin = match from.values().next() {
        Some(p) if from.values().all(|q| q == p) => p.display().to_string(),
        _ => format!("{} (sharded)", dir.display()),
    };
    let (params, init) = params_from_host(be, &cfg, &host, dtype, seed, &origin)?;
    Ok((
        cfg,
        params,
        LoadReport {
            had_prefix,
            qa_head_initialised: init,
            ignored,
            source_dtype: model_dtype(dir),
        },
    ))
}

/// The HF name (as `to_hf_host` writes it, without the `bert.` prefix) of a stored tensor name: the prefix
/// dropped, and LayerNorm's `gamma`/`beta` of older checkpoints read as `weight`/`bias` (transformers
/// renames them the same way).
fn hf_name_of_stored(k: &str) -> String {
    let name = k.strip_prefix("bert.").unwrap_or(k);
    if let Some(pre) = name.strip_suffix("LayerNorm.gamma") {
        return format!("{pre}LayerNorm.weight");
    }
    if let Some(pre) = name.strip_suffix("LayerNorm.beta") {
        return format!("{pre}LayerNorm.bias");
    }
    name.to_string()
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
            // a finite weight beyond the dtype's range would be written as ±inf, which `load` refuses
            let narrowed = |i: usize| match dtype {
                DType::F16 => half::f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
                DType::BF16 => half::bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
                _ => v[i],
            };
            if let Some(i) = (0..v.len()).find(|&i| v[i].is_finite() && !narrowed(i).is_finite()) {
                bail!(
                    "tensor {n:?} {s:?}: value {} at index {i} is beyond {dtype}'s range (it would be \
                     written as {}); write {} instead",
                    v[i],
                    narrowed(i),
                    if dtype == DType::F16 { "bf16 or f32" } else { "f32" }
                );
            }
            Ok((n.clone(), s.clone(), b))
        })
        .collect::<Result<_>>()?;
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

/// Say in a config.json what dtype its model.safetensors holds, in both the fields transformers reads:
/// `dtype` (transformers 5, which loads in that dtype by default) and `torch_dtype` (before). A copied
/// config would otherwise keep its source's (an f32 file loaded as float16).
pub fn set_config_dtype(conf: &mut serde_json::Value, dt: DType) -> Result<()> {
    let name = match dt {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        other => bail!("no config.json dtype for {other}"),
    };
    if let Some(c) = conf.as_object_mut() {
        c.insert("dtype".into(), serde_json::json!(name));
        c.insert("torch_dtype".into(), serde_json::json!(name));
    }
    Ok(())
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
    // what `load` refuses is never written (a diverged run's weights)
    for (name, (shape, v)) in &host {
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            bail!(
                "tensor {name:?} {shape:?} has a non-finite value ({}) at index {i}: refusing to save weights \
                 that cannot be loaded (an update overflowed them: lower the learning rate or weight decay, \
                 and start again from an earlier checkpoint)",
                v[i]
            );
        }
    }
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
    }
    set_config_dtype(&mut conf, DType::F32)?;
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
    // the weights, then their file, are held in memory: shapes too large for that are an error naming them,
    // not an abort part-way
    let total = cfg
        .num_params_checked()
        .and_then(|n| n.checked_mul(4))
        .context("the model's parameters: more bytes than can be counted")?;
    let mut probe: Vec<u8> = Vec::new();
    probe.try_reserve_exact(total.saturating_mul(3)).map_err(|_| {
        anyhow!(
            "{:.1} GiB of weights ({:.2}G parameters): more than this machine can hold in memory (about three \
             copies while they are written)",
            total as f64 / 1073741824.0,
            total as f64 / 4e9
        )
    })?;
    drop(probe);
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
            crate::util::write_atomic(
                &dir.join(f),
                &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
            )?;
        }
    }
    Ok(())
}
