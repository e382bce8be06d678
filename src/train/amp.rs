//! Mixed precision bookkeeping (spec: sdscripts_model_math.md §4 steps 8–10, §5): the dynamic
//! loss scaler as `torch.amp.GradScaler` with accelerate's defaults, `clip_grad_norm_`, and the
//! precision decision (fp16 on a CPU falls back to fp32 with one notice).
use crate::train::optim::common::Optimizer;
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// `--mixed_precision` resolved for the device the run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
}

impl Precision {
    /// sd-scripts' `weight_dtype` (frozen model weights, autocast dtype).
    pub fn weight_kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Fp16 => Kind::Half,
            Precision::Bf16 => Kind::BFloat16,
        }
    }
    /// Only fp16 uses a loss scaler (accelerate creates none for bf16).
    pub fn uses_grad_scaler(self) -> bool {
        self == Precision::Fp16
    }
}

/// Decides the precision; fp16 requested on a CPU runs in fp32 (libtorch's CPU fp16 kernels are
/// slow and partial) and returns the one notice line to log.
pub fn resolve_precision(
    mixed_precision: &str,
    device: Device,
) -> Result<(Precision, Option<String>)> {
    Ok(match (mixed_precision, device) {
        ("no", _) => (Precision::Fp32, None),
        ("fp16", Device::Cpu) => (
            Precision::Fp32,
            Some(
                "mixed_precision=fp16 needs a CUDA device; training in fp32 on the CPU".to_string(),
            ),
        ),
        ("fp16", _) => (Precision::Fp16, None),
        ("bf16", _) => (Precision::Bf16, None),
        (other, _) => bail!("--mixed_precision {other}: expected no, fp16 or bf16"),
    })
}

/// `torch.amp.GradScaler` hyper-parameters (torch defaults; accelerate passes none).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScalerConfig {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: i64,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        ScalerConfig {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// Dynamic loss scaling. Disabled (fp32/bf16) it is the identity and never skips a step.
#[derive(Debug, Clone)]
pub struct GradScaler {
    pub config: ScalerConfig,
    pub enabled: bool,
    /// Current scale (an fp32 value in torch; powers of two times 65536, exact in f64).
    pub scale: f64,
    /// Successful steps since the last growth or backoff.
    pub growth_tracker: i64,
    /// Set by `unscale` for the current step.
    found_inf: Option<bool>,
}

impl GradScaler {
    pub fn new(enabled: bool, config: ScalerConfig) -> Self {
        GradScaler {
            config,
            enabled,
            scale: config.init_scale,
            growth_tracker: 0,
            found_inf: None,
        }
    }

    /// loss × scale (what `accelerator.backward` differentiates, after dividing by GA).
    pub fn scale_loss(&self, loss: &Tensor) -> Tensor {
        if self.enabled {
            loss * self.scale
        } else {
            loss.shallow_clone()
        }
    }

    /// Divides every gradient by the scale in place (fp32 reciprocal, as torch) and records
    /// whether any is inf/NaN. Idempotent within a step, like `unscale_`.
    pub fn unscale(&mut self, params: &[Tensor]) -> bool {
        if !self.enabled {
            return false;
        }
        if let Some(f) = self.found_inf {
            return f;
        }
        let inv = (1.0 / self.scale) as f32 as f64;
        let mut bad: Option<Tensor> = None;
        tch::no_grad(|| {
            for p in params {
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                let nonfinite = g.isfinite().logical_not().any();
                bad = Some(match bad.take() {
                    None => nonfinite,
                    Some(b) => b.logical_or(&nonfinite),
                });
                let _ = g.g_mul_scalar_(inv);
            }
        });
        let found = bad.map(|b| b.int64_value(&[]) != 0).unwrap_or(false);
        self.found_inf = Some(found);
        found
    }

    /// `scaler.step(optimizer)`: unscales if not done, steps unless a gradient overflowed.
    /// Returns whether the optimizer stepped (the LR scheduler only steps when it did).
    pub fn step(&mut self, opt: &mut dyn Optimizer, params: &[Tensor]) -> Result<bool> {
        let found = self.unscale(params);
        if found {
            return Ok(false);
        }
        opt.step()?;
        Ok(true)
    }

    /// `scaler.update()`: backoff on overflow, growth after `growth_interval` good steps.
    pub fn update(&mut self) {
        if !self.enabled {
            return;
        }
        let found = self.found_inf.take().unwrap_or(false);
        if found {
            self.scale *= self.config.backoff_factor;
            self.growth_tracker = 0;
        } else {
            let successful = self.growth_tracker + 1;
            if successful == self.config.growth_interval {
                self.scale *= self.config.growth_factor;
                self.growth_tracker = 0;
            } else {
                self.growth_tracker = successful;
            }
        }
    }

    /// `scaler.pt` content: scale and growth tracker.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            ("scale".into(), Tensor::from(self.scale as f32)),
            (
                "_growth_tracker".into(),
                Tensor::from(self.growth_tracker as i32),
            ),
        ]
    }

    pub fn load_state_tensors(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        for (k, t) in tensors {
            match k.as_str() {
                "scale" => self.scale = t.double_value(&[]),
                "_growth_tracker" => self.growth_tracker = t.int64_value(&[]),
                _ => {}
            }
        }
        Ok(())
    }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` (norm type 2): the global L2 norm of all
/// gradients (per-tensor norms, then the norm of those), every gradient multiplied by
/// min(1, max_norm / (norm + 1e-6)). Returns the total norm before clipping.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads
            .iter()
            .map(|g| g.norm().to_device(grads[0].device()))
            .collect();
        let total = Tensor::stack(&norms, 0).norm();
        let coef = (total.g_add_scalar(1e-6).reciprocal() * max_norm).clamp_max(1.0);
        for g in &grads {
            let mut g = g.shallow_clone();
            let _ = g.g_mul_(&coef.to_device(g.device()).to_kind(g.kind()));
        }
        total.double_value(&[])
    })
}

extern "C" {
    fn sdlora_autocast_set_cuda_dtype(bf16: std::ffi::c_int);
}

/// The dtype CUDA autocast computes in (fp16 or bf16), as `torch.autocast("cuda", dtype=...)`.
pub fn set_autocast_dtype(kind: Kind) {
    // SAFETY: sets a process-wide autocast setting in libtorch; no pointers involved.
    unsafe { sdlora_autocast_set_cuda_dtype((kind == Kind::BFloat16) as std::ffi::c_int) }
}
