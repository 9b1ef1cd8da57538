//! Optimisation policy around the AdamW kernel (src/ops/adamw/mod.rs): the learning-rate schedule, global-norm
//! clipping and dynamic loss scaling for fp16.

/// Linear warmup from 0 to `peak` over `warmup` steps, then linear decay to 0 at `total` (HF's
/// `get_linear_schedule_with_warmup`). `step` counts completed optimizer steps (0-based).
pub fn linear_schedule(step: usize, warmup: usize, total: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let rest = total.saturating_sub(warmup).max(1);
    peak * (total.saturating_sub(step) as f64 / rest as f64).max(0.0)
}

/// Clip coefficient for global-norm clipping (torch.nn.utils.clip_grad_norm_): min(1, max_norm/(norm+1e-6)).
pub fn clip_coef(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 || !norm.is_finite() {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Dynamic loss scaling (fp16): multiply the loss by `scale`; on a non-finite gradient skip the step and
/// halve the scale; after `growth_interval` good steps in a row, double it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub enabled: bool,
    pub scale: f64,
    pub good_steps: u64,
    pub growth_interval: u64,
}

impl LossScaler {
    pub fn new(enabled: bool) -> Self {
        LossScaler {
            enabled,
            scale: if enabled { 65536.0 } else { 1.0 },
            good_steps: 0,
            growth_interval: 2000,
        }
    }
    /// The multiplier the loss gradient is scaled by this step.
    pub fn loss_scale(&self) -> f64 {
        if self.enabled {
            self.scale
        } else {
            1.0
        }
    }
    /// Report whether this step's gradients were finite. Returns true when the step should be applied.
    pub fn update(&mut self, finite: bool) -> bool {
        if !self.enabled {
            return finite;
        }
        if finite {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
            true
        } else {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_values() {
        // warmup 10 of 100 steps, peak 3e-5
        assert_eq!(linear_schedule(0, 10, 100, 3e-5), 0.0);
        assert!((linear_schedule(5, 10, 100, 3e-5) - 1.5e-5).abs() < 1e-18);
        assert!((linear_schedule(10, 10, 100, 3e-5) - 3e-5).abs() < 1e-18);
        assert!((linear_schedule(55, 10, 100, 3e-5) - 1.5e-5).abs() < 1e-18);
        assert_eq!(linear_schedule(100, 10, 100, 3e-5), 0.0);
        assert_eq!(linear_schedule(120, 10, 100, 3e-5), 0.0);
        // no warmup
        assert!((linear_schedule(0, 0, 4, 1.0) - 1.0).abs() < 1e-15);
        assert!((linear_schedule(3, 0, 4, 1.0) - 0.25).abs() < 1e-15);
    }

    #[test]
    fn clipping() {
        assert_eq!(clip_coef(0.5, 1.0), 1.0);
        assert!((clip_coef(4.0, 1.0) - 1.0 / (4.0 + 1e-6)).abs() < 1e-15);
        assert_eq!(clip_coef(f64::NAN, 1.0), 1.0);
    }

    #[test]
    fn loss_scaler_skips_and_halves_on_overflow_then_grows() {
        let mut s = LossScaler::new(true);
        s.growth_interval = 3;
        assert_eq!(s.loss_scale(), 65536.0);
        assert!(!s.update(false));
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true) && s.update(true));
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true));
        assert_eq!(s.scale, 65536.0);
        let mut off = LossScaler::new(false);
        assert_eq!(off.loss_scale(), 1.0);
        assert!(!off.update(false));
        assert_eq!(off.scale, 1.0);
    }
}
