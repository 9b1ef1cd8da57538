//! Run-time compilation of kernels/*.cu with NVRTC, and a cache of the results on disk.
//!
//! Why NVRTC and not nvcc in build.rs: the crate must build on machines without CUDA (CI, laptops), and the
//! device machine may have no Rust toolchain. NVRTC compiles each kernel module the first time it is used, for
//! the architecture of the GPU at hand, into PTX and, for a real architecture (`sm_90`), machine code (a
//! cubin). Both are cached under `$BERTQA_CACHE/ptx` (default `~/.cache/bertqa/ptx`), named by the module,
//! the architecture and a hash of the source and the options (not the headers' folder, which differs from
//! machine to machine). A process loads the cubin, so the driver does not translate the PTX again
//! (the PTX is the fall-back when the driver refuses the cubin).
//!
//! Prebuilt images: `bertqa kernels --arch sm_90 --out DIR` compiles every module into DIR on a machine
//! without a GPU; a process given `BERTQA_KERNELS=DIR` looks there first (never writing to it), so a GPU
//! machine compiles nothing (scripts/package_gpu.sh ships them to the device machine this way).
//!
//! Headers: kernels include `cuda_bf16.h`/`cuda_fp16.h`. The include directory is found from
//! `BERTQA_CUDA_INCLUDE`, `CUDA_HOME`/`CUDA_PATH`, `/usr/local/cuda/include`, or the `nvidia/cu13/include`
//! folder of the pip wheel `nvidia-cuda-runtime` (site-packages given by `BERTQA_CUDA_PIP`).

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

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

/// The compiled PTX of a module, its machine code when `arch` is a real architecture ("sm_90"; None for a
/// virtual one such as "compute_90"), and NVRTC's log (warnings).
pub struct Compiled {
    pub ptx: String,
    pub cubin: Option<Vec<u8>>,
    pub log: String,
}

/// NVRTC's options for `arch` other than the headers' folder: what names a module's images (see
/// [`image_stem`]).
pub fn base_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--device-as-default-execution-space".into(),
        "--extra-device-vectorization".into(),
        "-lineinfo".into(),
    ]
}

/// NVRTC's options for `arch`: [`base_options`] and the folder of the CUDA headers.
pub fn compile_options(arch: &str) -> Result<Vec<String>> {
    let inc = cuda_include_dir().ok_or_else(|| {
        anyhow!(
            "cannot find the CUDA headers (cuda_bf16.h): set BERTQA_CUDA_INCLUDE or CUDA_HOME, or install the pip \
             wheel nvidia-cuda-runtime==13.0.* and set BERTQA_CUDA_PIP to its site-packages"
        )
    })?;
    let mut o = base_options(arch);
    o.push(format!("--include-path={}", inc.display()));
    Ok(o)
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
    let ptx = unsafe { r::get_ptx(prog) }.map_err(|e| anyhow!("nvrtc get_ptx {name}: {e:?}"));
    let cubin = if arch.starts_with("sm_") {
        unsafe { get_cubin(prog) }
            .map_err(|e| anyhow!("nvrtc get_cubin {name} for {arch}: {e}"))
            .map(Some)
    } else {
        Ok(None)
    };
    unsafe {
        let _ = r::destroy_program(prog);
    }
    let (ptx, cubin) = (ptx?, cubin?);
    let ptx = unsafe { CStr::from_ptr(ptx.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Ok(Compiled {
        ptx,
        cubin,
        log: log.trim().to_string(),
    })
}

/// The machine code of a compiled program (NVRTC made it because the target was a real architecture).
unsafe fn get_cubin(prog: cudarc::nvrtc::sys::nvrtcProgram) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::sys;
    let mut n = 0usize;
    let rc = sys::nvrtcGetCUBINSize(prog, &mut n);
    if rc != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("{rc:?}"));
    }
    if n == 0 {
        return Err("NVRTC made no machine code".into());
    }
    let mut buf = vec![0u8; n];
    let rc = sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char);
    if rc != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("{rc:?}"));
    }
    Ok(buf)
}

