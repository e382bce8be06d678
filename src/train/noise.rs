//! Noise, timesteps and the loss of one training step (spec: sdscripts_model_math.md §4 steps
//! 3–7, sdscripts_cli_data.md §6.3/§6.4 for the RNG order): DDPM scaled-linear schedule,
//! `add_noise` / `get_velocity` as diffusers 0.32.1, sd-scripts' noise offset, pyramid noise,
//! input perturbation, min-SNR and the other loss weightings.
use crate::train::args::TrainArgs;
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// DDPMScheduler(beta_start=0.00085, beta_end=0.012, "scaled_linear", 1000 steps) as
/// train_network.py builds it (`NetworkTrainer.get_noise_scheduler`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdpmConfig {
    pub beta_start: f64,
    pub beta_end: f64,
    pub num_train_timesteps: i64,
}

impl Default for DdpmConfig {
    fn default() -> Self {
        DdpmConfig {
            beta_start: 0.00085,
            beta_end: 0.012,
            num_train_timesteps: 1000,
        }
    }
}

/// The schedule tensors, fp32 on the CPU (diffusers keeps them there; sd-scripts moves
/// `alphas_cumprod` back to the CPU after every `add_noise`).
pub struct NoiseScheduler {
    pub config: DdpmConfig,
    pub betas: Tensor,
    pub alphas_cumprod: Tensor,
    /// SNR table ᾱ/(1−ᾱ) computed before any zero-terminal-SNR rescale and never refreshed
    /// (`prepare_scheduler_for_custom_training`).
    pub all_snr: Tensor,
}

fn cpu_f32() -> (Kind, Device) {
    (Kind::Float, Device::Cpu)
}

impl NoiseScheduler {
    pub fn new(config: DdpmConfig, zero_terminal_snr: bool) -> Self {
        // scaled_linear: linspace of sqrt(beta) in fp32, squared
        let betas = Tensor::linspace(
            config.beta_start.sqrt(),
            config.beta_end.sqrt(),
            config.num_train_timesteps,
            cpu_f32(),
        )
        .square();
        let alphas_cumprod = (betas.ones_like() - &betas).cumprod(0, Kind::Float);
        let alpha = alphas_cumprod.sqrt();
        let sigma = (alphas_cumprod.ones_like() - &alphas_cumprod).sqrt();
        let all_snr = (alpha / sigma).square();
        let mut s = NoiseScheduler {
            config,
            betas,
            alphas_cumprod,
            all_snr,
        };
        if zero_terminal_snr {
            s.enforce_zero_terminal_snr();
        }
        s
    }

    /// `fix_noise_scheduler_betas_for_zero_terminal_snr` (arXiv 2305.08891 Algorithm 1).
    fn enforce_zero_terminal_snr(&mut self) {
        let alphas = self.betas.ones_like() - &self.betas;
        let abar_sqrt = alphas.cumprod(0, Kind::Float).sqrt();
        let n = abar_sqrt.size()[0];
        let s0 = abar_sqrt.get(0);
        let st = abar_sqrt.get(n - 1);
        let shifted = (&abar_sqrt - &st) * (&s0 / (&s0 - &st));
        let abar = shifted.square();
        let ratio = abar.narrow(0, 1, n - 1) / abar.narrow(0, 0, n - 1);
        let alphas = Tensor::cat(&[abar.narrow(0, 0, 1), ratio], 0);
        self.betas = alphas.ones_like() - &alphas;
        let alphas = self.betas.ones_like() - &self.betas;
        self.alphas_cumprod = alphas.cumprod(0, Kind::Float);
    }

