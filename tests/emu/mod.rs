//! Client of the kernel emulator (tests/emu/cuda_emu.hpp, driver.cpp): builds one emulator per kernel module
//! with the host C++ compiler and runs launch descriptions (src/kernel.rs `Launch`) through it on host buffers.
//!
//! Buffers are named in parameter structs by fake addresses: buffer i at byte offset o is
//! `0xB << 60 | i << 36 | o`; the driver replaces every such 8-byte word of a parameter struct, or of a buffer
//! flagged as a table of addresses ([`Emus::run_tables`]), by the real address.

#![allow(dead_code)]

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use bertqa::kernel::Launch;

/// The fake device address of byte 0 of buffer `i` (see the module doc).
pub fn addr(i: usize) -> u64 {
    (0xBu64 << 60) | ((i as u64) << 36)
}

/// A compiled emulator for one kernel module.
pub struct Emu {
    exe: PathBuf,
    pub module: String,
}

static BUILD: Mutex<()> = Mutex::new(());

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

/// `cxx` on tests/emu/driver.cpp with kernels/`module`.cu, BERTQA_EMU defined (add -E or -o).
fn cxx_command(cxx: &str, module: &str) -> Command {
    let mut c = Command::new(cxx);
    c.args(["-std=c++17", "-DBERTQA_EMU"])
        .arg(format!("-DEMU_MODULE=\"{module}.cu\""))
        .arg("-I")
        .arg(root().join("tests/emu"))
        .arg("-I")
        .arg(root().join("kernels"))
        .arg(root().join("tests/emu/driver.cpp"));
    c
}