/// The cache of compiled images: `$BERTQA_CACHE/ptx`, else `~/.cache/bertqa/ptx`.
pub fn cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("BERTQA_CACHE") {
        return PathBuf::from(p).join("ptx");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
    PathBuf::from(home).join(".cache/bertqa/ptx")
}

/// The file name (without extension) under which a module's images are kept: the module, the architecture
/// and a hash of the source and of [`base_options`] — not of the headers' folder, which differs between
/// machines that have the same headers (a pip wheel here, /usr/local/cuda there), so that images built on one
/// machine are found on the other, and a machine with prebuilt images needs neither NVRTC nor the headers.
pub fn image_stem(name: &str, src: &str, arch: &str) -> String {
    let mut h = Sha256::new();
    h.update(src.as_bytes());
    for o in base_options(arch) {
        h.update(o.as_bytes());
        h.update(b"\0");
    }
    let hex = format!("{:x}", h.finalize());
    format!("{name}-{arch}-{}", &hex[..16])
}

/// A module's compiled images as a process loads them.
pub struct Image {
    pub ptx: String,
    /// machine code for the architecture, when there is one (a real architecture's compile makes it)
    pub cubin: Option<Vec<u8>>,
    pub origin: Origin,
}

/// Where an [`Image`] came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    /// `$BERTQA_KERNELS` (prebuilt by `bertqa kernels --out`)
    Prebuilt(PathBuf),
    /// the cache (`$BERTQA_CACHE/ptx`)
    Cache(PathBuf),
    /// compiled by NVRTC now (and written to the cache), in this many seconds
    Compiled(f64),
}

/// Whether `b` is whole machine code for NVIDIA's processors as far as its headers tell: a 64-bit
/// little-endian ELF (e_machine 190, EM_CUDA) holding every byte its program headers, section headers and
/// sections say it has. The driver is given a pointer without a length, so a truncated or foreign file must
/// not reach it.
pub fn is_cuda_elf(b: &[u8]) -> bool {
    let at = |o: u64, n: usize| -> Option<u64> {
        let o = usize::try_from(o).ok()?;
        let s = b.get(o..o.checked_add(n)?)?;
        Some(s.iter().rev().fold(0u64, |v, &x| v << 8 | x as u64))
    };
    let whole = || -> Option<bool> {
        if b.get(..6)? != b"\x7fELF\x02\x01" || at(18, 2)? != 190 {
            return Some(false);
        }
        let (phoff, shoff) = (at(32, 8)?, at(40, 8)?);
        let (phentsize, phnum) = (at(54, 2)?, at(56, 2)?);
        let (shentsize, shnum) = (at(58, 2)?, at(60, 2)?);
        if shnum == 0 || shentsize < 64 {
            return Some(false);
        }
        let mut end = 64u64;
        end = end.max(phoff.checked_add(phnum * phentsize)?);
        end = end.max(shoff.checked_add(shnum * shentsize)?);
        // each segment's bytes (Elf64_Phdr: p_offset at 8, p_filesz at 32)
        if phentsize >= 56 {
            for k in 0..phnum {
                let h = phoff + k * phentsize;
                end = end.max(at(h + 8, 8)?.checked_add(at(h + 32, 8)?)?);
            }
        }
        for k in 0..shnum {
            let h = shoff + k * shentsize;
            // SHT_NOBITS (8) occupies no bytes of the file
            if at(h + 4, 4)? != 8 {
                end = end.max(at(h + 24, 8)?.checked_add(at(h + 32, 8)?)?);
            }
        }
        Some(end <= b.len() as u64)
    };
    whole().unwrap_or(false)
}

