//! Random numbers shared bit-for-bit by the CPU reference and the CUDA kernels.
//!
//! ## The dropout stream (version [`DROPOUT_STREAM_VERSION`])
//! Dropout masks come from the counter-based Philox4x32 generator (Salmon et al., SC'11), the one cuRAND
//! and PyTorch use (10 rounds; attention dropout 7), and are regenerated in backward instead of stored. They depend on the data only
//! through each element's *place in the model*, never on how a batch is laid out, so packed, padded,
//! micro-batched and data-parallel runs draw the same masks (../shared/DESIGN.md, "Dropout stream"):
//! - key: the site's seed, [`site_seed`]`(step_seed, layer, site)` with [`step_seed`]`(run seed, optimizer
//!   step)`. The model names a site by its key [`site_key`]`(layer, site)` ([`Dropout`]); the step's seed
//!   reaches the kernels in device memory, with the batch (so a captured CUDA graph replays any step);
//! - hidden dropout (embeddings, after attention, after the feed-forward): element (window `w`, position `t`,
//!   feature `c`) uses word `c mod 4` of `philox([c/4, t, w, 0], key)` — one call per 4 features of a row;
//!   An element is kept iff `u ≥ p`, `u` = the word's top 24 bits scaled to [0, 1).
//! - attention-probability dropout: element (window `w`, head `h`, query `i`, key `j`) uses the 16-bit half
//!   `j mod 2` (0: the low half) of word `2·(⌊i/8⌋ mod 2) + ⌊j/8⌋ mod 2` of
//!   `philox7([4·⌊j/16⌋ + ⌊(j mod 8)/2⌋, 8·⌊i/16⌋ + i mod 8, h, w], key)` (Philox4x32 with 7 rounds,
//!   [`philox4x32_7`]; hidden dropout uses 10): one call draws the 8 entries of
//!   queries {i, i+8} × keys {j, j+1, j+8, j+9} (i mod 16 < 8, j mod 16 < 8, j even) — what one lane of an
//!   m16n8k16 tensor-core accumulator holds over 16 keys, so the forward kernel makes one call per lane and
//!   16 keys, and the backward, whose lanes hold two keys and four queries, one call plus a swap with the
//!   lane that holds the neighbouring key ([`attn_block`]). An element is kept iff `u ≥ p`, `u` = its 16 bits
//!   scaled to [0, 1) — p is resolved to 2^-16, e.g. p = 0.1 drops with probability 6554/65536 = 0.100006.
//! - kept elements are scaled by `1/(1-p)`.
//!
//! `w` is the window's index in the optimizer step's whole batch (before any split into micro-batches or
//! devices), `t` its position in the window. trainer_state.json records the version; a run is not resumed
//! across versions.

/// The version of the dropout stream defined above (1: the layout-dependent stream before padding-free
/// batches; 2: attention dropout from 24-bit words, one Philox call per 2×2 block of (query, key); 3: 16-bit
/// attention draws, one Philox4x32-10 call per 8; 4: that call with 7 rounds).
pub const DROPOUT_STREAM_VERSION: u32 = 4;

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

#[inline]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds (hidden dropout).
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    philox4x32(ctr, key, 10)
}

/// Philox4x32 with 7 rounds (attention dropout): the fewest of Random123's Crush-resistant variants (Salmon
/// et al., SC'11, Table 2), as FlashAttention-2 uses; the attention kernels make one call per 8 draws inside
/// their main loops, where the 3 rounds saved are ~3–7% of a tile's instructions.
pub fn philox4x32_7(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    philox4x32(ctr, key, 7)
}