/// The `extern "C"` kernels of a preprocessed module: `extern "C" void NAME(` (`__global__` and
/// `__launch_bounds__` expand to nothing under BERTQA_EMU).
fn entry_points(pre: &str) -> Vec<String> {
    let mut names = vec![];
    for (i, _) in pre.match_indices("extern \"C\"") {
        let rest = pre[i + 10..].trim_start();
        let Some(rest) = rest.strip_prefix("void") else {
            continue;
        };
        let rest = rest.trim_start();
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && rest[name.len()..].trim_start().starts_with('(') {
            names.push(name);
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Build (or reuse) the emulator of kernels/`module`.cu with every kernel of the module registered.
/// `Ok(None)` (and a printed reason) when there is no C++ compiler here, unless BERTQA_REQUIRE_EMU=1 (CI),
/// which makes that an error.
pub fn build(module: &str) -> Result<Option<Emu>, String> {
    let cxx = compiler();
    let have = Command::new(&cxx)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        let why = format!("no C++ compiler ({cxx}) for the kernel emulator");
        if std::env::var("BERTQA_REQUIRE_EMU").as_deref() == Ok("1") {
            return Err(format!("{why}, and BERTQA_REQUIRE_EMU=1"));
        }
        println!("SKIPPED: {why}");
        return Ok(None);
    }
    let sources = [
        "tests/emu/cuda_emu.hpp",
        "tests/emu/driver.cpp",
        "kernels/common.cuh",
        &format!("kernels/{module}.cu"),
    ];
    // extra compiler flags, e.g. BERTQA_EMU_CXXFLAGS="-fsanitize=address" to bounds-check global memory too
    let extra: Vec<String> = std::env::var("BERTQA_EMU_CXXFLAGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    extra.hash(&mut h);
    for s in sources {
        let text = std::fs::read(root().join(s)).map_err(|e| format!("{s}: {e}"))?;
        text.hash(&mut h);
    }
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("emu-{module}-{:016x}", h.finish()));
    let exe = dir.join("driver");
    let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if !exe.exists() {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // the registry: every extern "C" kernel the preprocessed module defines
        let pre = cxx_command(&cxx, module)
            .args(["-E", "-P", "-DEMU_REGISTRY=\"/dev/null\""])
            .output()
            .map_err(|e| format!("{cxx}: {e}"))?;
        if !pre.status.success() {
            return Err(format!(
                "preprocessing kernels/{module}.cu failed:\n{}",
                String::from_utf8_lossy(&pre.stderr)
            ));
        }
        let names = entry_points(&String::from_utf8_lossy(&pre.stdout));
        if names.is_empty() {
            return Err(format!(
                "kernels/{module}.cu: no extern \"C\" kernels found"
            ));
        }
        let registry = dir.join("registry.inc");
        let lines: String = names.iter().map(|n| format!("EMU_KERNEL({n})\n")).collect();
        std::fs::write(&registry, lines).map_err(|e| format!("{}: {e}", registry.display()))?;
        let tmp = dir.join(format!("driver.tmp.{}", std::process::id())); // renamed into place: atomic
        let out = cxx_command(&cxx, module)
            .args(["-O1", "-g", "-Wall", "-Wno-unknown-pragmas"])
            .arg(format!("-DEMU_REGISTRY=\"{}\"", registry.display()))
            .args(&extra)
            .arg("-o")
            .arg(&tmp)
            .output()
            .map_err(|e| format!("{cxx}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "building the emulator of kernels/{module}.cu failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        std::fs::rename(&tmp, &exe).map_err(|e| format!("{}: {e}", exe.display()))?;
    }
    Ok(Some(Emu {
        exe,
        module: module.into(),
    }))
}

/// Emulators for several modules, built on first use: runs a launch list that spans modules by handing the
/// buffers from one module's run to the next.
#[derive(Default)]
pub struct Emus {
    built: Vec<Emu>,
}

impl Emus {
    /// `Ok(None)`: no C++ compiler here (printed).
    pub fn run<P: bytemuck::Pod>(
        &mut self,
        bufs: &[Vec<u8>],
        launches: &[Launch<P>],
        mode: Mode,
    ) -> Result<Option<Vec<Vec<u8>>>, String> {
        self.run_tables(bufs, &[], launches, mode)
    }

    /// As [`Emus::run`], with the buffers numbered in `tables` holding device addresses (fake ones, by
    /// [`addr`]) that the driver turns into real ones, as it does in parameter structs.
    pub fn run_tables<P: bytemuck::Pod>(
        &mut self,
        bufs: &[Vec<u8>],
        tables: &[usize],
        launches: &[Launch<P>],
        mode: Mode,
    ) -> Result<Option<Vec<Vec<u8>>>, String> {
        let mut bufs = bufs.to_vec();
        let mut i = 0;
        while i < launches.len() {
            let module = launches[i].module;
            let n = launches[i..]
                .iter()
                .take_while(|l| l.module == module)
                .count();
            if !self.built.iter().any(|e| e.module == module) {
                match build(module)? {
                    Some(e) => self.built.push(e),
                    None => return Ok(None),
                }
            }
            let emu = self
                .built
                .iter()
                .find(|e| e.module == module)
                .expect("built above");
            bufs = emu.run(&bufs, tables, &launches[i..i + n], mode)?;
            i += n;
        }
        Ok(Some(bufs))
    }
}

/// How the emulator interleaves a block's threads and lands cp.async copies (cuda_emu.hpp, driver.cpp).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mode {
    /// "warp" (one warp as far as it goes, lowest first), "rwarp" (highest first), "rr" (lockstep)
    pub sched: &'static str,
    /// cp.async copies land at issue instead of when the thread waits for them
    pub eager_cp: bool,
}

impl Mode {
    pub const DEFAULT: Mode = Mode {
        sched: "warp",
        eager_cp: false,
    };
    /// The other extremes: warps in reverse order with copies landing at once, and lockstep warps.
    pub const STRESS: [Mode; 2] = [
        Mode {
            sched: "rwarp",
            eager_cp: true,
        },
        Mode {
            sched: "rr",
            eager_cp: false,
        },
    ];
}

impl Emu {
    /// Run `launches` in order on `bufs` (initial contents; those numbered in `tables` hold device
    /// addresses); returns every buffer afterwards.
    pub fn run<P: bytemuck::Pod>(
        &self,
        bufs: &[Vec<u8>],
        tables: &[usize],
        launches: &[Launch<P>],
        mode: Mode,
    ) -> Result<Vec<Vec<u8>>, String> {
        let mut s: Vec<u8> = b"BQEMU2\0\0".to_vec();
        s.extend((bufs.len() as u32).to_le_bytes());
        for (i, b) in bufs.iter().enumerate() {
            s.extend((b.len() as u64).to_le_bytes());
            s.extend((tables.contains(&i) as u32).to_le_bytes());
            s.extend(b);
        }
        s.extend((launches.len() as u32).to_le_bytes());
        for l in launches {
            if l.module != self.module {
                return Err(format!(
                    "{} is in module {}, this emulator runs {}",
                    l.name, l.module, self.module
                ));
            }
            s.extend((l.name.len() as u32).to_le_bytes());
            s.extend(l.name.as_bytes());
            for d in [
                l.grid.0, l.grid.1, l.grid.2, l.block.0, l.block.1, l.block.2, l.smem,
            ] {
                s.extend(d.to_le_bytes());
            }
            let p = bytemuck::bytes_of(&l.params);
            s.extend((p.len() as u32).to_le_bytes());
            s.extend(p);
        }
        let dir = self.exe.parent().expect("driver has a folder");
        // unique per process, thread and call: concurrent tests (and test runs) never share a file
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{}-{call}", std::process::id());
        let (script, out) = (
            dir.join(format!("s-{tag}.bin")),
            dir.join(format!("o-{tag}.bin")),
        );
        std::fs::write(&script, &s).map_err(|e| format!("{}: {e}", script.display()))?;
        // BERTQA_EMU_MODE=sched[-eager] overrides every test's mode (e.g. rwarp-eager, rr): the whole suite
        // under another interleaving
        let mode = match std::env::var("BERTQA_EMU_MODE") {
            Ok(m) => {
                let (sched, eager_cp) = match m.strip_suffix("-eager") {
                    Some(s) => (s, true),
                    None => (m.as_str(), false),
                };
                Mode {
                    sched: match sched {
                        "warp" => "warp",
                        "rwarp" => "rwarp",
                        "rr" => "rr",
                        _ => {
                            return Err(format!(
                                "BERTQA_EMU_MODE={m:?}: not warp, rwarp or rr (each optionally with -eager)"
                            ))
                        }
                    },
                    eager_cp,
                }
            }
            Err(_) => mode,
        };
        let res = Command::new(&self.exe)
            .arg(&script)
            .arg(&out)
            .env("EMU_CP_ASYNC", if mode.eager_cp { "eager" } else { "wait" })
            .env("EMU_SCHED", mode.sched)
            .output()
            .map_err(|e| format!("{}: {e}", self.exe.display()))?;
        let _ = std::fs::remove_file(&script);
        if !res.status.success() {
            let names: Vec<&str> = launches.iter().map(|l| l.name.as_str()).collect();
            return Err(format!(
                "emulator ({}, {mode:?}) failed running {names:?}: {}{}",
                res.status,
                String::from_utf8_lossy(&res.stderr),
                String::from_utf8_lossy(&res.stdout)
            ));
        }
        let data = std::fs::read(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        let _ = std::fs::remove_file(&out);
        let mut got = vec![];
        let mut at = 0usize;
        for b in bufs {
            let n = u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes")) as usize;
            if n != b.len() {
                return Err(format!(
                    "emulator returned a buffer of {n} bytes for one of {}",
                    b.len()
                ));
            }
            got.push(data[at + 8..at + 8 + n].to_vec());
            at += 8 + n;
        }
        Ok(got)
    }
}
