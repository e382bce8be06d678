//! The end of one optimizer step in accelerate's order (spec: sdscripts_model_math.md §4
//! steps 9–10, §8): unscale → clip_grad_norm_ (unless --max_grad_norm 0) → optimizer step
//! (skipped on fp16 overflow) → scaler update → LR scheduler step (only when the optimizer
//! stepped) → zero_grad.
use crate::models::clip::ClipTextModel;
use crate::models::recompute::Tape;
use crate::models::text::encode_tokens_with_tape;
use crate::models::unet::UNet2DConditionModel;
use crate::train::amp::{clip_grad_norm, GradScaler};
use crate::train::lr::LrScheduler;
use crate::train::noise::{step_loss, LossConfig, NoiseScheduler};
use crate::train::optim::common::Optimizer;
use anyhow::Result;
use tch::{Kind, Tensor};

/// The models one training step runs, and what the step trains.
pub struct StepModels<'m> {
    pub text_encoder: &'m ClipTextModel,
    pub unet: &'m UNet2DConditionModel,
    /// Text-encoder LoRA trains: the context keeps its graph (else it is computed without grad).
    pub train_text_encoder: bool,
    /// UNet LoRA trains: sd-scripts marks the noisy latents as requiring grad.
    pub train_unet: bool,
    pub clip_skip: Option<i64>,
    /// `--full_fp16`/`--full_bf16`: the context is cast to the weights' dtype.
    pub context_kind: Option<Kind>,
    /// `--gradient_checkpointing`: layers are recomputed in [`StepForward::backward`].
    pub gradient_checkpointing: bool,
    /// CUDA autocast around the forward (`--mixed_precision` fp16/bf16 on a GPU).
    pub autocast: bool,
}

/// The forward half of one step: the loss, and the tape its backward must replay.
pub struct StepForward<'m> {
    /// Scalar fp32 loss (before loss scaling and the accumulation divisor).
    pub loss: Tensor,
    tape: Option<Tape<'m>>,
}

impl StepForward<'_> {
    /// Back-propagates `scaled` (the loss after `GradScaler::scale_loss` and `/ accumulation`),
    /// recomputing the checkpointed layers when gradient checkpointing is on.
    pub fn backward(self, scaled: &Tensor) -> Result<()> {
        match &self.tape {
            Some(t) => t.backward(scaled),
            None => {
                scaled.backward();
                Ok(())
            }
        }
    }
}

/// Steps 2–7 of sd-scripts' `process_batch` (spec: sdscripts_model_math.md §4): text
/// conditioning from the token windows `input_ids` (B, n, 77), then noise, timesteps, the UNet
/// call, target and the weighted loss ([`step_loss`]); `latents` are already scaled by the VAE
/// factor. Random numbers come from the default generators, and `py_random` stands for the
/// data loader's Python `random` (multires noise).
#[allow(clippy::too_many_arguments)]
pub fn forward_loss<'m>(
    models: &StepModels<'m>,
    loss_cfg: &LossConfig,
    noise_sched: &NoiseScheduler,
    latents: &Tensor,
    input_ids: &Tensor,
    loss_weights: &Tensor,
    py_random: &mut dyn FnMut() -> f64,
) -> Result<StepForward<'m>> {
    let tape = models.gradient_checkpointing.then(Tape::new);
    let te = models.text_encoder;
    let unet = models.unet;
    let loss = tch::autocast(models.autocast, || -> Result<Tensor> {
        let ctx = if models.train_text_encoder {
            encode_tokens_with_tape(te, input_ids, models.clip_skip, tape.as_ref())
        } else {
            let _g = tch::no_grad_guard();
            encode_tokens_with_tape(te, input_ids, models.clip_skip, None)
        };
        let ctx = match models.context_kind {
            Some(k) => ctx.to_kind(k),
            None => ctx,
        };
        let sl = step_loss(
            loss_cfg,
            noise_sched,
            latents,
            loss_weights,
            py_random,
            &mut |noisy, t| {
                let noisy = if models.train_unet {
                    noisy.detach().set_requires_grad(true)
                } else {
                    noisy.shallow_clone()
                };
                Ok(unet.forward_with_tape(&noisy, t, &ctx, tape.as_ref()))
            },
        )?;
        Ok(sl.loss)
    })?;
    Ok(StepForward { loss, tape })
}

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
