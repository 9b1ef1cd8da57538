//! Random numbers shared bit-for-bit by the CPU reference and the CUDA kernels.
//!
//! Dropout masks come from the counter-based Philox4x32-10 generator (Salmon et al., SC'11), the same one
//! cuRAND and PyTorch use: element `idx` of a dropout site with seed `seed` is kept iff `u(idx) >= p`, where
//! `u` is the top 24 bits of word `idx mod 4` of `philox([c_lo, c_hi, 0, 0], [seed_lo, seed_hi])`,
//! `c = idx / 4`, scaled to [0, 1). One Philox call serves four consecutive elements. Because the mask is a pure function of (seed, idx), backward regenerates it instead of
//! storing it, and the GPU kernels (kernels/common.cuh) produce exactly the CPU's masks.

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

#[inline]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds.
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = ctr;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W0);
            k[1] = k[1].wrapping_add(PHILOX_W1);
        }
        let (hi0, lo0) = mulhilo(PHILOX_M0, c[0]);
        let (hi1, lo1) = mulhilo(PHILOX_M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// Uniform in [0, 1) with 24 bits, for element `idx` of the stream `seed`.
#[inline]
pub fn uniform(seed: u64, idx: u64) -> f32 {
    let c = idx >> 2;
    let r = philox4x32_10(
        [c as u32, (c >> 32) as u32, 0, 0],
        [seed as u32, (seed >> 32) as u32],
    );
    (r[(idx & 3) as usize] >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Row stride of attention-dropout rows: T rounded up to even.
pub fn attn_row_stride(t: usize) -> u64 {
    (t + (t & 1)) as u64
}

/// Attention-probability dropout stream: element (query i, key j) of head `bh = b·NH + h`, sequence length
/// `t`, with row `R = bh·Tp + i` (Tp = [`attn_row_stride`]), uses word `(R&1)·2 + (j&1)` of
/// `philox(counter = (R/2)·(Tp/2) + j/2)`: each 2×2 block of (query, key) shares one Philox call, so a GPU
/// thread holding two adjacent keys or two adjacent queries needs a single call (kernels/common.cuh).
pub fn attn_uniform(seed: u64, bh: u64, i: u64, j: u64, t: usize) -> f32 {
    let tp = attn_row_stride(t);
    let r = bh * tp + i;
    let c = (r >> 1) * (tp >> 1) + (j >> 1);
    let words = philox4x32_10(
        [c as u32, (c >> 32) as u32, 0, 0],
        [seed as u32, (seed >> 32) as u32],
    );
    (words[((r & 1) * 2 + (j & 1)) as usize] >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// A dropout site: probability `p` of zeroing, and the seed of its mask. `p == 0` disables it.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    pub const OFF: Dropout = Dropout { p: 0.0, seed: 0 };
    pub fn new(p: f32, seed: u64) -> Self {
        Dropout { p, seed }
    }
    pub fn active(&self) -> bool {
        self.p > 0.0
    }
    /// The multiplier of attention probability (query i, key j) of head `bh`: 0 or 1/(1-p).
    pub fn attn_factor(&self, bh: u64, i: u64, j: u64, t: usize) -> f64 {
        if self.p <= 0.0 {
            1.0
        } else if attn_uniform(self.seed, bh, i, j, t) >= self.p {
            1.0 / (1.0 - self.p as f64)
        } else {
            0.0
        }
    }

    fn keep(&self, word: u32) -> f64 {
        if (word >> 8) as f32 * (1.0 / 16_777_216.0) >= self.p {
            1.0 / (1.0 - self.p as f64)
        } else {
            0.0
        }
    }

    /// The (T, T) matrix of [`Dropout::attn_factor`] for head `bh`, one Philox call per 2×2 block — the same
    /// values, computed 4× faster (what the CPU attention uses).
    pub fn attn_factors(&self, bh: u64, t: usize) -> Vec<f64> {
        let mut f = vec![1.0; t * t];
        if self.p <= 0.0 {
            return f;
        }
        let tp = attn_row_stride(t);
        for i in (0..t).step_by(2) {
            let r = bh * tp + i as u64; // even: rows r, r+1 share the counter
            for j in (0..t).step_by(2) {
                let c = (r >> 1) * (tp >> 1) + (j as u64 >> 1);
                let w = philox4x32_10(
                    [c as u32, (c >> 32) as u32, 0, 0],
                    [self.seed as u32, (self.seed >> 32) as u32],
                );
                for (di, dj, word) in [(0, 0, w[0]), (0, 1, w[1]), (1, 0, w[2]), (1, 1, w[3])] {
                    if i + di < t && j + dj < t {
                        f[(i + di) * t + j + dj] = self.keep(word);
                    }
                }
            }
        }
        f
    }

    /// The multipliers of elements 0..n, one Philox call per four elements (= [`Dropout::factor`] of each).
    pub fn factors(&self, n: usize) -> Vec<f64> {
        let mut f = vec![1.0; n];
        if self.p <= 0.0 {
            return f;
        }
        for (c, chunk) in f.chunks_mut(4).enumerate() {
            let c = c as u64;
            let w = philox4x32_10(
                [c as u32, (c >> 32) as u32, 0, 0],
                [self.seed as u32, (self.seed >> 32) as u32],
            );
            for (k, x) in chunk.iter_mut().enumerate() {
                *x = self.keep(w[k]);
            }
        }
        f
    }

    /// The multiplier of element `idx`: 0 (dropped) or 1/(1-p) (kept).
    #[inline]
    pub fn factor(&self, idx: u64) -> f64 {
        if self.p <= 0.0 {
            1.0
        } else if uniform(self.seed, idx) >= self.p {
            1.0 / (1.0 - self.p as f64)
        } else {
            0.0
        }
    }
}

/// Derive the seed of one dropout site from a step seed, a layer and a site number (SplitMix64 mixing).
pub fn site_seed(step_seed: u64, layer: u64, site: u64) -> u64 {
    splitmix64(
        step_seed ^ splitmix64(layer.wrapping_mul(0x1000_0000_01B3) ^ site.wrapping_add(0x9E37)),
    )
}

pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A small seeded generator for initialisation and shuffling (xoshiro256**), with a serialisable state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    pub s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut s = [0u64; 4];
        for v in s.iter_mut() {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            *v = splitmix64(x);
        }
        Rng { s }
    }
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }
    /// Uniform in [0, 1) with 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answer() {
        // Known-answer vectors from the Random123 distribution (kat_vectors, philox4x32_10).
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([0xffffffff; 4], [0xffffffff; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn attention_dropout_shares_one_philox_call_per_2x2_block() {
        // the CUDA kernels rely on this layout (kernels/common.cuh attn_dropout_keys / attn_dropout_rows)
        let (seed, bh, t) = (99u64, 5u64, 37usize);
        let tp = attn_row_stride(t);
        assert_eq!(tp, 38);
        let (i, j) = (6u64, 10u64);
        let r = bh * tp + i;
        let c = (r >> 1) * (tp >> 1) + (j >> 1);
        let w = philox4x32_10(
            [c as u32, (c >> 32) as u32, 0, 0],
            [seed as u32, (seed >> 32) as u32],
        );
        let u = |x: u32| (x >> 8) as f32 / 16_777_216.0;
        assert_eq!(attn_uniform(seed, bh, i, j, t), u(w[0]));
        assert_eq!(attn_uniform(seed, bh, i, j + 1, t), u(w[1]));
        assert_eq!(attn_uniform(seed, bh, i + 1, j, t), u(w[2]));
        assert_eq!(attn_uniform(seed, bh, i + 1, j + 1, t), u(w[3]));
    }

    #[test]
    fn batched_factors_equal_the_per_element_definition() {
        let d = Dropout::new(0.3, 1234);
        let f = d.factors(103);
        assert!((0..103).all(|i| f[i] == d.factor(i as u64)));
        for t in [7usize, 8] {
            let m = d.attn_factors(3, t);
            for i in 0..t {
                for j in 0..t {
                    assert_eq!(
                        m[i * t + j],
                        d.attn_factor(3, i as u64, j as u64, t),
                        "t={t} i={i} j={j}"
                    );
                }
            }
        }
    }

    #[test]
    fn dropout_rate_is_close_to_p() {
        let d = Dropout::new(0.1, 42);
        let n = 200_000u64;
        let dropped = (0..n).filter(|&i| d.factor(i) == 0.0).count() as f64 / n as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped fraction {dropped}");
    }
}