    /// √ᾱ_t and √(1−ᾱ_t) shaped (B,1,1,1), with ᾱ cast to `like`'s kind and device first
    /// (diffusers' order: cast, index, then the power).
    fn coefficients(&self, timesteps: &Tensor, like: &Tensor) -> (Tensor, Tensor) {
        let ac = self
            .alphas_cumprod
            .to_device(like.device())
            .to_kind(like.kind());
        let t = timesteps.to_device(like.device());
        let a = ac.index_select(0, &t);
        let mut sa = a.pow_tensor_scalar(0.5).flatten(0, -1);
        let mut so = (a.ones_like() - &a).pow_tensor_scalar(0.5).flatten(0, -1);
        while sa.dim() < like.dim() {
            sa = sa.unsqueeze(-1);
            so = so.unsqueeze(-1);
        }
        (sa, so)
    }

    /// `DDPMScheduler.add_noise`: √ᾱ_t·x + √(1−ᾱ_t)·ε.
    pub fn add_noise(&self, latents: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (sa, so) = self.coefficients(timesteps, latents);
        sa * latents + so * noise
    }

    /// `DDPMScheduler.get_velocity`: √ᾱ_t·ε − √(1−ᾱ_t)·x.
    pub fn get_velocity(&self, latents: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (sa, so) = self.coefficients(timesteps, latents);
        sa * noise - so * latents
    }

    /// all_snr[t] for a batch of timesteps (fp32, CPU).
    pub fn snr(&self, timesteps: &Tensor) -> Tensor {
        self.all_snr
            .index_select(0, &timesteps.to_device(Device::Cpu))
    }
}

/// The element loss (`--loss_type`) and its Huber threshold schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossType {
    L2,
    L1,
    Huber,
    SmoothL1,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HuberSchedule {
    Constant,
    Exponential,
    Snr,
}

/// The options that shape noise and loss, from the training arguments. Options that Python
/// tests for truthiness (`if args.noise_offset:`) are `None` when 0.
#[derive(Debug, Clone, PartialEq)]
pub struct LossConfig {
    pub v_parameterization: bool,
    pub noise_offset: Option<f64>,
    pub noise_offset_random_strength: bool,
    pub adaptive_noise_scale: Option<f64>,
    pub multires_noise_iterations: Option<i64>,
    pub multires_noise_discount: f64,
    pub ip_noise_gamma: Option<f64>,
    pub ip_noise_gamma_random_strength: bool,
    pub min_timestep: Option<i64>,
    pub max_timestep: Option<i64>,
    pub loss_type: LossType,
    pub huber_schedule: HuberSchedule,
    pub huber_c: f64,
    pub huber_scale: f64,
    pub min_snr_gamma: Option<f64>,
    pub scale_v_pred_loss_like_noise_pred: bool,
    pub v_pred_like_loss: Option<f64>,
    pub debiased_estimation_loss: bool,
}

fn truthy_f(v: Option<f64>) -> Option<f64> {
    v.filter(|x| *x != 0.0)
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            v_parameterization: false,
            noise_offset: None,
            noise_offset_random_strength: false,
            adaptive_noise_scale: None,
            multires_noise_iterations: None,
            multires_noise_discount: 0.3,
            ip_noise_gamma: None,
            ip_noise_gamma_random_strength: false,
            min_timestep: None,
            max_timestep: None,
            loss_type: LossType::L2,
            huber_schedule: HuberSchedule::Snr,
            huber_c: 0.1,
            huber_scale: 1.0,
            min_snr_gamma: None,
            scale_v_pred_loss_like_noise_pred: false,
            v_pred_like_loss: None,
            debiased_estimation_loss: false,
        }
    }
}