/// Philox4x32 with `rounds` rounds.
pub fn philox4x32(ctr: [u32; 4], key: [u32; 2], rounds: usize) -> [u32; 4] {
    let mut c = ctr;
    let mut k = key;
    for round in 0..rounds {
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

/// The Philox key of a 64-bit seed.
#[inline]
fn key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// Uniform in [0, 1) from a word's top 24 bits.
#[inline]
pub fn word_uniform(w: u32) -> f32 {
    (w >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// The four words of hidden-dropout features `4·c4 .. 4·c4+3` of window `w`, position `t`.
#[inline]
pub fn hidden_words(seed: u64, w: u32, t: u32, c4: u32) -> [u32; 4] {
    philox4x32_10([c4, t, w, 0], key(seed))
}

/// Uniform in [0, 1) from 16 bits.
#[inline]
pub fn half_uniform(x: u32) -> f32 {
    (x & 0xffff) as f32 * (1.0 / 65_536.0)
}

/// The attention-dropout block holding (query `i`, key `j`): its first query and first key — queries
/// `{i0, i0+8}`, keys `{j0, j0+1, j0+8, j0+9}` — and the position of (i, j) in it, `e = 4·r + k` with
/// `i = i0 + 8r`, `j = j0 + (k mod 2) + 8·⌊k/2⌋`.
#[inline]
pub fn attn_block(i: u32, j: u32) -> (u32, u32, usize) {
    let (i0, r) = (i - (i & 8), (i >> 3) & 1);
    let (j0, k) = (j - (j & 9), (j & 1) + 2 * ((j >> 3) & 1));
    (i0, j0, (4 * r + k) as usize)
}

/// The 8 draws (16 bits each) of the attention-dropout block whose first query is `i0` and first key `j0`
/// (see [`attn_block`]) of window `w`, head `h`: entry `e` is half `e mod 2` of word `⌊e/2⌋`.
#[inline]
pub fn attn_draws(seed: u64, w: u32, h: u32, i0: u32, j0: u32) -> [u32; 8] {
    let ctr = [4 * (j0 / 16) + (j0 % 8) / 2, 8 * (i0 / 16) + i0 % 8, h, w];
    let r = philox4x32_7(ctr, key(seed));
    std::array::from_fn(|e| (r[e / 2] >> (16 * (e % 2))) & 0xffff)
}

/// A dropout site as the model names it: probability `p` of zeroing (`p == 0` disables it) and the site's key,
/// [`site_key`]`(layer, site)`, the same for every step of a run. The Philox key of its masks in a step is
/// [`step_site_seed`]`(step seed, site key)` ([`Dropout::at`]); the step's seed travels with the batch
/// ([`crate::ops::SeqLayout::step_seed`]) into device memory, where the kernels read it, so that no kernel
/// parameter changes from one step to the next and a captured CUDA graph replays any step.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Dropout {
    pub p: f32,
    pub site: u64,
}

impl Dropout {
    pub const OFF: Dropout = Dropout { p: 0.0, site: 0 };
    pub fn new(p: f32, site: u64) -> Self {
        Dropout { p, site }
    }
    pub fn active(&self) -> bool {
        self.p > 0.0
    }
    /// The masks of this site in the step whose seed is `step_seed`.
    pub fn at(&self, step_seed: u64) -> DropoutMask {
        DropoutMask {
            p: self.p,
            seed: step_site_seed(step_seed, self.site),
        }
    }
}

/// The masks of one dropout site in one step: probability `p` and the Philox key `seed`.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct DropoutMask {
    pub p: f32,
    pub seed: u64,
}

impl DropoutMask {
    pub fn new(p: f32, seed: u64) -> Self {
        DropoutMask { p, seed }
    }
    pub fn active(&self) -> bool {
        self.p > 0.0
    }

    /// The multiplier of a word: 0 (dropped) or 1/(1-p) (kept).
    fn keep(&self, word: u32) -> f64 {
        self.factor(word_uniform(word))
    }

    /// The multiplier of a uniform draw: 0 (dropped, u < p) or 1/(1-p) (kept).
    fn factor(&self, u: f32) -> f64 {
        if u >= self.p {
            1.0 / (1.0 - self.p as f64)
        } else {
            0.0
        }
    }

    /// The multiplier of hidden feature `c` at (window `w`, position `t`).
    pub fn hidden_factor(&self, w: u32, t: u32, c: u32) -> f64 {
        if !self.active() {
            return 1.0;
        }
        self.keep(hidden_words(self.seed, w, t, c / 4)[(c % 4) as usize])
    }

    /// The multipliers of features 0..n of (window `w`, position `t`), one Philox call per four features
    /// (= [`DropoutMask::hidden_factor`] of each).
    pub fn hidden_factors(&self, w: u32, t: u32, n: usize) -> Vec<f64> {
        let mut f = vec![1.0; n];
        if !self.active() {
            return f;
        }
        for (c4, chunk) in f.chunks_mut(4).enumerate() {
            let words = hidden_words(self.seed, w, t, c4 as u32);
            for (k, x) in chunk.iter_mut().enumerate() {
                *x = self.keep(words[k]);
            }
        }
        f
    }

    /// The multiplier of attention probability (query `i`, key `j`) of head `h` of window `w`.
    pub fn attn_factor(&self, w: u32, h: u32, i: u32, j: u32) -> f64 {
        if !self.active() {
            return 1.0;
        }
        let (i0, j0, e) = attn_block(i, j);
        self.factor(half_uniform(attn_draws(self.seed, w, h, i0, j0)[e]))
    }

    /// Visits every entry of the (rows × keys) matrix of [`DropoutMask::attn_factor`] for head `h` of window `w`,
    /// block by block (one Philox call per 8 entries): `f(i, j, f_ij)` for each `i < rows`, `j < keys`, in no
    /// particular order. Only when the site is active.
    #[inline]
    pub fn attn_factor_blocks(
        &self,
        w: u32,
        h: u32,
        rows: usize,
        keys: usize,
        mut f: impl FnMut(usize, usize, f64),
    ) {
        if !self.active() {
            return;
        }
        for i0 in (0..rows).filter(|i| i % 16 < 8) {
            for j0 in (0..keys).step_by(2).filter(|j| j % 16 < 8) {
                let d = attn_draws(self.seed, w, h, i0 as u32, j0 as u32);
                for (e, x) in d.into_iter().enumerate() {
                    let (i, j) = (i0 + 8 * (e / 4), j0 + (e % 2) + 8 * ((e / 2) % 2));
                    if i < rows && j < keys {
                        f(i, j, self.factor(half_uniform(x)));
                    }
                }
            }
        }
    }
}

/// The seed of optimizer step `step` of a run with seed `run_seed` (the same for every micro-batch and every
/// device of the step).
pub fn step_seed(run_seed: u64, step: u64) -> u64 {
    splitmix64(run_seed ^ splitmix64(step.wrapping_mul(0x9E37_79B9) ^ 0x5EED))
}

/// The key of dropout site `site` of layer `layer` (constant over a run; SplitMix64 mixing).
pub fn site_key(layer: u64, site: u64) -> u64 {
    splitmix64(layer.wrapping_mul(0x1000_0000_01B3) ^ site.wrapping_add(0x9E37))
}

/// The Philox key of a dropout site in a step: SplitMix64 of the step's seed XOR the site's key (kernels/
/// common.cuh `dropout_seed` computes the same on the device).
pub fn step_site_seed(step_seed: u64, site_key: u64) -> u64 {
    splitmix64(step_seed ^ site_key)
}

/// The seed of one dropout site from a step seed, a layer and a site number:
/// [`step_site_seed`]`(step_seed, `[`site_key`]`(layer, site))`.
pub fn site_seed(step_seed: u64, layer: u64, site: u64) -> u64 {
    step_site_seed(step_seed, site_key(layer, site))
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

    /// The (rows × keys) matrix of [`DropoutMask::attn_factor`] for head `h` of window `w` (all ones when off;
    /// NaN where the visit misses an entry).
    fn attn_factors(d: &DropoutMask, w: u32, h: u32, rows: usize, keys: usize) -> Vec<f64> {
        let mut m = vec![if d.active() { f64::NAN } else { 1.0 }; rows * keys];
        d.attn_factor_blocks(w, h, rows, keys, |i, j, f| {
            assert!(m[i * keys + j].is_nan(), "({i}, {j}) visited twice");
            m[i * keys + j] = f;
        });
        m
    }

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
        // and its 7-round lines (philox4x32 7 …)
        assert_eq!(
            philox4x32_7([0, 0, 0, 0], [0, 0]),
            [0x5f6fb709, 0x0d893f64, 0x4f121f81, 0x4f730a48]
        );
        assert_eq!(
            philox4x32_7([0xffffffff; 4], [0xffffffff; 2]),
            [0x5207ddc2, 0x45165e59, 0x4d8ee751, 0x8c52f662]
        );
        assert_eq!(
            philox4x32_7(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0x4dfccaba, 0x190a87f0, 0xc47362ba, 0xb6b5242a]
        );
    }

    #[test]
    fn the_stream_is_the_documented_philox_words() {
        // hidden: (w, t, c) → word c%4 of philox([c/4, t, w, 0], key)
        let (seed, p) = (0x0123_4567_89AB_CDEFu64, 0.3f32);
        let d = DropoutMask::new(p, seed);
        let k = [seed as u32, (seed >> 32) as u32];
        let keep = |w: u32| {
            if word_uniform(w) >= p {
                1.0 / (1.0 - p as f64)
            } else {
                0.0
            }
        };
        let words = philox4x32_10([5, 17, 9, 0], k);
        assert_eq!(d.hidden_factor(9, 17, 22), keep(words[2]));
        assert_eq!(d.hidden_factor(9, 17, 23), keep(words[3]));
        // attention: (w, h, i, j) → half j%2 of word 2·(i/8 % 2) + j/8 % 2 of
        // philox7([4·(j/16) + (j%8)/2, 8·(i/16) + i%8, h, w], key); queries 21, 29 and keys 36, 37, 44, 45
        // share the call with counter [4·2 + 2, 8 + 5, h, w]
        let keep16 = |x: u32| keep(x << 16); // top 24 bits x·2^8: u = x/2^16
        let words = philox4x32_7([10, 13, 2, 9], k);
        let draws = [
            (21, 36, words[0] & 0xffff),
            (21, 37, words[0] >> 16),
            (21, 44, words[1] & 0xffff),
            (21, 45, words[1] >> 16),
            (29, 36, words[2] & 0xffff),
            (29, 37, words[2] >> 16),
            (29, 44, words[3] & 0xffff),
            (29, 45, words[3] >> 16),
        ];
        for (i, j, x) in draws {
            assert_eq!(d.attn_factor(9, 2, i, j), keep16(x), "({i}, {j})");
            assert_eq!(attn_block(i, j).0, 21);
            assert_eq!(attn_block(i, j).1, 36);
        }
        // one of them by hand: u = x/2^16 against p
        let x = words[3] >> 16;
        let by_hand = if x as f64 / 65536.0 >= p as f64 {
            1.0 / (1.0 - p as f64)
        } else {
            0.0
        };
        assert_eq!(d.attn_factor(9, 2, 29, 45), by_hand);
    }

    #[test]
    fn a_site_at_a_step_is_the_site_seed() {
        // the split into a run-constant site key and a step seed read on the device is the same key
        for (step, layer, site) in [
            (0u64, 0u64, 0u64),
            (step_seed(42, 7), 3, 2),
            (u64::MAX, 11, 5),
        ] {
            let d = Dropout::new(0.1, site_key(layer, site)).at(step);
            assert_eq!(d.seed, site_seed(step, layer, site));
            assert_eq!(d.p, 0.1);
        }
        // a golden value (computed with the definition before the split): the stream of version 3 is unchanged
        assert_eq!(site_seed(step_seed(42, 7), 3, 2), {
            let st = splitmix64(42 ^ splitmix64(7u64.wrapping_mul(0x9E37_79B9) ^ 0x5EED));
            splitmix64(
                st ^ splitmix64(3u64.wrapping_mul(0x1000_0000_01B3) ^ 2u64.wrapping_add(0x9E37)),
            )
        });
    }

    #[test]
    fn batched_factors_equal_the_per_element_definition() {
        let d = DropoutMask::new(0.3, 1234);
        let f = d.hidden_factors(3, 41, 103);
        assert!((0..103).all(|c| f[c] == d.hidden_factor(3, 41, c as u32)));
        for (rows, keys) in [
            (7usize, 7usize),
            (8, 8),
            (9, 5),
            (3, 33),
            (5, 17),
            (2, 16),
            (17, 25),
            (40, 24),
            (16, 9),
        ] {
            let m = attn_factors(&d, 4, 1, rows, keys);
            for i in 0..rows {
                for j in 0..keys {
                    assert_eq!(
                        m[i * keys + j],
                        d.attn_factor(4, 1, i as u32, j as u32),
                        "rows={rows} keys={keys} i={i} j={j}"
                    );
                }
            }
        }
    }

    #[test]
    fn dropout_rate_is_close_to_p() {
        let d = DropoutMask::new(0.1, 42);
        let f: Vec<f64> = (0..500).flat_map(|t| d.hidden_factors(7, t, 400)).collect();
        let dropped = f.iter().filter(|&&x| x == 0.0).count() as f64 / f.len() as f64;
        assert!(
            (dropped - 0.1).abs() < 0.005,
            "hidden: dropped fraction {dropped}"
        );
        let a = attn_factors(&d, 3, 5, 300, 300);
        let dropped = a.iter().filter(|&&x| x == 0.0).count() as f64 / a.len() as f64;
        assert!(
            (dropped - 0.1).abs() < 0.005,
            "attention: dropped fraction {dropped}"
        );
        // different windows, heads, positions draw different masks
        assert_ne!(d.hidden_factors(7, 0, 400), d.hidden_factors(8, 0, 400));
        assert_ne!(d.hidden_factors(7, 0, 400), d.hidden_factors(7, 1, 400));
        assert_ne!(
            attn_factors(&d, 3, 5, 20, 20),
            attn_factors(&d, 3, 6, 20, 20)
        );
    }
}