/// The images of `stem` in `dir`: the PTX (required) and the cubin (if there is one, and whole by
/// [`is_cuda_elf`]; a damaged one is passed over: the PTX is loaded); None if no PTX.
fn read_images(dir: &Path, stem: &str) -> Option<(String, Option<Vec<u8>>)> {
    // (a NUL would stop the driver's reading of the text; the loader cannot even pass it on)
    let ptx = std::fs::read_to_string(dir.join(format!("{stem}.ptx")))
        .ok()
        .filter(|p| !p.contains('\0'))?;
    let cubin = std::fs::read(dir.join(format!("{stem}.cubin")))
        .ok()
        .filter(|b| is_cuda_elf(b));
    Some((ptx, cubin))
}

/// Whether `dir` holds both images of `stem`, the cubin whole.
pub fn has_images(dir: &Path, stem: &str) -> bool {
    dir.join(format!("{stem}.ptx")).is_file()
        && std::fs::read(dir.join(format!("{stem}.cubin"))).is_ok_and(|b| is_cuda_elf(&b))
}

/// Write the images of `stem` into `dir`, each file written whole under a temporary name and then renamed
/// (a reader never sees half a file; the cubin first, so a PTX present means its cubin is complete too).
pub fn write_images(dir: &Path, stem: &str, c: &Compiled) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // a temporary name of its own per write: several processes, and several threads of one (the replicas
    // of a data-parallel run), may write the same module at once
    static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let put = |ext: &str, bytes: &[u8]| -> Result<()> {
        let path = dir.join(format!("{stem}.{ext}"));
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!("{stem}.{ext}.tmp{}-{n}", std::process::id()));
        let res = std::fs::write(&tmp, bytes)
            .with_context(|| format!("writing {}", tmp.display()))
            .and_then(|_| {
                std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
            });
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    };
    if let Some(cubin) = &c.cubin {
        put("cubin", cubin)?;
    }
    put("ptx", c.ptx.as_bytes())
}

/// A module's images for `arch`: from `$BERTQA_KERNELS` (prebuilt) when it holds this source's, else from
/// the cache, else compiled now and written to the cache (a cache that cannot be written costs a compile
/// per process, nothing else). See [`module_image_in`].
pub fn module_image(name: &str, arch: &str) -> Result<Image> {
    let prebuilt = std::env::var_os("BERTQA_KERNELS").map(PathBuf::from);
    module_image_in(name, arch, prebuilt.as_deref(), &cache_dir())
}

/// [`module_image`] with its folders given: `prebuilt` (read only) first, then `cache` (written after a
/// compile). Images are found by [`image_stem`], so a folder built from another source is passed over.
pub fn module_image_in(
    name: &str,
    arch: &str,
    prebuilt: Option<&Path>,
    cache: &Path,
) -> Result<Image> {
    let src = module_source(name)?;
    let stem = image_stem(name, &src, arch);
    match found_image(&stem, prebuilt, cache) {
        Some(img) => Ok(img),
        None => compile_into(name, arch, cache),
    }
}

/// Compile a module now and write its images to `cache` (a cache that cannot be written costs a compile
/// per process, nothing else).
pub fn compile_into(name: &str, arch: &str, cache: &Path) -> Result<Image> {
    let t = std::time::Instant::now();
    let c = compile(name, arch)?;
    let secs = t.elapsed().as_secs_f64();
    let _ = write_images(cache, &image_stem(name, &module_source(name)?, arch), &c);
    Ok(Image {
        ptx: c.ptx,
        cubin: c.cubin,
        origin: Origin::Compiled(secs),
    })
}

