//! Prints the PTX NVRTC makes of one kernels/*.cu module, for reading SASS without a GPU
//! (scripts/sass_count.sh: ptxas + cuobjdump from the pip wheels, instruction counts per kernel and loop).
//!
//! `cargo run --release --example ptx -- attention_tc sm_90 > attention_tc.ptx`

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(module), Some(arch)) = (args.get(1), args.get(2)) else {
        anyhow::bail!("usage: ptx MODULE ARCH (e.g. attention_tc sm_90)");
    };
    let c = bertqa::cuda::nvrtc::compile(module, arch)?;
    if !c.log.is_empty() {
        eprintln!("{}", c.log);
    }
    print!("{}", c.ptx);
    Ok(())
}
