//! Every kernels/*.cu compiles with NVRTC for sm_80 and sm_90 with no error and no warning, and has every
//! entry point the variant switches (BERTQA_ATTN, BERTQA_VEC) can make its launchers name.
//! Needs libnvrtc and the CUDA headers (CI installs the pip wheels nvidia-cuda-nvrtc/-runtime 13.0); without
//! them it skips with a reason, unless BERTQA_REQUIRE_NVRTC=1 (set by .ci/run), where it fails.

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
        for arch in ["sm_80", "sm_90"] {
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
                    for (_, entry) in bertqa::ops::variant_entry_points()
                        .iter()
                        .filter(|(m, _)| m == name)
                    {
                        if !c.ptx.contains(&format!(".entry {entry}(")) {
                            failures.push(format!("{name} {arch}: no entry point {entry}"));
                        }
                    }
                }
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "kernel compilation problems:\n{}",
        failures.join("\n\n")
    );
}