/// The images of `stem` found in `prebuilt` (if given) or `cache`: the first pair with whole machine code,
/// else the first PTX (machine code loads without the driver's translation, so a complete cache entry beats
/// a prebuilt PTX alone); None when neither folder holds a PTX.
pub fn found_image(stem: &str, prebuilt: Option<&Path>, cache: &Path) -> Option<Image> {
    let mut found = vec![];
    if let Some(dir) = prebuilt {
        found.extend(
            read_images(dir, stem).map(|(p, c)| (p, c, Origin::Prebuilt(dir.to_path_buf()))),
        );
    }
    if found.first().is_none_or(|f| f.1.is_none()) {
        found.extend(
            read_images(cache, stem).map(|(p, c)| (p, c, Origin::Cache(cache.to_path_buf()))),
        );
    }
    let k = found.iter().position(|f| f.1.is_some()).unwrap_or(0);
    (k < found.len()).then(|| {
        let (ptx, cubin, origin) = found.swap_remove(k);
        Image { ptx, cubin, origin }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest file [`is_cuda_elf`] accepts: an ELF header (64-bit, little-endian, EM_CUDA) with one
    /// 64-byte section header at offset 64, plus `extra` bytes.
    fn tiny_elf(extra: usize) -> Vec<u8> {
        let mut b = vec![0u8; 128 + extra];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[18] = 190;
        b[40] = 64; // e_shoff
        b[58] = 64; // e_shentsize
        b[60] = 1; // e_shnum
        b
    }

    #[test]
    fn machine_code_is_checked_before_the_driver_sees_it() {
        assert!(is_cuda_elf(&tiny_elf(0)) && is_cuda_elf(&tiny_elf(5)));
        assert!(
            !is_cuda_elf(&tiny_elf(0)[..127]),
            "section headers past the end"
        );
        for (at, v) in [(0, 0u8), (4, 1), (5, 2), (18, 62), (60, 0)] {
            let mut b = tiny_elf(0);
            b[at] = v;
            assert!(!is_cuda_elf(&b), "byte {at} = {v}");
        }
        let mut b = tiny_elf(0);
        b[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(!is_cuda_elf(&b), "an offset that overflows");
        assert!(!is_cuda_elf(b""));
        // a segment (one program header of 56 bytes at 128) whose bytes run past the end
        let mut b = tiny_elf(56);
        b[32] = 128; // e_phoff
        b[54] = 56; // e_phentsize
        b[56] = 1; // e_phnum
        b[128 + 32] = 184; // p_filesz, from p_offset 0: the whole file
        assert!(is_cuda_elf(&b));
        b[128 + 32] = 185;
        assert!(!is_cuda_elf(&b), "a segment past the end");
    }

    #[test]
    fn images_are_named_by_source_and_options_not_by_the_headers_folder() {
        let a = image_stem("gelu", "src", "sm_90");
        assert_eq!(a, image_stem("gelu", "src", "sm_90"));
        assert!(
            a.starts_with("gelu-sm_90-") && a.len() == "gelu-sm_90-".len() + 16,
            "{a}"
        );
        assert_ne!(a, image_stem("gelu", "src2", "sm_90"));
        assert_ne!(a, image_stem("gelu", "src", "sm_80"));
        // the options hashed are the compile options less the include path (whatever the headers' folder)
        if let Ok(opts) = compile_options("sm_90") {
            assert_eq!(opts[..opts.len() - 1], base_options("sm_90")[..]);
            assert!(opts[opts.len() - 1].starts_with("--include-path="));
        }
    }

    /// Prebuilt images are taken before the cache's, the cache's before compiling, neither when built from
    /// another source; a compile writes to the cache only. Needs NVRTC for the compile only.
    #[test]
    fn module_images_come_from_prebuilt_then_cache_then_nvrtc() {
        let tmp = std::env::temp_dir().join(format!("bertqa-images-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let (pre, cache) = (tmp.join("prebuilt"), tmp.join("cache"));
        let stem = image_stem("dropout", &module_source("dropout").unwrap(), "sm_90");
        let fake = |ptx: &str, cubin: &[u8]| Compiled {
            ptx: ptx.into(),
            cubin: Some(cubin.to_vec()),
            log: String::new(),
        };
        write_images(&pre, &stem, &fake("// prebuilt", &tiny_elf(0))).unwrap();
        write_images(&cache, &stem, &fake("// cached", b"\x7fELF cached")).unwrap();
        // a prebuilt image of an older source is passed over
        write_images(
            &pre,
            "adamw-sm_90-0000000000000000",
            &fake("// old", b"old"),
        )
        .unwrap();
        let img = module_image_in("dropout", "sm_90", Some(&pre), &cache).unwrap();
        assert_eq!(img.origin, Origin::Prebuilt(pre.clone()));
        assert_eq!(
            (img.ptx.as_str(), img.cubin.as_deref()),
            ("// prebuilt", Some(&tiny_elf(0)[..]))
        );
        assert!(has_images(&pre, &stem));
        // a prebuilt PTX without whole machine code gives way to a complete cache entry
        std::fs::write(pre.join(format!("{stem}.cubin")), b"cut").unwrap();
        write_images(&cache, &stem, &fake("// cached whole", &tiny_elf(3))).unwrap();
        let img = module_image_in("dropout", "sm_90", Some(&pre), &cache).unwrap();
        assert_eq!(
            (img.origin, img.ptx.as_str()),
            (Origin::Cache(cache.clone()), "// cached whole")
        );
        // ... and is taken where the cache has no machine code either
        write_images(&cache, &stem, &fake("// cached", b"\x7fELF cached")).unwrap();
        let img = module_image_in("dropout", "sm_90", Some(&pre), &cache).unwrap();
        assert_eq!(
            (img.origin, img.ptx.as_str(), img.cubin),
            (Origin::Prebuilt(pre.clone()), "// prebuilt", None)
        );
        // a PTX holding a NUL is no image
        std::fs::write(pre.join(format!("{stem}.ptx")), "// pre\0built").unwrap();
        let img = module_image_in("dropout", "sm_90", Some(&pre), &cache).unwrap();
        assert_eq!(img.origin, Origin::Cache(cache.clone()));
        // no prebuilt folder, or none with this module: the cache
        for p in [None, Some(tmp.join("nothing-here").as_path())] {
            let img = module_image_in("dropout", "sm_90", p, &cache).unwrap();
            assert_eq!(img.origin, Origin::Cache(cache.clone()));
            assert_eq!(img.ptx, "// cached");
        }
        // a cubin that is not whole machine code (here: not an ELF; below, a real one cut short) is passed
        // over, and so is a missing one: the PTX, no cubin
        let img = module_image_in("dropout", "sm_90", None, &cache).unwrap();
        assert_eq!((img.ptx.as_str(), img.cubin), ("// cached", None));
        assert!(!has_images(&cache, &stem));
        std::fs::remove_file(cache.join(format!("{stem}.cubin"))).unwrap();
        let img = module_image_in("dropout", "sm_90", None, &cache).unwrap();
        assert_eq!((img.ptx.as_str(), img.cubin), ("// cached", None));
        // neither: NVRTC, into the cache (the prebuilt folder is never written)
        if !nvrtc_present() || cuda_include_dir().is_none() {
            assert!(
                std::env::var("BERTQA_REQUIRE_NVRTC").as_deref() != Ok("1"),
                "BERTQA_REQUIRE_NVRTC=1 but NVRTC or the CUDA headers are missing"
            );
            println!("SKIPPED the compile: no NVRTC or no CUDA headers here");
        } else {
            let adamw = image_stem("adamw", &module_source("adamw").unwrap(), "sm_90");
            let img = module_image_in("adamw", "sm_90", Some(&pre), &cache).unwrap();
            assert!(
                matches!(img.origin, Origin::Compiled(_)),
                "{:?}",
                img.origin
            );
            assert!(img.ptx.contains(".entry adamw_step"));
            let cubin = img.cubin.expect("machine code for a real architecture");
            assert!(is_cuda_elf(&cubin));
            // cut short, it is no longer taken for machine code
            for cut in [cubin.len() - 1, 63, 0] {
                assert!(!is_cuda_elf(&cubin[..cut]), "{cut} bytes");
            }
            assert_eq!(
                std::fs::read(cache.join(format!("{adamw}.cubin"))).unwrap(),
                cubin
            );
            assert!(!pre.join(format!("{adamw}.ptx")).exists());
            let again = module_image_in("adamw", "sm_90", Some(&pre), &cache).unwrap();
            assert_eq!(again.origin, Origin::Cache(cache.clone()));
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }

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
