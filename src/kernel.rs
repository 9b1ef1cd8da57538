//! What a kernel launch is, and which kernels run: shared by the CUDA backend (src/cuda), the ops' launch
//! plans (src/ops/*/mod.rs) and the kernel emulator (tests/emu). Depends on nothing but [`crate::tensor`].
//!
//! - [`Launch`]: one kernel launch as data (module, kernel name, grid, block, shared memory, parameter struct).
//!   Launch plans are pure functions of shapes and a [`KernelConfig`]; the CUDA backend runs them, the
//!   emulator tests run the same ones on the CPU.
//! - [`KernelConfig`]: the typed choice of kernels (attention variant, GEMM path, vector kernels), parsed once —
//!   from command-line flags, or from the environment as a strictly validated fallback — and owned by the CUDA
//!   backend. Nothing in a launch path reads the environment.
//! - [`ParamLayout`]: the byte layout of every `#[repr(C)]` kernel parameter struct, which
//!   tests/kernels_compile.rs checks against the `CHECK_FIELD` static assertions in kernels/*.cu (compiled by
//!   NVRTC and by the emulator's C++ compiler).

use crate::tensor::DType;
use anyhow::{bail, Result};

/// Grid size helper: blocks of `block` threads covering `n` items (at least one).
pub fn blocks(n: usize, block: usize) -> u32 {
    n.div_ceil(block).max(1) as u32
}

/// One kernel launch as data: what a CUDA op hands to the backend, and what tests/emu_kernels.rs runs on the
/// CPU through the kernel emulator — so those tests check the launch configuration (grid, block, dynamic shared
/// memory) as well as the kernel.
#[derive(Clone, Debug)]
pub struct Launch<P> {
    /// kernel module (src/cuda/nvrtc.rs MODULES)
    pub module: &'static str,
    pub name: String,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    /// dynamic shared memory, bytes
    pub smem: u32,
    /// the kernel's parameter struct (`#[repr(C)]`, mirrored in the .cu)
    pub params: P,
}

/// Kernel dtype suffix: `f32`, `bf16` or `f16`.
pub fn suffix(d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => bail!("no CUDA kernels for dtype {d}"),
    })
}

/// The numeric code of a dtype in kernel parameter structs (matches DT_* in kernels/common.cuh).
pub fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
        DType::I32 => 3,
        DType::F64 => 4,
    }
}

/// Which fused-attention kernel runs for bf16/f16 activations at a tensor-core head size (32, 64, 128).
/// f32, and other head sizes, always run variant 1 (CUDA cores).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// variant 1, CUDA cores (kernels/attention.cu)
    V1,
    /// variant 3, tensor cores, FlashAttention-2 structure (kernels/attention_tc.cu), the GPU-verified default
    V3,
    /// variant 4: pipelined forward, one-pass backward with f32 dQ reductions, in the given backward shape
    V4(Tc4Shape),
    /// variant 5: variant 4 with the forward's products on Hopper's wgmma (sm_90 only; head sizes 32 and 64,
    /// variant 4's forward at 128); variant 4's backward in the given shape, which also picks the wgmma
    /// forward's (w4: one warpgroup per block; w8, w8b2: two)
    V5(Tc4Shape),
    /// variant 6: variant 5's forward and a backward on wgmma too (sm_90 only; head sizes 32 and 64, variant
    /// 4's forward and backward, in the given shape, at 128). The wgmma kernels' shapes (variant 5's forward
    /// too): w4, one warpgroup per block (64 queries or keys); w8 and w8b2, two (128; kernels/attention_wg.cu)
    V6(Tc4Shape),
}

impl AttnKernel {
    /// Variant 4's backward shape, for the variants whose backward is variant 4's.
    pub fn tc4_shape(self) -> Option<Tc4Shape> {
        match self {
            AttnKernel::V4(s) | AttnKernel::V5(s) | AttnKernel::V6(s) => Some(s),
            _ => None,
        }
    }
}

