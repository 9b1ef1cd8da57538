// build.rs — no CUDA toolchain is needed to build bertqa: kernels are compiled at run time with NVRTC
// (src/cuda/nvrtc.rs). This only makes cargo rebuild when a kernel source changes (they are include_str!'d).
fn main() {
    println!("cargo:rerun-if-changed=kernels");
    if let Ok(entries) = std::fs::read_dir("kernels") {
        for e in entries.flatten() {
            println!("cargo:rerun-if-changed={}", e.path().display());
        }
    }
}
