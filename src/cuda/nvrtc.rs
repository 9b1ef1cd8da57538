//! Run-time compilation of kernels/*.cu with NVRTC, and a PTX cache on disk.
//!
//! Why NVRTC and not nvcc in build.rs: the crate must build on machines without CUDA (CI, laptops), and the
//! device machine may have no Rust toolchain. NVRTC compiles each kernel module the first time it is used, for
//! the architecture of the GPU at hand; the PTX is cached under `$BERTQA_CACHE` (default
//! `~/.cache/bertqa/ptx`) keyed by a hash of the source, the options and the architecture.
//!
//! Headers: kernels include `cuda_bf16.h`/`cuda_fp16.h`. The include directory is found from
//! `BERTQA_CUDA_INCLUDE`, `CUDA_HOME`/`CUDA_PATH`, `/usr/local/cuda/include`, or the `nvidia/cu13/include`
//! folder of the pip wheel `nvidia-cuda-runtime` (site-packages given by `BERTQA_CUDA_PIP`).

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::ffi::{CStr, CString};
use std::path::PathBuf;

/// The shared header, prepended to every module (NVRTC then needs no include path for it).
pub const COMMON: &str = include_str!("../../kernels/common.cuh");

/// Every kernel module: (name, source).
pub const MODULES: &[(&str, &str)] = &[
    ("embedding", include_str!("../../kernels/embedding.cu")),
    ("layernorm", include_str!("../../kernels/layernorm.cu")),
    ("gelu", include_str!("../../kernels/gelu.cu")),
    ("dropout", include_str!("../../kernels/dropout.cu")),
    ("attention", include_str!("../../kernels/attention.cu")),
    (
        "attention_tc",
        include_str!("../../kernels/attention_tc.cu"),
    ),
    ("span_loss", include_str!("../../kernels/span_loss.cu")),
    ("adamw", include_str!("../../kernels/adamw.cu")),
    ("reduce", include_str!("../../kernels/reduce.cu")),
    (
        "attention_wg",
        include_str!("../../kernels/attention_wg.cu"),
    ),
    ("wgmma_probe", include_str!("../../kernels/wgmma_probe.cu")),
];

/// Modules that use an architecture's arch-specific instructions (Hopper's wgmma: the `a` targets), compiled
/// for `sm_90a` on an sm_90 device; see [`module_arch`]. (attention_wg: attention variant 5's forward and variant 6's backward.)
pub const ARCH_SPECIFIC: &[&str] = &["attention_wg", "wgmma_probe"];

/// The NVRTC target for `module` on a device of architecture `arch` ("sm_90"): the arch-specific variant
/// ("sm_90a") for the modules in [`ARCH_SPECIFIC`] on sm_90, `arch` otherwise (those modules' kernels then
/// trap: their instructions do not exist there).
pub fn module_arch(module: &str, arch: &str) -> String {
    if ARCH_SPECIFIC.contains(&module) && arch == "sm_90" {
        "sm_90a".into()
    } else {
        arch.into()
    }
}

pub fn module_source(name: &str) -> Result<String> {
    let (_, src) = MODULES
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| anyhow!("no kernel module named {name:?}"))?;
    let body: String = src
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("#include \"common.cuh\"") {
                ""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    Ok(format!("{COMMON}\n#line 1 \"kernels/{name}.cu\"\n{body}\n"))
}

/// Whether libnvrtc can be loaded (it is loaded lazily by cudarc, which panics when it is missing).
pub fn nvrtc_present() -> bool {
    std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// The CUDA include directory holding cuda_bf16.h, if one can be found (see [`find_cuda_include`]).
pub fn cuda_include_dir() -> Option<PathBuf> {
    find_cuda_include(|v| std::env::var(v).ok())
}

/// The first of `$BERTQA_CUDA_INCLUDE`, `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include`
/// and `$BERTQA_CUDA_PIP/nvidia/cu13/include` (the pip wheel nvidia-cuda-runtime) that holds cuda_bf16.h;
/// `var` reads the environment. scripts/train_squad.sh looks in the same places, in the same order.
pub fn find_cuda_include(var: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Some(p) = var("BERTQA_CUDA_INCLUDE") {
        cands.push(p.into());
    }
    for v in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = var(v) {
            cands.push(PathBuf::from(p).join("include"));
        }
    }
    cands.push("/usr/local/cuda/include".into());
    if let Some(p) = var("BERTQA_CUDA_PIP") {
        cands.push(PathBuf::from(p).join("nvidia/cu13/include"));
    }
    cands.into_iter().find(|p| p.join("cuda_bf16.h").exists())
}

/// The compiled PTX of a module and NVRTC's log (warnings), for `arch` such as "sm_90" or "compute_90".
pub struct Compiled {
    pub ptx: String,
    pub log: String,
}