impl LossConfig {
    pub fn from_args(a: &TrainArgs) -> Result<Self> {
        let loss_type = match a.loss_type.as_str() {
            "l2" => LossType::L2,
            "l1" => LossType::L1,
            "huber" => LossType::Huber,
            "smooth_l1" => LossType::SmoothL1,
            other => bail!("--loss_type {other}: expected l1, l2, huber or smooth_l1"),
        };
        let huber_schedule = match a.huber_schedule.as_str() {
            "constant" => HuberSchedule::Constant,
            "exponential" => HuberSchedule::Exponential,
            "snr" => HuberSchedule::Snr,
            other => bail!("--huber_schedule {other}: expected constant, exponential or snr"),
        };
        Ok(LossConfig {
            v_parameterization: a.v_parameterization,
            noise_offset: truthy_f(a.noise_offset),
            noise_offset_random_strength: a.noise_offset_random_strength,
            adaptive_noise_scale: a.adaptive_noise_scale,
            multires_noise_iterations: a.multires_noise_iterations.filter(|n| *n != 0),
            multires_noise_discount: a.multires_noise_discount,
            ip_noise_gamma: truthy_f(a.ip_noise_gamma),
            ip_noise_gamma_random_strength: a.ip_noise_gamma_random_strength,
            min_timestep: a.min_timestep,
            max_timestep: a.max_timestep,
            loss_type,
            huber_schedule,
            huber_c: a.huber_c,
            huber_scale: a.huber_scale,
            min_snr_gamma: truthy_f(a.min_snr_gamma),
            scale_v_pred_loss_like_noise_pred: a.scale_v_pred_loss_like_noise_pred,
            v_pred_like_loss: truthy_f(a.v_pred_like_loss),
            debiased_estimation_loss: a.debiased_estimation_loss,
        })
    }
}

/// `pyramid_noise_like` (multires noise). `py_random` is Python's `random.random()` of the
/// main process (one draw per level); the Gaussian levels are drawn on the CPU generator and
/// moved to the noise's device; upsampling is bilinear, align_corners=False. The level sum is
/// accumulated in place into `noise` (its dtype), then divided by its unbiased std.
pub fn pyramid_noise_like(
    noise: &Tensor,
    iterations: i64,
    discount: f64,
    py_random: &mut dyn FnMut() -> f64,
) -> Tensor {
    let size = noise.size();
    let (b, c, h, w) = (size[0], size[1], size[2], size[3]);
    let mut acc = noise.copy();
    for i in 0..iterations {
        let r = py_random() * 2.0 + 2.0;
        let ri = r.powi(i as i32);
        // Python: max(1, int(h / r**i)), int() truncates toward zero
        let hn = 1.max((h as f64 / ri) as i64);
        let wn = 1.max((w as f64 / ri) as i64);
        let level = Tensor::randn([b, c, hn, wn], cpu_f32())
            .to_device(noise.device())
            .upsample_bilinear2d([h, w], false, None, None)
            * discount.powi(i as i32);
        let _ = acc.g_add_(&level);
        if hn == 1 || wn == 1 {
            break;
        }
    }
    let std = acc.std(true);
    acc / std
}

/// `apply_noise_offset`: noise + offset·randn(B,C,1,1) (fp32, on the latents' device), the
/// offset optionally adapted per (B,C) to |mean_{H,W}(latents)|.
pub fn apply_noise_offset(
    latents: &Tensor,
    noise: &Tensor,
    offset: &Tensor,
    adaptive_noise_scale: Option<f64>,
) -> Tensor {
    let offset = match adaptive_noise_scale {
        Some(s) => {
            let mean = latents.mean_dim(&[2i64, 3][..], true, None::<Kind>).abs();
            (offset + mean * s).clamp_min(0.0)
        }
        None => offset.shallow_clone(),
    };
    let size = latents.size();
    let r = Tensor::randn([size[0], size[1], 1, 1], (Kind::Float, latents.device()));
    noise + offset * r
}

/// What one step's noising produced.
pub struct NoisedBatch {
    pub noise: Tensor,
    pub noisy_latents: Tensor,
    /// int64, on the latents' device.
    pub timesteps: Tensor,
}

