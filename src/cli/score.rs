//! `bertqa score DATA.json PREDICTIONS.json` — a drop-in for the official evaluation script.

use crate::data::squad::Dataset;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// SQuAD dataset file (v1.1 or v2.0)
    pub data: PathBuf,
    /// predictions.json: {"question id": "answer text", ...}
    pub predictions: PathBuf,
    /// Score as SQuAD v2.0 (default: detected from the file's "version")
    #[arg(long)]
    pub version_2_with_negative: bool,
    /// v2.0: no-answer probabilities, or bertqa's null_odds.json (question id → value): a question whose
    /// value is above --na-prob-thresh scores as predicted "no answer", and the best-threshold figures
    /// are added (the official script's --na-prob-file)
    #[arg(long)]
    pub na_prob_file: Option<PathBuf>,
    /// v2.0: the value above which a question counts as predicted "no answer" (the official script's
    /// --na-prob-thresh, default 1.0; selects v2.0 scoring). Without --na-prob-file every value is 0.0,
    /// so only a negative threshold changes anything (every question then counts as "no answer"), as in
    /// the official script. bertqa's null odds are logit differences, often above 1: give the
    /// --null-score-diff-threshold the predictions were made with, or a large number to score
    /// predictions.json as written
    #[arg(long, allow_negative_numbers = true)]
    pub na_prob_thresh: Option<f64>,
}

pub fn run(a: &ScoreArgs) -> Result<()> {
    let ds = Dataset::load(&a.data)?;
    let text = std::fs::read_to_string(&a.predictions)
        .with_context(|| format!("reading {}", a.predictions.display()))?;
    let raw: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| {
            format!(
                "{}: expected a JSON object of id → answer text",
                a.predictions.display()
            )
        })?;
    let mut preds: HashMap<String, String> = HashMap::with_capacity(raw.len());
    for (id, v) in raw {
        match v {
            serde_json::Value::String(s) => {
                preds.insert(id, s);
            }
            other => anyhow::bail!(
                "{}: the answer of {id:?} is {other}, not a string: expected a JSON object of id → answer text",
                a.predictions.display()
            ),
        }
    }
    // --na-prob-file / --na-prob-thresh are v2.0's: v2.0 scoring
    let v2 = crate::eval::run::resolve_version_2(
        &ds,
        &a.data,
        a.version_2_with_negative || a.na_prob_file.is_some() || a.na_prob_thresh.is_some(),
    );
    ds.check_evaluable(v2, &a.data.display().to_string())?;
    // without a file, every value is 0.0, as in the official script: only a negative threshold matters
    let thresh = a.na_prob_thresh.unwrap_or(1.0);
    let na = match &a.na_prob_file {
        Some(p) => Some(read_na_probs(p, &ds, thresh)?),
        None => Some(crate::eval::metrics::NaProbs {
            values: vec![],
            thresh: Some(thresh),
            sweep: false,
        }),
    };
    let missing = ds
        .examples
        .iter()
        .filter(|e| !preds.contains_key(&e.id))
        .count();
    if missing > 0 {
        crate::say!("{missing} unanswered questions receive score 0");
    }
    let out = crate::eval::run::score(&ds, &preds, na.as_ref(), v2);
    // v2.0's official script indents its JSON; ours stays one line (the last line of every command is its
    // metrics JSON), with the same keys, order and numbers
    crate::util::print_line(as_python_prints(&out, false))
}

