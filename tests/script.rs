//! scripts/train_squad.sh, the README's first command, run as a new user would: from a fresh `git clone` of
//! this repository (the committed state; CI's checkout is one), with the real SQuAD v1.1 files and
//! all-MiniLM-L6-v2 from the shared assets, on a tiny subset. The clone builds into a target directory of its
//! own inside this build's (`target/script-clone`: the clone's crate has the same name and version as this
//! one, and cargo would otherwise mix their artifacts), kept between runs so that later runs rebuild only the
//! bertqa crate. And scripts/sass_count.py's common-path count, on a synthetic SASS listing.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn assets() -> Option<PathBuf> {
    bertqa::util::assets_or_skip()
}

/// A fresh clone of this repository in a temporary folder (None, with a printed reason, without git).
fn fresh_clone(tag: &str) -> Option<(PathBuf, PathBuf)> {
    let tmp = std::env::temp_dir().join(format!("bertqa-script-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let dst = tmp.join("bertqa");
    let out = match Command::new("git")
        .args(["clone", "--quiet"])
        .arg(root())
        .arg(&dst)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            println!("SKIPPED: git is not available ({e})");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "git clone failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some((tmp, dst))
}

/// The script with a clean environment for the GPU/header decisions.
fn script(clone: &Path, assets: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("bash");
    c.arg(clone.join("scripts/train_squad.sh"))
        .args(args)
        .current_dir(clone)
        .env("BERTQA_ASSETS", assets)
        .env("CARGO_TARGET_DIR", root().join("target/script-clone"))
        .env_remove("BERTQA_MODEL")
        .env_remove("SQUAD_DIR")
        .env_remove("BERTQA_CUDA_INCLUDE")
        .env_remove("BERTQA_CUDA_PIP")
        .env_remove("CUDA_HOME")
        .env_remove("CUDA_PATH");
    c
}

#[test]
fn train_squad_sh_works_from_a_fresh_clone_on_a_tiny_subset() {
    let Some(assets) = assets() else {
        return;
    };
    let Some((tmp, clone)) = fresh_clone("run") else {
        return;
    };
    // the README's quick command, made tiny; runs/ does not exist in a fresh clone
    assert!(!clone.join("runs").exists());
    let out = script(
        &clone,
        &assets,
        &[
            "",
            "runs/quick",
            "--max-train-examples",
            "24",
            "--max-seq-length",
            "128",
            "--doc-stride",
            "48",
            "--batch-size",
            "8",
            "--max-steps",
            "2",
            "--max-eval-examples",
            "12",
            "--no-progress",
        ],
    )
    .env("BERTQA_ASSUME_GPU", "0")
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "scripts/train_squad.sh failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    // the last stdout line is the dev metrics JSON, also saved beside the run with its logs
    let last = stdout.lines().last().unwrap_or_default();
    let m: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last stdout line is not JSON ({e}): {last:?}"));
    for k in ["exact_match", "f1"] {
        let v = m[k].as_f64().unwrap_or_else(|| panic!("no {k} in {m}"));
        assert!((0.0..=100.0).contains(&v), "{k} = {v}");
    }
    let runs = clone.join("runs");
    let saved = std::fs::read_to_string(runs.join("quick.metrics.json")).unwrap();
    assert_eq!(saved.trim(), last.trim());
    assert!(runs.join("quick.train.log").exists());
    let log = std::fs::read_to_string(runs.join("quick.stderr.log")).unwrap();
    assert!(log.contains("training windows"), "stderr log: {log}");
    assert!(runs.join("quick/best/model.safetensors").exists());
    assert!(runs.join("quick/metrics.jsonl").exists());
    let _ = std::fs::remove_dir_all(tmp);
}

/// The recipe and header decisions, through the script's dry run (prints the command instead of running it).
#[test]
fn train_squad_sh_picks_the_recipe_and_the_cuda_headers() {
    let Some(assets) = assets() else {
        return;
    };
    let Some((tmp, clone)) = fresh_clone("dry") else {
        return;
    };
    let home = tmp.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let dry = |args: &[&str], gpu: &str, include: Option<&Path>| {
        let mut c = script(&clone, &assets, args);
        c.env("BERTQA_TRAIN_DRY_RUN", "1")
            .env("BERTQA_ASSUME_GPU", gpu)
            .env("HOME", &home);
        if let Some(i) = include {
            c.env("BERTQA_CUDA_INCLUDE", i);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    // no GPU, no size flag: the CPU-sized recipe, said on stderr
    let (cmd, err) = dry(&[], "0", None);
    assert!(cmd.contains("--max-train-examples 2000"), "{cmd}");
    assert!(cmd.contains("--max-seq-length 256"), "{cmd}");
    assert!(
        err.contains("CPU-sized recipe") && err.contains("--full"),
        "{err}"
    );
    // --full: the standard recipe, and --full itself is not passed on
    let (cmd, _) = dry(&["", "runs/x", "--full"], "0", None);
    assert!(!cmd.contains("--max-train-examples"), "{cmd}");
    assert!(
        cmd.contains("--max-seq-length 384") && !cmd.contains("--full"),
        "{cmd}"
    );
    // a size flag of the user's: the standard recipe with it, last (a repeated flag takes its last value)
    let (cmd, _) = dry(&["", "runs/x", "--max-steps", "5"], "0", None);
    assert!(
        !cmd.contains("--max-train-examples 2000") && cmd.ends_with("--max-steps 5\n"),
        "{cmd}"
    );
    // a GPU: the standard recipe; headers from BERTQA_CUDA_INCLUDE when they are there
    let inc = tmp.join("include");
    std::fs::create_dir_all(&inc).unwrap();
    std::fs::write(inc.join("cuda_bf16.h"), "// test\n").unwrap();
    let (cmd, _) = dry(&[], "1", Some(&inc));
    assert!(!cmd.contains("--max-train-examples"), "{cmd}");
    assert!(
        cmd.contains(&format!("headers: {}", inc.display())),
        "{cmd}"
    );
    // a GPU without toolkit headers (a driver-only machine): the pip wheels, into ~/.cache/bertqa/cuda-pip
    if !Path::new("/usr/local/cuda/include/cuda_bf16.h").exists() {
        let (cmd, err) = dry(&[], "1", None);
        let pip = home.join(".cache/bertqa/cuda-pip");
        assert!(
            cmd.contains(&format!("headers: {}/nvidia/cu13/include", pip.display())),
            "{cmd}"
        );
        assert!(err.contains("would install the CUDA pip wheels"), "{err}");
    }
    // paths given relative to where the script is called from are resolved there (not in the repository),
    // and a MODEL_DIR that holds no model is an error, not a silent switch to all-MiniLM-L6-v2
    let caller = tmp.join("caller");
    std::fs::create_dir_all(caller.join("mymodel")).unwrap();
    std::fs::write(caller.join("mymodel/config.json"), "{}").unwrap();
    let from_caller = |args: &[&str]| {
        let mut c = script(&clone, &assets, args);
        c.current_dir(&caller)
            .env("BERTQA_TRAIN_DRY_RUN", "1")
            .env("BERTQA_ASSUME_GPU", "0")
            .env("HOME", &home);
        c.output().unwrap()
    };
    let o = from_caller(&["mymodel", "out", "--max-steps", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cmd = String::from_utf8_lossy(&o.stdout);
    assert!(
        cmd.contains(&format!("--model {}/mymodel ", caller.display()))
            && cmd.contains(&format!("--output-dir {}/out ", caller.display())),
        "{cmd}"
    );
    let o = from_caller(&["mymodell", "out", "--max-steps", "1"]);
    assert_eq!(o.status.code(), Some(2), "a typo'd MODEL_DIR ran");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("mymodell holds no config.json"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = std::fs::remove_dir_all(tmp);
}

/// scripts/sass_count.py's common path (the instruction count the perf log compares kernels by) on a
/// synthetic SASS listing whose answer is counted by hand: a loop that stages its next tile (or, on the last
/// one, only commits), skips a masking block that only partial tiles run, runs an inner loop once, passes a
/// `BRA.DIV` to an out-of-line handler, and reduces. The steady-state tile is 15 + PAD instructions: the
/// staging branch taken for its copies, the masking skipped, the inner loop once, the divergence branch
/// falling through.
#[test]
fn sass_count_common_path_counts_the_steady_state_tile() {
    const PAD: usize = 90;
    let mut lines = vec![
        "MOV R1, RZ".to_string(),
        "ISETP.GE.AND P0, PT, R1, R2, PT".into(), // 0x10: the loop
        "@P0 BRA 0x60".into(),                    // the last tile: no staging
        "LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64]".into(),
        "LDGSTS.E.BYPASS.128 [R3+0x800], desc[UR4][R6.64]".into(),
        "BRA 0x70".into(),
        "LDGDEPBAR".into(),     // 0x60
        "@!P1 BRA 0xc0".into(), // 0x70: full tiles skip the masking
        "FSEL R8, R8, -INF, P2".into(),
        "FSEL R9, R9, -INF, P2".into(),
        "FSEL R10, R10, -INF, P2".into(),
        "FSEL R11, R11, -INF, P2".into(),
        "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT".into(), // 0xc0
        "MUFU.EX2 R12, R12".into(),
    ];
    lines.extend((0..PAD).map(|i| format!("FFMA R{}, R12, R13, R14", 40 + i % 50)));
    let inner = lines.len() * 16;
    lines.extend([
        "IADD3 R13, R13, 0x1, RZ".to_string(), // the inner loop
        "ISETP.LT.AND P3, PT, R13, 0x4, PT".into(),
        format!("@P3 BRA {inner:#x}"),
        "BRA.DIV UR4, 0x4000".into(),
        "REDG.E.ADD.F32x2.FTZ.RN.STRONG.GPU desc[UR4][R14.64], R16".into(),
        "IADD3 R1, R1, 0x1, RZ".into(),
        "@P4 BRA 0x10".into(), // the loop's back edge
        "EXIT".into(),
    ]);
    let mut sass = String::from("\tcode for sm_90a\n\t\tFunction : synthetic_kernel\n");
    for (k, l) in lines.iter().enumerate() {
        sass.push_str(&format!(
            "        /*{:04x}*/                   {l} ;\n",
            k * 16
        ));
    }
    let mut child = match Command::new("python3")
        .arg(root().join("scripts/sass_count.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            println!("SKIPPED: python3 is not available ({e})");
            return;
        }
    };
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sass.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "sass_count.py failed:\n{text}");
    let expect = format!("common path: {} instructions", 15 + PAD);
    assert!(text.contains(&expect), "expected '{expect}' in:\n{text}");
}

/// The PyTorch side of the comparison (scripts/hf_squad.py) trains on bertqa's windows in bertqa's order:
/// its own implementations of `epoch_order` and the windows digest give the known answers pinned on the
/// Rust side (src/train/mod.rs `epoch_order_known_answer`, `windows_digest_known_answer`). Run here, without
/// PyTorch, so that a drift shows up in `cargo test` rather than as a mismatch in a GPU run.
#[test]
fn hf_squad_py_draws_bertqas_epoch_order_and_windows_digest() {
    let has_numpy = Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .map(|o| o.status.success());
    match has_numpy {
        Ok(true) => {}
        Ok(false) => {
            println!("SKIPPED: python3 has no numpy (scripts/hf_squad.py needs it)");
            return;
        }
        Err(e) => {
            println!("SKIPPED: python3 is not available ({e})");
            return;
        }
    }
    let o = Command::new("python3")
        .arg(root().join("scripts/hf_squad.py"))
        .arg("--self-test")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "hf_squad.py --self-test failed:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(out.trim(), r#"{"mode": "self-test", "ok": true}"#);
}

/// scripts/unpack_gpu.sh, as the device runs it on what scripts/package_gpu.sh packs: every `FILE.xz` in
/// bin/, data/ and the model folder becomes FILE with the original bytes (the .xz gone, the executables
/// executable, a second call a no-op), once with the xz tool and once with only Python's lzma module on the
/// PATH (a device image may lack xz); and a damaged file fails the script, naming the file.
#[test]
fn unpack_gpu_sh_restores_what_package_gpu_sh_packs() {
    for tool in ["xz", "python3"] {
        if Command::new(tool).arg("--version").output().is_err() {
            println!("SKIPPED: {tool} is not available");
            return;
        }
    }
    let tmp = std::env::temp_dir().join(format!("bertqa-unpack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    // a PATH without xz: links to the few tools the script needs besides it
    let no_xz = tmp.join("path-without-xz");
    std::fs::create_dir_all(&no_xz).unwrap();
    for t in ["bash", "python3", "chmod", "dirname"] {
        // python3's own executable, not a shim (pyenv's needs more of the PATH)
        let which = match t {
            "python3" => Command::new("python3")
                .args(["-c", "import sys; print(sys.executable)"])
                .output(),
            _ => Command::new("bash")
                .args(["-c", &format!("command -v {t}")])
                .output(),
        }
        .unwrap();
        let p = String::from_utf8_lossy(&which.stdout).trim().to_string();
        assert!(!p.is_empty(), "no {t} on the PATH");
        std::os::unix::fs::symlink(p, no_xz.join(t)).unwrap();
    }
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("bin/bertqa", b"\x7fELF pretend executable".to_vec()),
        (
            "data/train-v1.1.json",
            br#"{"data": [], "version": "1.1"}"#.repeat(1000),
        ),
        (
            "minilm-f16/model.safetensors",
            (0..200_000u32).map(|i| (i * 7919 % 251) as u8).collect(),
        ),
    ];
    for (label, path) in [("xz", None), ("python", Some(&no_xz))] {
        let dir = tmp.join(format!("gpu-{label}"));
        for (name, bytes) in &files {
            let p = dir.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, bytes).unwrap();
            let st = Command::new("xz")
                .args(["-0", "-q"])
                .arg(&p)
                .status()
                .unwrap();
            assert!(st.success());
            assert!(!p.exists() && xz_of(&p).exists());
        }
        // a file that stays as it is
        std::fs::write(dir.join("minilm-f16/config.json"), "{}").unwrap();
        for round in 0..2 {
            let mut c = Command::new("bash");
            c.arg(root().join("scripts/unpack_gpu.sh")).arg(&dir);
            if let Some(p) = path {
                c.env("PATH", p);
            }
            let out = c.output().unwrap();
            assert!(
                out.status.success(),
                "{label}, call {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            for (name, bytes) in &files {
                let p = dir.join(name);
                assert_eq!(&std::fs::read(&p).unwrap(), bytes, "{label}: {name}");
                assert!(!xz_of(&p).exists(), "{label}: {name}.xz left");
            }
            assert_eq!(
                std::fs::read_to_string(dir.join("minilm-f16/config.json")).unwrap(),
                "{}"
            );
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("bin/bertqa"))
                .unwrap()
                .permissions()
                .mode();
            assert!(mode & 0o111 != 0, "{label}: bin/bertqa is not executable");
        }
        // a damaged archive: an error naming it, not a half-written file passed on
        std::fs::write(dir.join("data/dev-v1.1.json.xz"), b"not xz at all").unwrap();
        let mut c = Command::new("bash");
        c.arg(root().join("scripts/unpack_gpu.sh")).arg(&dir);
        if let Some(p) = path {
            c.env("PATH", p);
        }
        let out = c.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{label}: a damaged .xz passed");
        assert!(stderr.contains("dev-v1.1.json.xz"), "{label}: {stderr}");
        assert!(
            !dir.join("data/dev-v1.1.json").exists(),
            "{label}: a partial output was left"
        );
    }
    let _ = std::fs::remove_dir_all(tmp);
}

/// `p` with ".xz" appended.
fn xz_of(p: &Path) -> PathBuf {
    PathBuf::from(format!("{}.xz", p.display()))
}
