//! The end of one optimizer step in accelerate's order (spec: sdscripts_model_math.md §4
//! steps 9–10, §8): unscale → clip_grad_norm_ (unless --max_grad_norm 0) → optimizer step
//! (skipped on fp16 overflow) → scaler update → LR scheduler step (only when the optimizer
//! stepped) → zero_grad.
use crate::train::amp::{clip_grad_norm, GradScaler};
use crate::train::lr::LrScheduler;
use crate::train::optim::common::Optimizer;
use anyhow::Result;
use tch::Tensor;

/// What happened in `finish_optimizer_step`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// False when the fp16 scaler found inf/NaN gradients and skipped the update.
    pub stepped: bool,
    /// Global gradient norm before clipping (None when clipping is off).
    pub grad_norm: Option<f64>,
}

/// Runs the synced-gradients part of a training step. `params` are all network parameters
/// (clipping covers every one of them, including a dropped TE group's).
pub fn finish_optimizer_step(
    opt: &mut dyn Optimizer,
    scaler: &mut GradScaler,
    scheduler: &mut LrScheduler,
    params: &[Tensor],
    max_grad_norm: f64,
    num_processes: i64,
) -> Result<StepOutcome> {
    let grad_norm = if max_grad_norm != 0.0 {
        scaler.unscale(params);
        Some(clip_grad_norm(params, max_grad_norm))
    } else {
        None
    };
    let stepped = scaler.step(opt, params)?;
    scaler.update();
    if stepped {
        scheduler.step(opt, num_processes);
    }
    opt.zero_grad();
    // params outside the optimizer (dropped groups) still collect grads; clear them too
    for p in params {
        let mut p = p.shallow_clone();
        p.zero_grad();
    }
    Ok(StepOutcome { stepped, grad_norm })
}
