//! `bertqa score DATA.json PREDICTIONS.json` — a drop-in for the official evaluation script.

use crate::data::squad::Dataset;
use anyhow::{Context, Result};
use clap::Args;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// SQuAD dataset file (v1.1 or v2.0)
    pub data: PathBuf,
    /// predictions.json: {"question id": "answer text", ...}
    pub predictions: PathBuf,
    /// Score as SQuAD v2.0 (default: detected from the file's "version")
    #[arg(long)]
    pub version_2_with_negative: bool,
    /// v2.0: null_odds.json (question id → null score diff) for the best-threshold figures
    #[arg(long)]
    pub na_prob_file: Option<PathBuf>,
}

pub fn run(a: &ScoreArgs) -> Result<()> {
    let ds = Dataset::load(&a.data)?;
    let text = std::fs::read_to_string(&a.predictions)
        .with_context(|| format!("reading {}", a.predictions.display()))?;
    let preds: HashMap<String, String> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON object of id → answer text",
            a.predictions.display()
        )
    })?;
    // --na-prob-file asks for v2.0's best-threshold figures: v2.0 scoring
    let v2 = crate::eval::run::resolve_version_2(
        &ds,
        &a.data,
        a.version_2_with_negative || a.na_prob_file.is_some(),
    );
    ds.check_evaluable(v2, &a.data.display().to_string())?;
    let na: Option<HashMap<String, f64>> = match &a.na_prob_file {
        Some(p) => Some(
            serde_json::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("{}: expected id → number", p.display()))?,
        ),
        None => None,
    };
    let missing = ds
        .examples
        .iter()
        .filter(|e| !preds.contains_key(&e.id))
        .count();
    if missing > 0 {
        eprintln!("{missing} unanswered questions receive score 0");
    }
    let out = crate::eval::run::score(&ds, &preds, na.as_ref(), v2);
    println!("{}", as_python_prints(&out));
    Ok(())
}

/// A flat JSON object of numbers as the official scripts print theirs (Python's `json.dumps`: `", "` and
/// `": "` separators; keys in the scripts' order; numbers as the shortest round-trip text, as Python's
/// repr), e.g. `{"exact_match": 81.2, "f1": 88.5}`; anything else as compact JSON.
fn as_python_prints(v: &serde_json::Value) -> String {
    match v.as_object() {
        Some(o) if o.values().all(|x| x.is_number()) => {
            let items: Vec<String> = o
                .iter()
                .map(|(k, x)| format!("{}: {x}", serde_json::Value::from(k.as_str())))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        _ => v.to_string(),
    }
}