/// Variant 4's backward shape: warps per block and register budget (kernels/attention_tc.cu lists them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tc4Shape {
    /// 4 warps, 64 keys per block
    W4,
    /// 8 warps, 128 keys per block, 1 block per SM
    W8,
    /// 8 warps held to 128 registers, 2 blocks per SM
    W8B2,
}

impl Tc4Shape {
    /// (kernel-name tag, warps per block)
    pub fn tag(self) -> (&'static str, usize) {
        match self {
            Tc4Shape::W4 => ("w4", 4),
            Tc4Shape::W8 => ("w8", 8),
            Tc4Shape::W8B2 => ("w8b2", 8),
        }
    }
    pub const ALL: [Tc4Shape; 3] = [Tc4Shape::W4, Tc4Shape::W8, Tc4Shape::W8B2];
}

/// How bf16/f16 GEMMs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmPath {
    /// cublasGemmEx, then the bias kernel (the GPU-verified default)
    Ex,
    /// cuBLASLt with the bias in the epilogue; `tune`: time the heuristic's 8 best algorithms per shape once
    Lt { tune: bool },
}

/// The typed choice of kernels. The defaults are the paths that passed the GPU parity suite and won the bench
/// (docs/perf-log.md); a path becomes the default here, in one place, once it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelConfig {
    pub attention: AttnKernel,
    pub gemm: GemmPath,
    /// the 16-byte-vector LayerNorm, GELU, bias-gradient and embeddings-backward kernels
    pub vec: bool,
    /// synchronise after every launch, so that a faulting kernel is named (debugging)
    pub sync_launch: bool,
    /// capture each training micro-batch's forward, loss and backward in a CUDA graph per batch shape and
    /// replay it (src/train/graphs.rs); off while profiling or with `sync_launch`
    pub graphs: bool,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            attention: AttnKernel::V3,
            gemm: GemmPath::Ex,
            vec: false,
            sync_launch: false,
            graphs: false,
        }
    }
}

/// Explicit kernel choices, each `None` when not given (command-line flags; see [`KernelConfig::resolve`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelChoice {
    /// v1 | v3 | v4 | v5 | v6
    pub attention: Option<String>,
    /// w4 | w8 | w8b2 (variant 4's backward shape; the wgmma kernels' block shape for v5/v6: w4, or w8/w8b2)
    pub attention_v4_shape: Option<String>,
    /// ex | lt
    pub gemm: Option<String>,
    /// on | off (cuBLASLt's algorithm timing)
    pub gemm_tune: Option<String>,
    /// on | off
    pub vec: Option<String>,
    pub sync_launch: bool,
    /// on | off (CUDA graphs of the training step)
    pub graphs: Option<String>,
}

fn parse_switch(what: &str, v: &str) -> Result<bool> {
    Ok(match v {
        "1" | "on" | "true" | "yes" => true,
        "0" | "off" | "false" | "no" => false,
        other => bail!("{what}={other:?}: expected on or off (1/0)"),
    })
}

