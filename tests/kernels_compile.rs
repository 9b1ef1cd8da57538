//! Every kernels/*.cu compiles with NVRTC for sm_80 and sm_90 (the wgmma modules also for sm_90a) with no
//! error and no warning, into PTX and machine code (the cubin a process loads), both with every
//! entry point a kernel configuration (attention variant, vec kernels) can make its launchers name.
//! Needs libnvrtc and the CUDA headers (CI installs the pip wheels nvidia-cuda-nvrtc/-runtime 13.0); without
//! them it skips with a reason, unless BERTQA_REQUIRE_NVRTC=1 (set by .ci/run), where it fails.
//!
//! And, everywhere: every kernel parameter struct's size and field offsets as pinned in the .cu files
//! (CHECK_LAYOUT / CHECK_FIELD, enforced there by NVRTC and the emulator's compiler) equal the Rust mirror's
//! (`std::mem::offset_of!`), field for field.

/// (file, struct, size, [(field, offset)]) as the CHECK_LAYOUT / CHECK_FIELD lines of a .cu pin them.
type Pinned = (String, String, usize, Vec<(String, usize)>);

/// The CHECK_LAYOUT / CHECK_FIELD lines of every .cu and .cuh.
fn pinned() -> Vec<Pinned> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|s| s.to_str()), Some("cu" | "cuh")))
        .collect();
    files.sort();
    for p in files {
        let text = std::fs::read_to_string(&p).unwrap();
        let file = p.file_name().unwrap().to_string_lossy().to_string();
        for line in text.lines() {
            let args = |pre: &str| -> Option<Vec<String>> {
                let rest = line.trim().strip_prefix(pre)?.strip_suffix(");")?;
                Some(rest.split(',').map(|x| x.trim().to_string()).collect())
            };
            if let Some(a) = args("CHECK_LAYOUT(") {
                out.push((file.clone(), a[0].clone(), a[1].parse().unwrap(), vec![]));
            } else if let Some(a) = args("CHECK_FIELD(") {
                let last = out.last_mut().expect("CHECK_FIELD before CHECK_LAYOUT");
                assert_eq!(
                    last.1, a[0],
                    "{file}: CHECK_FIELD of {} after {}",
                    a[0], last.1
                );
                last.3.push((a[1].clone(), a[2].parse().unwrap()));
            }
        }
    }
    out
}