/// `get_noise_noisy_latents_and_timesteps`, draws in sd-scripts' order: noise (latents'
/// device generator, latents' dtype) → [random offset strength `rand(1)`, offset `randn`] →
/// [pyramid levels, CPU] → timesteps (CPU `randint(min_t, max_t)`) → [input perturbation].
pub fn noise_latents(
    cfg: &LossConfig,
    sched: &NoiseScheduler,
    latents: &Tensor,
    py_random: &mut dyn FnMut() -> f64,
) -> NoisedBatch {
    let dev = latents.device();
    let mut noise = latents.randn_like();
    if let Some(o) = cfg.noise_offset {
        let offset = if cfg.noise_offset_random_strength {
            Tensor::rand([1], (Kind::Float, dev)) * o
        } else {
            Tensor::from(o).to_kind(Kind::Float).to_device(dev)
        };
        // fp16 noise + fp32 offset term promotes to fp32, as in Python
        noise = apply_noise_offset(latents, &noise, &offset, cfg.adaptive_noise_scale);
    }
    if let Some(n) = cfg.multires_noise_iterations {
        noise = pyramid_noise_like(&noise, n, cfg.multires_noise_discount, py_random);
    }
    let b = latents.size()[0];
    let min_t = cfg.min_timestep.unwrap_or(0);
    let max_t = cfg.max_timestep.unwrap_or(sched.config.num_train_timesteps);
    let timesteps = if min_t < max_t {
        Tensor::randint_low(min_t, max_t, [b], (Kind::Int64, Device::Cpu))
    } else {
        Tensor::full([b], max_t, (Kind::Int64, Device::Cpu))
    }
    .to_device(dev);
    let noisy_latents = if let Some(g) = cfg.ip_noise_gamma {
        let strength = if cfg.ip_noise_gamma_random_strength {
            Tensor::rand([1], (Kind::Float, dev)) * g
        } else {
            Tensor::from(g).to_kind(Kind::Float).to_device(dev)
        };
        let perturbed = &noise + strength * latents.randn_like();
        sched.add_noise(latents, &perturbed, &timesteps)
    } else {
        sched.add_noise(latents, &noise, &timesteps)
    };
    NoisedBatch {
        noise,
        noisy_latents,
        timesteps,
    }
}

/// Huber threshold per sample (`get_huber_threshold_if_needed`), fp32 on the timesteps' device.
pub fn huber_c(cfg: &LossConfig, sched: &NoiseScheduler, timesteps: &Tensor) -> Option<Tensor> {
    if !matches!(cfg.loss_type, LossType::Huber | LossType::SmoothL1) {
        return None;
    }
    let dev = timesteps.device();
    let n = sched.config.num_train_timesteps as f64;
    Some(match cfg.huber_schedule {
        HuberSchedule::Exponential => {
            let alpha = -cfg.huber_c.ln() / n;
            (timesteps.to_kind(Kind::Float) * -alpha).exp() * cfg.huber_scale
        }
        HuberSchedule::Snr => {
            let ac = sched
                .alphas_cumprod
                .index_select(0, &timesteps.to_device(Device::Cpu));
            let sigmas = ((ac.ones_like() - &ac) / &ac).pow_tensor_scalar(0.5);
            ((sigmas + 1.0).square().reciprocal() * (1.0 - cfg.huber_c) + cfg.huber_c)
                .to_device(dev)
        }
        HuberSchedule::Constant => Tensor::full(
            [timesteps.size()[0]],
            cfg.huber_c * cfg.huber_scale,
            (Kind::Float, dev),
        ),
    })
}

/// `conditional_loss(..., reduction="none")`: the element loss.
pub fn conditional_loss(
    pred: &Tensor,
    target: &Tensor,
    loss_type: LossType,
    huber_c: Option<&Tensor>,
) -> Tensor {
    let diff = pred - target;
    let hc = || {
        let c = huber_c.expect("huber_c is computed for huber / smooth_l1");
        let mut shape = vec![-1i64];
        shape.extend(std::iter::repeat_n(1, pred.dim() - 1));
        c.view(shape.as_slice())
    };
    match loss_type {
        LossType::L2 => diff.square(),
        LossType::L1 => diff.abs(),
        LossType::Huber => {
            let c = hc();
            (&c * 2.0) * ((diff.square() + c.square()).sqrt() - &c)
        }
        LossType::SmoothL1 => {
            let c = hc();
            ((diff.square() + c.square()).sqrt() - &c) * 2.0
        }
    }
}

