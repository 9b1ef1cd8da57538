//! `bertqa kernels`: compile the CUDA kernel modules ahead of time, into the cache or into a folder of
//! prebuilt images for another machine (`BERTQA_KERNELS`), and, on a GPU, load them the way a run does.

use crate::cuda::nvrtc;
use crate::util::print_line;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct KernelsArgs {
    /// GPU architecture to compile for, such as sm_90 (H100, H200) or sm_80 (A100); the modules that need
    /// Hopper's arch-specific instructions get sm_90a there, as at run time. Without it: the architecture of
    /// GPU 0, whose modules are then also loaded on it (what a run would load, and how long it takes)
    #[arg(long)]
    pub arch: Option<String>,
    /// write the images into this folder instead of the cache ($BERTQA_CACHE/ptx, else
    /// ~/.cache/bertqa/ptx): copy it to a GPU machine and give it there as BERTQA_KERNELS=FOLDER, which is
    /// read before the cache and never written, so that machine compiles nothing
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// only this module (kernels/NAME.cu; repeat for several); default: every module
    #[arg(long = "module", value_name = "NAME")]
    pub modules: Vec<String>,
    /// compile even the modules whose images are there already
    #[arg(long)]
    pub force: bool,
}

/// A GPU's real architecture as NVRTC names it: `sm_` and its compute capability (two or three digits).
fn check_arch(arch: &str) -> Result<()> {
    let digits = arch.strip_prefix("sm_").unwrap_or("");
    if !(2..=3).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        bail!(
            "--arch {arch:?}: give a GPU's architecture as sm_ and its compute capability, such as sm_90 (H100, \
             H200) or sm_80 (A100); the modules that need sm_90a get it from sm_90"
        );
    }
    Ok(())
}

fn size(bytes: usize) -> String {
    if bytes < 1_000_000 {
        format!("{:.0} kB", bytes as f64 / 1e3)
    } else {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }
}

pub fn run(a: &KernelsArgs) -> Result<()> {
    let names: Vec<&'static str> = nvrtc::MODULES.iter().map(|(n, _)| *n).collect();
    for m in &a.modules {
        if !names.contains(&m.as_str()) {
            bail!(
                "--module {m:?}: no such kernel module (kernels/*.cu: {})",
                names.join(", ")
            );
        }
    }
    let chosen: Vec<&'static str> = names
        .iter()
        .copied()
        .filter(|n| a.modules.is_empty() || a.modules.iter().any(|m| m == n))
        .collect();
    // the GPU at hand, when no architecture is given
    let (arch, gpu) = match &a.arch {
        Some(arch) => {
            check_arch(arch)?;
            (arch.clone(), None)
        }
        None => {
            if !crate::cuda::driver_present() {
                bail!(
                    "no CUDA driver here (libcuda.so could not be loaded): give --arch, such as --arch sm_90, \
                     to compile for a GPU elsewhere"
                );
            }
            let be = crate::cuda::Cuda::new(0, crate::kernel::KernelConfig::default()).context(
                "opening GPU 0 (give --arch, such as --arch sm_90, to compile without a GPU)",
            )?;
            (be.arch(), Some(be))
        }
    };
    if let Some(out) = &a.out {
        if out.exists() && !out.is_dir() {
            bail!("--out {}: not a folder", out.display());
        }
    }
    let dir = a.out.clone().unwrap_or_else(nvrtc::cache_dir);
    // what a run reads before the cache (with --out, only that folder counts)
    let prebuilt = match &a.out {
        Some(_) => None,
        None => std::env::var_os("BERTQA_KERNELS").map(PathBuf::from),
    };
    // the modules compiled side by side (NVRTC compiles separate programs concurrently), reported in order
    use rayon::prelude::*;
    enum Done {
        There(PathBuf),
        Compiled(nvrtc::Compiled, f64),
    }
    let done: Vec<Result<Done>> = chosen
        .par_iter()
        .map(|name| {
            let march = nvrtc::module_arch(name, &arch);
            let stem = nvrtc::image_stem(name, &nvrtc::module_source(name)?, &march);
            if !a.force {
                for d in prebuilt.iter().chain([&dir]) {
                    if nvrtc::has_images(d, &stem) {
                        return Ok(Done::There(d.clone()));
                    }
                }
            }
            let t = std::time::Instant::now();
            let c = nvrtc::compile(name, &march)?;
            let s = t.elapsed().as_secs_f64();
            nvrtc::write_images(&dir, &stem, &c)?;
            Ok(Done::Compiled(c, s))
        })
        .collect();
    let (mut compiled, mut there, mut secs) = (0, 0, 0.0);
    for (name, r) in chosen.iter().zip(done) {
        let march = nvrtc::module_arch(name, &arch);
        match r? {
            Done::There(d) => {
                there += 1;
                print_line(format_args!("{name} ({march}): already in {}", d.display()))?;
            }
            Done::Compiled(c, s) => {
                compiled += 1;
                secs += s;
                print_line(format_args!(
                    "{name} ({march}): compiled in {s:.1} s: PTX {}, machine code {}",
                    size(c.ptx.len()),
                    c.cubin.as_ref().map_or("none".into(), |b| size(b.len()))
                ))?;
            }
        }
    }
    print_line(format_args!(
        "{} module(s) for {arch}: {compiled} compiled into {} ({secs:.1} s of compiling), {there} already there",
        chosen.len(),
        dir.display()
    ))?;
    if let Some(be) = gpu {
        // from --out where given, else as a run finds them
        load_all(&be, &chosen, a.out.as_deref().or(prebuilt.as_deref()))?;
    }
    Ok(())
}

/// Load each module on the GPU as a run would (from `prebuilt`, then the cache) and say what was loaded.
fn load_all(
    be: &crate::cuda::Cuda,
    modules: &[&'static str],
    prebuilt: Option<&std::path::Path>,
) -> Result<()> {
    let mut total = 0.0;
    for name in modules {
        let (_, load) = be.load_module_from(name, prebuilt)?;
        total += load.secs;
        let from = match &load.origin {
            nvrtc::Origin::Prebuilt(d) => format!("prebuilt in {}", d.display()),
            nvrtc::Origin::Cache(d) => format!("from the cache {}", d.display()),
            nvrtc::Origin::Compiled(s) => format!("compiled now in {s:.1} s"),
        };
        let what = if load.machine_code {
            "machine code".to_string()
        } else if let Some(e) = &load.refused {
            format!("PTX (translated by the driver, which refused the machine code: {e})")
        } else {
            "PTX (translated by the driver)".to_string()
        };
        print_line(format_args!(
            "{name} on {}: loaded its {what}, {from}, in {:.0} ms",
            be.device_name,
            load.secs * 1e3
        ))?;
    }
    print_line(format_args!(
        "{} module(s) loaded on {} in {:.2} s",
        modules.len(),
        be.device_name,
        total
    ))?;
    Ok(())
}