#[test]
fn kernel_parameter_structs_match_their_rust_mirrors() {
    let rust = bertqa::ops::param_layouts();
    let cu = pinned();
    let mut problems = Vec::new();
    for l in &rust {
        let expect: Vec<String> = std::iter::once(format!("CHECK_LAYOUT({}, {});", l.name, l.size))
            .chain(
                l.fields
                    .iter()
                    .map(|(f, o)| format!("CHECK_FIELD({}, {f}, {o});", l.name)),
            )
            .collect();
        let found: Vec<_> = cu.iter().filter(|c| c.1 == l.name).collect();
        if found.is_empty() {
            problems.push(format!(
                "{}: no CHECK lines in kernels/*.cu; expected\n{}",
                l.name,
                expect.join("\n")
            ));
        }
        for (file, _, size, fields) in found {
            let same = *size == l.size
                && fields.len() == l.fields.len()
                && fields
                    .iter()
                    .zip(&l.fields)
                    .all(|((f, o), (rf, ro))| f == rf && o == ro);
            if !same {
                problems.push(format!(
                    "kernels/{file}: {} differs from its Rust mirror; the lines should read\n{}",
                    l.name,
                    expect.join("\n")
                ));
            }
        }
    }
    for c in &cu {
        if !rust.iter().any(|l| l.name == c.1) {
            problems.push(format!(
                "kernels/{}: {} has no Rust mirror in ops::param_layouts()",
                c.0, c.1
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

use bertqa::cuda::nvrtc;

#[test]
fn every_kernel_compiles_without_warnings() {
    let required = std::env::var("BERTQA_REQUIRE_NVRTC")
        .map(|v| v == "1")
        .unwrap_or(false);
    if !nvrtc::nvrtc_present() || nvrtc::cuda_include_dir().is_none() {
        let why = if !nvrtc::nvrtc_present() {
            "libnvrtc not loadable"
        } else {
            "CUDA headers (cuda_bf16.h) not found"
        };
        assert!(!required, "BERTQA_REQUIRE_NVRTC=1 but {why}");
        println!("SKIPPED: {why}; set LD_LIBRARY_PATH/BERTQA_CUDA_PIP (see .ci/run)");
        return;
    }
    // every .cu in kernels/ must be registered in nvrtc::MODULES
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|s| s.to_str()) == Some("cu") {
            let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
            assert!(
                nvrtc::MODULES.iter().any(|(n, _)| *n == stem),
                "kernels/{stem}.cu is not listed in nvrtc::MODULES"
            );
        }
    }
    let mut failures = Vec::new();
    for (name, _) in nvrtc::MODULES {
        // what the backend compiles on an sm_80 and an sm_90 device (the arch-specific modules for sm_90a
        // there), and the arch-specific modules also for plain sm_90 (their kernels then trap)
        let mut archs = vec!["sm_80".to_string(), nvrtc::module_arch(name, "sm_90")];
        if nvrtc::ARCH_SPECIFIC.contains(name) {
            archs.push("sm_90".into());
        }
        for arch in &archs {
            let arch = arch.as_str();
            match nvrtc::compile(name, arch) {
                Ok(c) => {
                    let warn = c.log.lines().any(|l| l.contains("warning"));
                    println!(
                        "kernels/{name}.cu {arch}: {} bytes of PTX{}",
                        c.ptx.len(),
                        if warn { " WITH WARNINGS" } else { "" }
                    );
                    if warn {
                        failures.push(format!("{name} {arch} warnings:\n{}", c.log));
                    }
                    assert!(c.ptx.contains(".entry"), "{name}: no kernel entry in PTX");
                    if nvrtc::ARCH_SPECIFIC.contains(name) {
                        // the wgmma path where the target has it, the trapping stubs elsewhere
                        let wgmma = c.ptx.contains("wgmma.mma_async");
                        if wgmma != (arch == "sm_90a") {
                            failures.push(format!(
                                "{name} {arch}: wgmma.mma_async in the PTX: {wgmma}"
                            ));
                        }
                    }
                    // the machine code a process loads (nvrtc::module_image): whole by the check a
                    // process makes before handing it to the driver (and not once cut short), naming the
                    // entry points
                    let cubin = c.cubin.as_deref().unwrap_or_default();
                    if !nvrtc::is_cuda_elf(cubin) {
                        failures.push(format!("{name} {arch}: no whole CUDA ELF machine code"));
                    } else if nvrtc::is_cuda_elf(&cubin[..cubin.len() - 1]) {
                        failures.push(format!("{name} {arch}: cut short, still taken as whole"));
                    }
                    let in_cubin = |e: &str| {
                        cubin
                            .windows(e.len() + 1)
                            .any(|w| w[..e.len()] == *e.as_bytes() && w[e.len()] == 0)
                    };
                    for (_, entry) in bertqa::ops::variant_entry_points()
                        .iter()
                        .filter(|(m, _)| m == name)
                    {
                        if !c.ptx.contains(&format!(".entry {entry}(")) {
                            failures.push(format!("{name} {arch}: no entry point {entry}"));
                        }
                        if !in_cubin(entry) {
                            failures.push(format!("{name} {arch}: no {entry} in the machine code"));
                        }
                    }
                }
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
    }
    // a virtual architecture gives PTX only
    match nvrtc::compile("dropout", "compute_90") {
        Ok(c) if c.cubin.is_none() && c.ptx.contains(".entry") => {}
        Ok(c) => failures.push(format!(
            "dropout compute_90: {} bytes of machine code",
            c.cubin.map_or(0, |b| b.len())
        )),
        Err(e) => failures.push(format!("{e:#}")),
    }
    assert!(
        failures.is_empty(),
        "kernel compilation problems:\n{}",
        failures.join("\n\n")
    );
}
