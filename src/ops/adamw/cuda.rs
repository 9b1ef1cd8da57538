//! The CUDA launcher of AdamW and of the squared gradient norm (kernels/adamw.cu): one launch each over the
//! flat buffers.

use super::{
    check, check_stats, f32_only, sq_norm_launch, step_launch, AdamWHyper, AdamWOps, AdamWParams,
};
use crate::cuda::Cuda;
use crate::kernel::dtype_code;
use crate::tensor::Tensor;
use anyhow::Result;

impl AdamWOps for Cuda {
    fn adamw_step(
        &self,
        master: &mut Tensor<Cuda>,
        working: Option<&mut Tensor<Cuda>>,
        grad: &Tensor<Cuda>,
        m: &mut Tensor<Cuda>,
        v: &mut Tensor<Cuda>,
        n_decay: usize,
        stats: &Tensor<Cuda>,
        hp: &AdamWHyper,
    ) -> Result<()> {
        let n = check(master, working.as_deref(), grad, m, v, n_decay)?;
        f32_only(&[master.dtype(), grad.dtype(), m.dtype(), v.dtype()])?;
        check_stats("adamw_step", stats, master)?;
        let p = AdamWParams {
            master: master.buf.ptr,
            working: working.as_ref().map_or(0, |w| w.buf.ptr),
            grad: grad.buf.ptr,
            m: m.buf.ptr,
            v: v.buf.ptr,
            stats: stats.buf.ptr,
            n: n as u64,
            n_decay: n_decay as u64,
            working_dt: working.as_ref().map_or(0, |w| dtype_code(w.dtype())),
            ..bytemuck::Zeroable::zeroed()
        };
        // SAFETY: every buffer holds n elements of its dtype (checked above)
        unsafe { self.run(&step_launch(p, hp)) }
    }

    fn grad_sq_norm(&self, stats: &mut Tensor<Cuda>, grad: &Tensor<Cuda>) -> Result<()> {
        f32_only(&[grad.dtype()])?;
        check_stats("grad_sq_norm", stats, grad)?;
        // SAFETY: grad holds numel() f32, stats STATS_LEN f32
        unsafe { self.run(&sq_norm_launch(grad.buf.ptr, stats.buf.ptr, grad.numel())) }
    }

    fn grad_accumulate(&self, acc: &mut Tensor<Cuda>, g: &Tensor<Cuda>) -> Result<()> {
        super::check_accumulate(acc, g)?;
        f32_only(&[g.dtype()])?;
        // cuBLAS saxpy with alpha = 1: y = 1·x + y, one fused multiply-add per element, exact in the product,
        // so one rounding, as the CPU reference's `+=`
        self.saxpy_one(acc.buf.ptr, g.buf.ptr, g.numel())
    }
}