impl KernelConfig {
    /// The configuration from explicit choices, falling back for each one not given to the environment
    /// (`BERTQA_ATTN=v1|v3|v4|v5|v6`, `BERTQA_ATTN4=w4|w8|w8b2`, `BERTQA_GEMM=ex|lt`, `BERTQA_GEMM_TUNE=1|0`,
    /// `BERTQA_VEC=1|0`, `BERTQA_GRAPHS=1|0`, `BERTQA_SYNC_LAUNCH=1`) through `env`, then to the default. Unknown values are errors
    /// that name the flag or variable, never a silent fallback.
    pub fn resolve(c: &KernelChoice, env: impl Fn(&str) -> Option<String>) -> Result<KernelConfig> {
        let d = KernelConfig::default();
        let pick =
            |flag: &Option<String>, flag_name: &str, var: &str| -> Option<(String, String)> {
                match flag {
                    Some(v) => Some((flag_name.to_string(), v.clone())),
                    None => env(var).map(|v| (var.to_string(), v)),
                }
            };
        let shape = match pick(
            &c.attention_v4_shape,
            "--attention-v4-shape",
            "BERTQA_ATTN4",
        ) {
            None => Tc4Shape::W8B2,
            Some((w, v)) => match v.as_str() {
                "w4" => Tc4Shape::W4,
                "w8" => Tc4Shape::W8,
                "w8b2" => Tc4Shape::W8B2,
                other => bail!("{w}={other:?}: expected w4, w8 or w8b2"),
            },
        };
        let attention = match pick(&c.attention, "--attention-kernel", "BERTQA_ATTN") {
            None => d.attention,
            Some((w, v)) => match v.as_str() {
                "v1" => AttnKernel::V1,
                "v3" => AttnKernel::V3,
                "v4" => AttnKernel::V4(shape),
                "v5" => AttnKernel::V5(shape),
                "v6" => AttnKernel::V6(shape),
                other => bail!(
                    "{w}={other:?}: expected v1, v3, v4, v5 or v6 (variant 2 was retired: docs/perf-log.md)"
                ),
            },
        };
        let tune = match pick(&c.gemm_tune, "--gemm-tune", "BERTQA_GEMM_TUNE") {
            None => true,
            Some((w, v)) => parse_switch(&w, &v)?,
        };
        let gemm = match pick(&c.gemm, "--gemm", "BERTQA_GEMM") {
            None => d.gemm,
            Some((w, v)) => match v.as_str() {
                "ex" => GemmPath::Ex,
                "lt" => GemmPath::Lt { tune },
                other => bail!("{w}={other:?}: expected ex or lt"),
            },
        };
        let vec = match pick(&c.vec, "--vec-kernels", "BERTQA_VEC") {
            None => d.vec,
            Some((w, v)) => parse_switch(&w, &v)?,
        };
        let graphs = match pick(&c.graphs, "--cuda-graphs", "BERTQA_GRAPHS") {
            None => d.graphs,
            Some((w, v)) => parse_switch(&w, &v)?,
        };
        let sync_launch = c.sync_launch
            || match env("BERTQA_SYNC_LAUNCH") {
                None => false,
                Some(v) => parse_switch("BERTQA_SYNC_LAUNCH", &v)?,
            };
        Ok(KernelConfig {
            attention,
            gemm,
            vec,
            sync_launch,
            graphs,
        })
    }

    /// [`KernelConfig::resolve`] with the process environment (read once, at start-up).
    pub fn from_choice_and_env(c: &KernelChoice) -> Result<KernelConfig> {
        Self::resolve(c, |v| std::env::var(v).ok())
    }

    /// Whether bf16/f16 GEMMs go through cuBLASLt.
    pub fn gemm_lt(&self) -> bool {
        matches!(self.gemm, GemmPath::Lt { .. })
    }

    /// A short description for logs, e.g. `attention v4/w8b2, gemm lt (tuned), vec on`.
    pub fn describe(&self) -> String {
        let a = match self.attention {
            AttnKernel::V1 => "v1".to_string(),
            AttnKernel::V3 => "v3".to_string(),
            AttnKernel::V4(s) => format!("v4/{}", s.tag().0),
            AttnKernel::V5(s) => format!("v5/{}", s.tag().0),
            AttnKernel::V6(s) => format!("v6/{}", s.tag().0),
        };
        let g = match self.gemm {
            GemmPath::Ex => "ex".to_string(),
            GemmPath::Lt { tune } => format!("lt{}", if tune { " (tuned)" } else { "" }),
        };
        format!(
            "attention {a}, gemm {g}, vec {}{}{}",
            if self.vec { "on" } else { "off" },
            if self.graphs { ", CUDA graphs" } else { "" },
            if self.sync_launch {
                ", sync launch"
            } else {
                ""
            }
        )
    }
}