/// `post_process_loss` on the per-sample loss (B,), in sd-scripts' order.
pub fn post_process_loss(
    cfg: &LossConfig,
    sched: &NoiseScheduler,
    loss: Tensor,
    timesteps: &Tensor,
) -> Tensor {
    let dev = loss.device();
    let snr = || sched.snr(timesteps);
    let clipped = || snr().clamp_max(1000.0);
    let mut loss = loss;
    if let Some(gamma) = cfg.min_snr_gamma {
        let s = snr();
        let m = s.clamp_max(gamma);
        let w = if cfg.v_parameterization {
            m / (s + 1.0)
        } else {
            m / s
        };
        loss *= w.to_kind(Kind::Float).to_device(dev);
    }
    if cfg.scale_v_pred_loss_like_noise_pred {
        let s = clipped();
        let scale = &s / (&s + 1.0);
        loss *= scale.to_device(dev);
    }
    if let Some(k) = cfg.v_pred_like_loss {
        let s = clipped();
        let scale = (&s / (&s + 1.0)).to_device(dev);
        loss = &loss + &loss / scale * k;
    }
    if cfg.debiased_estimation_loss {
        let s = clipped();
        let w = if cfg.v_parameterization {
            (s + 1.0).reciprocal()
        } else {
            s.sqrt().reciprocal()
        };
        loss = w.to_device(dev) * loss;
    }
    loss
}

/// One step's loss and what the loop logs or reuses.
pub struct StepLoss {
    /// Scalar fp32 loss with the graph attached (what `process_batch` returns).
    pub loss: Tensor,
    pub timesteps: Tensor,
    pub noise: Tensor,
    pub target: Tensor,
}

/// Steps 3–7 of one training step (`process_batch` after the text conditioning): noise and
/// timesteps, the UNet call through `unet(noisy_latents, timesteps)`, target, element loss in
/// fp32, mean over C,H,W, × `loss_weights` (prior_loss_weight for reg images), post-processing,
/// batch mean.
pub fn step_loss(
    cfg: &LossConfig,
    sched: &NoiseScheduler,
    latents: &Tensor,
    loss_weights: &Tensor,
    py_random: &mut dyn FnMut() -> f64,
    unet: &mut dyn FnMut(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<StepLoss> {
    let nb = noise_latents(cfg, sched, latents, py_random);
    let pred = unet(&nb.noisy_latents, &nb.timesteps)?;
    let target = if cfg.v_parameterization {
        sched.get_velocity(latents, &nb.noise, &nb.timesteps)
    } else {
        nb.noise.shallow_clone()
    };
    if pred.size() != target.size() {
        bail!(
            "UNet output shape {:?} does not match the target shape {:?}",
            pred.size(),
            target.size()
        );
    }
    let hc = huber_c(cfg, sched, &nb.timesteps);
    let elem = conditional_loss(
        &pred.to_kind(Kind::Float),
        &target.to_kind(Kind::Float),
        cfg.loss_type,
        hc.as_ref(),
    );
    let dims: Vec<i64> = (1..elem.dim() as i64).collect();
    let per_sample = elem.mean_dim(dims.as_slice(), false, None::<Kind>);
    let per_sample = per_sample
        * loss_weights
            .to_device(latents.device())
            .to_kind(Kind::Float);
    let per_sample = post_process_loss(cfg, sched, per_sample, &nb.timesteps);
    Ok(StepLoss {
        loss: per_sample.mean(Kind::Float),
        timesteps: nb.timesteps,
        noise: nb.noise,
        target,
    })
}