pub fn compile_options(arch: &str) -> Result<Vec<String>> {
    let inc = cuda_include_dir().ok_or_else(|| {
        anyhow!(
            "cannot find the CUDA headers (cuda_bf16.h): set BERTQA_CUDA_INCLUDE or CUDA_HOME, or install the pip \
             wheel nvidia-cuda-runtime==13.0.* and set BERTQA_CUDA_PIP to its site-packages"
        )
    })?;
    Ok(vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--device-as-default-execution-space".into(),
        "--extra-device-vectorization".into(),
        "-lineinfo".into(),
        format!("--include-path={}", inc.display()),
    ])
}

/// Compile one module with NVRTC (no cache). Errors carry the full log.
pub fn compile(name: &str, arch: &str) -> Result<Compiled> {
    if !nvrtc_present() {
        bail!("libnvrtc not found: install CUDA 13 or the pip wheel nvidia-cuda-nvrtc==13.0.* and add its lib folder to LD_LIBRARY_PATH");
    }
    let src = module_source(name)?;
    let opts = compile_options(arch)?;
    let csrc = CString::new(src).context("kernel source contains NUL")?;
    let cname = CString::new(format!("{name}.cu")).unwrap();
    use cudarc::nvrtc::result as r;
    let prog = r::create_program(&csrc, Some(&cname))
        .map_err(|e| anyhow!("nvrtc create {name}: {e:?}"))?;
    let res = unsafe { r::compile_program(prog, &opts) };
    let log = unsafe { r::get_program_log(prog) }
        .map(|v| {
            unsafe { CStr::from_ptr(v.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    if let Err(e) = res {
        unsafe {
            let _ = r::destroy_program(prog);
        }
        bail!("NVRTC failed to compile kernels/{name}.cu for {arch}: {e:?}\n{log}");
    }
    let ptx = unsafe { r::get_ptx(prog) }.map_err(|e| anyhow!("nvrtc get_ptx {name}: {e:?}"))?;
    unsafe {
        let _ = r::destroy_program(prog);
    }
    let ptx = unsafe { CStr::from_ptr(ptx.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Ok(Compiled {
        ptx,
        log: log.trim().to_string(),
    })
}

fn cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("BERTQA_CACHE") {
        return PathBuf::from(p).join("ptx");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
    PathBuf::from(home).join(".cache/bertqa/ptx")
}

/// PTX for a module, from the disk cache when the same source/options/arch were compiled before.
pub fn cached_ptx(name: &str, arch: &str) -> Result<String> {
    let src = module_source(name)?;
    let mut h = Sha256::new();
    h.update(src.as_bytes());
    h.update(compile_options(arch)?.join(" ").as_bytes());
    let key = format!("{name}-{arch}-{:x}", h.finalize());
    let path = cache_dir().join(format!("{}.ptx", &key[..name.len() + arch.len() + 18]));
    if let Ok(ptx) = std::fs::read_to_string(&path) {
        return Ok(ptx);
    }
    let c = compile(name, arch)?;
    if std::fs::create_dir_all(cache_dir()).is_ok() {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &c.ptx).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(c.ptx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn header_lookup_order() {
        let tmp = std::env::temp_dir().join(format!("bertqa-hdr-{}", std::process::id()));
        let mk = |d: &str| {
            let p = tmp.join(d);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("cuda_bf16.h"), "").unwrap();
            p
        };
        let explicit = mk("explicit");
        let home = mk("home/include");
        let pip = mk("pip/nvidia/cu13/include");
        let env = |pairs: Vec<(&'static str, PathBuf)>| {
            move |v: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == v)
                    .map(|(_, p)| p.display().to_string())
            }
        };
        let system = Path::new("/usr/local/cuda/include/cuda_bf16.h").exists();
        // BERTQA_CUDA_INCLUDE first, then CUDA_HOME
        let all = env(vec![
            ("BERTQA_CUDA_INCLUDE", explicit.clone()),
            ("CUDA_HOME", tmp.join("home")),
            ("BERTQA_CUDA_PIP", tmp.join("pip")),
        ]);
        assert_eq!(find_cuda_include(&all), Some(explicit.clone()));
        let no_explicit = env(vec![
            ("CUDA_HOME", tmp.join("home")),
            ("BERTQA_CUDA_PIP", tmp.join("pip")),
        ]);
        assert_eq!(find_cuda_include(no_explicit), Some(home));
        // a directory without the header is passed over; the pip wheel comes last
        let pip_only = env(vec![
            ("BERTQA_CUDA_INCLUDE", tmp.join("nothing-here")),
            ("BERTQA_CUDA_PIP", tmp.join("pip")),
        ]);
        if !system {
            assert_eq!(find_cuda_include(pip_only), Some(pip));
            assert_eq!(find_cuda_include(|_| None), None);
        } else {
            println!("note: /usr/local/cuda/include is present: the pip-only lookups are not checked here");
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
