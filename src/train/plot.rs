//! The loss / dev-F1 curves of a run as an SVG image (hand-written: two polylines and axes need no crate).

use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::Path;

/// Read metrics.jsonl and draw training loss (left axis) and dev F1 (right axis) against the step.
pub fn write_curves(metrics: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let mut loss = vec![];
    let mut f1 = vec![];
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let Some(l) = v.get("loss").and_then(|x| x.as_f64()) {
            if l.is_finite() {
                loss.push((step, l));
            }
        }
        if let Some(f) = v
            .get("eval")
            .and_then(|e| e.get("f1").or_else(|| e.get("exact")))
            .and_then(|x| x.as_f64())
        {
            f1.push((step, f));
        }
    }
    let (w, h, m) = (800.0, 400.0, 50.0);
    let xmax = loss.iter().chain(&f1).map(|p| p.0).fold(1.0f64, f64::max);
    let lmax = loss.iter().map(|p| p.1).fold(1e-9f64, f64::max);
    let x = |s: f64| m + (w - 2.0 * m) * s / xmax;
    let yl = |l: f64| h - m - (h - 2.0 * m) * l / lmax;
    let yf = |f: f64| h - m - (h - 2.0 * m) * f / 100.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#
    );
    let _ = write!(
        s,
        r#"<line x1="{m}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{m}" y1="{m}" x2="{m}" y2="{}" stroke="black"/>"#,
        h - m,
        w - m,
        h - m,
        h - m
    );
    let _ = write!(
        s,
        r#"<text x="{}" y="{}">step (max {xmax:.0})</text><text x="5" y="{}" fill="steelblue">loss (max {lmax:.3})</text><text x="{}" y="{}" fill="darkorange">dev F1 (0-100)</text>"#,
        w / 2.0 - 40.0,
        h - 15.0,
        m - 10.0,
        w - 150.0,
        m - 10.0
    );
    let pts = |v: &[(f64, f64)], fy: &dyn Fn(f64) -> f64| {
        v.iter()
            .map(|&(a, b)| format!("{:.1},{:.1}", x(a), fy(b)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = write!(
        s,
        r#"<polyline fill="none" stroke="steelblue" stroke-width="1.5" points="{}"/>"#,
        pts(&loss, &yl)
    );
    let _ = write!(
        s,
        r#"<polyline fill="none" stroke="darkorange" stroke-width="2" points="{}"/>"#,
        pts(&f1, &yf)
    );
    for &(a, b) in &f1 {
        let _ = write!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="darkorange"/><text x="{:.1}" y="{:.1}" fill="darkorange">{b:.1}</text>"#,
            x(a),
            yf(b),
            x(a) + 4.0,
            yf(b) - 4.0
        );
    }
    s.push_str("</svg>\n");
    crate::util::write_atomic(out, s.as_bytes())
}
