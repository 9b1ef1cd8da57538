//! The binary encodings replicas exchange: little-endian numbers, windows (what a replica needs of a
//! [`Feature`] to compute its loss or logits) and span logits. Decoders check lengths and say what is wrong.

use crate::data::features::Feature;
use anyhow::{bail, Context, Result};

pub fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn f64s(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn read_f32s(b: &[u8], n: usize) -> Result<Vec<f32>> {
    if b.len() != 4 * n {
        bail!("expected {n} f32 ({} bytes), got {} bytes", 4 * n, b.len());
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

pub fn read_f64s(b: &[u8], n: usize) -> Result<Vec<f64>> {
    if b.len() != 8 * n {
        bail!("expected {n} f64 ({} bytes), got {} bytes", 8 * n, b.len());
    }
    Ok(b.chunks_exact(8)
        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// A cursor over received bytes.
pub struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Reader { b, at: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.at + n > self.b.len() {
            bail!(
                "message truncated: {} bytes needed at offset {}, {} in all",
                n,
                self.at,
                self.b.len()
            );
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    pub fn u64(&mut self) -> Result<u64> {
        let s = self.take(8)?;
        Ok(u64::from_le_bytes(s.try_into()?))
    }
    pub fn i64(&mut self) -> Result<i64> {
        Ok(self.u64()? as i64)
    }
    pub fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_bits(self.u64()?))
    }
    pub fn i32s(&mut self, n: usize) -> Result<Vec<i32>> {
        let s = self.take(4 * n)?;
        Ok(s.chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    pub fn f32s(&mut self, n: usize) -> Result<Vec<f32>> {
        read_f32s(self.take(4 * n)?, n)
    }
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u64()? as usize;
        self.take(n)
    }
    pub fn done(&self) -> Result<()> {
        if self.at != self.b.len() {
            bail!(
                "{} unexpected bytes at the end of a message",
                self.b.len() - self.at
            );
        }
        Ok(())
    }
}

/// Appends little-endian values.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u64(&mut self, x: u64) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub fn i64(&mut self, x: i64) -> &mut Self {
        self.u64(x as u64)
    }
    pub fn f64(&mut self, x: f64) -> &mut Self {
        self.u64(x.to_bits())
    }
    pub fn i32s(&mut self, v: &[i32]) -> &mut Self {
        v.iter()
            .for_each(|x| self.0.extend_from_slice(&x.to_le_bytes()));
        self
    }
    pub fn f32s(&mut self, v: &[f32]) -> &mut Self {
        self.0.extend_from_slice(&f32s(v));
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
}

/// Windows as a replica needs them: ids, segments, the length they were cut for, labels. Offsets stay with
/// the leader (they only map answers back to text); `example` is kept for messages. (A change of this
/// format changes the rendezvous version too, src/collective/rendezvous.rs `MAGIC`.)
pub fn write_features(w: &mut Writer, feats: &[&Feature]) {
    w.u64(feats.len() as u64);
    for f in feats {
        w.u64(f.example as u64)
            .u64(f.len() as u64)
            .i32s(&f.input_ids)
            .i32s(&f.token_type_ids)
            .u64(f.max_len as u64)
            .i64(f.start_position)
            .i64(f.end_position)
            .u64(u64::from(f.has_answer));
    }
}

pub fn read_features(r: &mut Reader) -> Result<Vec<Feature>> {
    let n = r.u64()? as usize;
    let mut out = Vec::with_capacity(n.min(1 << 20));
    for i in 0..n {
        let f = (|| -> Result<Feature> {
            let example = r.u64()? as usize;
            let l = r.u64()? as usize;
            Ok(Feature {
                example,
                input_ids: r.i32s(l)?,
                token_type_ids: r.i32s(l)?,
                offsets: vec![None; l],
                max_len: r.u64()? as usize,
                start_position: r.i64()?,
                end_position: r.i64()?,
                has_answer: r.u64()? != 0,
            })
        })()
        .with_context(|| format!("window {i} of {n}"))?;
        out.push(f);
    }
    Ok(out)
}

/// Span logits of windows (start and end, one row per window).
pub fn write_logits(w: &mut Writer, starts: &[Vec<f32>], ends: &[Vec<f32>]) {
    w.u64(starts.len() as u64);
    for (s, e) in starts.iter().zip(ends) {
        w.u64(s.len() as u64).f32s(s).f32s(e);
    }
}

pub fn read_logits(r: &mut Reader) -> Result<crate::eval::run::SpanLogits> {
    let n = r.u64()? as usize;
    let (mut s, mut e) = (vec![], vec![]);
    for _ in 0..n {
        let t = r.u64()? as usize;
        s.push(r.f32s(t)?);
        e.push(r.f32s(t)?);
    }
    Ok((s, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_and_logits_round_trip_and_truncation_is_an_error() {
        let f = Feature {
            example: 7,
            input_ids: vec![101, 2054, 102],
            token_type_ids: vec![0, 0, 1],
            offsets: vec![None, Some((0, 4)), None],
            max_len: 4,
            start_position: 1,
            end_position: -1,
            has_answer: true,
        };
        let mut w = Writer::default();
        write_features(&mut w, &[&f, &f]);
        write_logits(&mut w, &[vec![0.5, -1e4]], &[vec![2.0, f32::NAN]]);
        let mut r = Reader::new(&w.0);
        let back = read_features(&mut r).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].input_ids, f.input_ids);
        assert_eq!(back[1].token_type_ids, f.token_type_ids);
        assert_eq!(back[1].max_len, 4);
        assert_eq!(back[1].offsets, vec![None; 3]);
        assert_eq!(
            (
                back[1].start_position,
                back[1].end_position,
                back[1].has_answer
            ),
            (1, -1, true)
        );
        let (s, e) = read_logits(&mut r).unwrap();
        assert_eq!(s, vec![vec![0.5, -1e4]]);
        assert!(e[0][1].is_nan());
        r.done().unwrap();
        let cut = &w.0[..w.0.len() - 3];
        let mut r = Reader::new(cut);
        read_features(&mut r).unwrap();
        assert!(format!("{:#}", read_logits(&mut r).unwrap_err()).contains("truncated"));
    }
}