/// The byte layout of a `#[repr(C)]` kernel parameter struct: its name (as in the .cu), size and the offset of
/// every field. Built by [`crate::param_layout!`]; checked against kernels/*.cu by tests/kernels_compile.rs.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub name: &'static str,
    pub size: usize,
    pub fields: Vec<(&'static str, usize)>,
}

/// `param_layout!(Struct { a, b, c })`: the [`ParamLayout`] of `Struct` (every field must be listed; the
/// test compares the list with the .cu's CHECK_FIELD lines, so a field left out is caught there).
#[macro_export]
macro_rules! param_layout {
    ($t:ident { $($f:ident),* $(,)? }) => {
        $crate::kernel::ParamLayout {
            name: stringify!($t),
            size: std::mem::size_of::<$t>(),
            fields: vec![$((stringify!($f), std::mem::offset_of!($t, $f))),*],
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |v| {
            pairs
                .iter()
                .find(|(k, _)| *k == v)
                .map(|(_, x)| x.to_string())
        }
    }

    #[test]
    fn defaults_flags_environment_and_errors() {
        let none = KernelChoice::default();
        assert_eq!(
            KernelConfig::resolve(&none, env(&[])).unwrap(),
            KernelConfig::default()
        );
        let c = KernelConfig::resolve(
            &none,
            env(&[
                ("BERTQA_ATTN", "v4"),
                ("BERTQA_ATTN4", "w4"),
                ("BERTQA_GEMM", "lt"),
                ("BERTQA_GEMM_TUNE", "0"),
                ("BERTQA_VEC", "1"),
                ("BERTQA_GRAPHS", "on"),
            ]),
        )
        .unwrap();
        assert_eq!(c.attention, AttnKernel::V4(Tc4Shape::W4));
        assert_eq!(c.gemm, GemmPath::Lt { tune: false });
        assert!(c.vec && c.graphs && !c.sync_launch);
        assert!(!KernelConfig::default().graphs);
        let off = KernelChoice {
            graphs: Some("off".into()),
            ..Default::default()
        };
        assert!(
            !KernelConfig::resolve(&off, env(&[("BERTQA_GRAPHS", "1")]))
                .unwrap()
                .graphs
        );
        // a flag wins over the environment
        let flags = KernelChoice {
            attention: Some("v1".into()),
            ..Default::default()
        };
        let c = KernelConfig::resolve(&flags, env(&[("BERTQA_ATTN", "v4")])).unwrap();
        assert_eq!(c.attention, AttnKernel::V1);
        // variant 5 takes variant 4's backward shape
        let c = KernelConfig::resolve(&none, env(&[("BERTQA_ATTN", "v5"), ("BERTQA_ATTN4", "w8")]))
            .unwrap();
        assert_eq!(c.attention, AttnKernel::V5(Tc4Shape::W8));
        assert_eq!(c.attention.tc4_shape(), Some(Tc4Shape::W8));
        assert!(
            c.describe().starts_with("attention v5/w8,"),
            "{}",
            c.describe()
        );
        assert_eq!(AttnKernel::V3.tc4_shape(), None);
        // unknown values are errors naming where they came from (BERTQA_ATTN=v2 used to run the default)
        let e = KernelConfig::resolve(&none, env(&[("BERTQA_ATTN", "v2")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("BERTQA_ATTN") && e.contains("v2"), "{e}");
        let bad_flag = KernelChoice {
            gemm: Some("cublas".into()),
            ..Default::default()
        };
        let e = KernelConfig::resolve(&bad_flag, env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--gemm"), "{e}");
        assert!(KernelConfig::resolve(&none, env(&[("BERTQA_VEC", "yes please")])).is_err());
        assert!(KernelConfig::resolve(&none, env(&[("BERTQA_SYNC_LAUNCH", "2")])).is_err());
        let e = KernelConfig::resolve(&none, env(&[("BERTQA_GRAPHS", "maybe")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("BERTQA_GRAPHS"), "{e}");
    }
}