/// An --na-prob-file: a JSON object of question id → number, in the file's order; a dataset question it
/// does not name is counted as 0.0 with a warning (the official script stops there
/// with a KeyError).
fn read_na_probs(p: &Path, ds: &Dataset, thresh: f64) -> Result<crate::eval::metrics::NaProbs> {
    if !thresh.is_finite() {
        bail!("--na-prob-thresh {thresh} must be a finite number");
    }
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", p.display()))?;
    let Some(o) = v.as_object() else {
        bail!(
            "{}: expected a JSON object of question id → number",
            p.display()
        );
    };
    let mut values = Vec::with_capacity(o.len());
    for (k, x) in o {
        let Some(f) = x.as_f64() else {
            bail!("{}: {k:?} is {x}, expected a number", p.display());
        };
        values.push((k.clone(), f));
    }
    let named: std::collections::HashSet<String> = values.iter().map(|(k, _)| k.clone()).collect();
    let unnamed: Vec<String> = ds
        .examples
        .iter()
        .filter(|e| !named.contains(&e.id))
        .map(|e| e.id.clone())
        .collect();
    // (0.0 for the threshold and in the sweep alike, after the file's values)
    values.extend(unnamed.iter().map(|id| (id.clone(), 0.0)));
    let unnamed = unnamed.len();
    if unnamed > 0 {
        crate::say!(
            "warning: {}: {unnamed} question(s) have no value; counted as 0.0 (the official script stops with \
             a KeyError)",
            p.display()
        );
    }
    Ok(crate::eval::metrics::NaProbs {
        values,
        thresh: Some(thresh),
        sweep: true,
    })
}

/// A flat JSON object of numbers as the official scripts print theirs — Python's `json.dumps`: `", "` and
/// `": "` separators (v1.1), or `indent=2` (v2.0: one key per line); keys in the scripts' order; floats as
/// Python's repr (the shortest round-trip digits, scientific below 1e-4 and from 1e16 up: `1.5e-05`), e.g.
/// `{"exact_match": 81.2, "f1": 88.5}`; anything else as compact JSON.
fn as_python_prints(v: &serde_json::Value, indent: bool) -> String {
    match v.as_object() {
        Some(o) if o.values().all(|x| x.is_number()) => {
            let items: Vec<String> = o
                .iter()
                .map(|(k, x)| format!("{}: {}", serde_json::Value::from(k.as_str()), py_number(x)))
                .collect();
            if indent {
                format!("{{\n  {}\n}}", items.join(",\n  "))
            } else {
                format!("{{{}}}", items.join(", "))
            }
        }
        _ => v.to_string(),
    }
}

/// A JSON number as Python's `json.dumps` writes it: integers as they are, floats as `repr(float)`.
fn py_number(x: &serde_json::Value) -> String {
    match x.as_f64() {
        Some(f) if !x.is_u64() && !x.is_i64() => py_float(f),
        _ => x.to_string(),
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip (Rust's `{:e}` has the same digits), in fixed
/// notation for exponents -4..16, else `d.ddde±XX`.
fn py_float(f: f64) -> String {
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    if !f.is_finite() {
        return if f.is_nan() {
            "NaN".into()
        } else if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let e = format!("{:e}", f.abs());
    let (mant, exp) = e.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("an integer exponent");
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let sign = if f < 0.0 { "-" } else { "" };
    let n = digits.len() as i32;
    let body = if (-4..16).contains(&exp) {
        if exp >= 0 {
            if exp + 1 >= n {
                format!("{digits}{}.0", "0".repeat((exp + 1 - n) as usize))
            } else {
                format!(
                    "{}.{}",
                    &digits[..(exp + 1) as usize],
                    &digits[(exp + 1) as usize..]
                )
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let m = if n > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits.clone()
        };
        format!("{m}e{}{:02}", if exp < 0 { "-" } else { "+" }, exp.abs())
    };
    format!("{sign}{body}")
}

#[cfg(test)]
mod tests {
    use super::py_float;

    /// Against Python 3's repr(float) (values printed by `python3 -c 'print(repr(x))'`).
    #[test]
    fn floats_print_as_python_repr_does() {
        for (x, want) in [
            (100.0, "100.0"),
            (86.20624408703878, "86.20624408703878"),
            (0.5, "0.5"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (0.00012, "0.00012"),
            (1e16, "1e+16"),
            (1.2345e16, "1.2345e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (-2.5, "-2.5"),
            (0.0, "0.0"),
            (-1e-7, "-1e-07"),
        ] {
            assert_eq!(py_float(x), want, "{x:e}");
        }
    }
}
