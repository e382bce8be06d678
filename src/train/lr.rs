//! Learning-rate schedules as sd-scripts builds them with transformers' `get_scheduler`
//! (spec: sdscripts_cli_data.md §1.4, sdscripts_model_math.md §8): a LambdaLR per group,
//! lr = base_lr × λ(s) with s the number of scheduler steps so far; λ(0) is applied at
//! construction, so the first optimizer step already uses it.
use crate::train::args::{IntOrFloat, LR_SCHEDULERS};
use crate::train::optim::common::Optimizer;
use anyhow::{bail, Result};
use std::f64::consts::PI;

/// polynomial's fixed end lr (transformers' default, sd-scripts does not pass it).
const POLY_LR_END: f64 = 1e-7;

#[derive(Debug, Clone, PartialEq)]
pub enum ScheduleKind {
    Constant,
    ConstantWithWarmup,
    Linear,
    /// transformers' default num_cycles 0.5 (sd-scripts does not pass --lr_scheduler_num_cycles)
    Cosine,
    CosineWithRestarts {
        num_cycles: i64,
    },
    /// `lr_init` is the optimizer's constructor lr (`--learning_rate`), not the group's lr.
    Polynomial {
        power: f64,
        lr_init: f64,
    },
    /// `adafactor:{lr}` (relative-step Adafactor): λ ≡ initial lr; the optimizer ignores it.
    Adafactor {
        initial_lr: f64,
    },
}

/// λ(s) and its inputs: T = total steps (`max_train_steps × num_processes`), W = warmup steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub warmup: i64,
    pub total: i64,
}

impl Schedule {
    /// sd-scripts' `get_scheduler_fix` for the six transformers schedules (and adafactor).
    /// `warmup_arg` is `--lr_warmup_steps` (int, or float ratio of the total).
    pub fn from_args(
        name: &str,
        warmup_arg: IntOrFloat,
        max_train_steps: i64,
        num_processes: i64,
        num_cycles: i64,
        power: f64,
        learning_rate: f64,
    ) -> Result<Schedule> {
        let total = max_train_steps * num_processes;
        let warmup = warmup_arg.steps(total);
        let needless_warmup = || -> Result<()> {
            if warmup != 0 {
                bail!("{name} does not require `num_warmup_steps`. Set None or 0.");
            }
            Ok(())
        };
        let kind = if let Some(lr) = name.strip_prefix("adafactor") {
            needless_warmup()?;
            let initial_lr = lr
                .strip_prefix(':')
                .and_then(crate::train::args::py_float)
                .unwrap_or(learning_rate);
            ScheduleKind::Adafactor { initial_lr }
        } else {
            match name {
                "constant" => {
                    needless_warmup()?;
                    ScheduleKind::Constant
                }
                "constant_with_warmup" => ScheduleKind::ConstantWithWarmup,
                "linear" => ScheduleKind::Linear,
                "cosine" => ScheduleKind::Cosine,
                "cosine_with_restarts" => ScheduleKind::CosineWithRestarts { num_cycles },
                "polynomial" => {
                    if learning_rate <= POLY_LR_END {
                        bail!(
                            "lr_end ({}) must be smaller than initial lr ({})",
                            crate::train::args::py_float_repr(POLY_LR_END),
                            crate::train::args::py_float_repr(learning_rate)
                        );
                    }
                    if total == warmup {
                        // transformers divides by (T − W) here and raises ZeroDivisionError
                        bail!("--lr_scheduler polynomial: the warmup ({warmup} steps) must be shorter than the training ({total} steps)");
                    }
                    ScheduleKind::Polynomial {
                        power,
                        lr_init: learning_rate,
                    }
                }
                _ => bail!(
                    "--lr_scheduler {name}: not supported by sdlora; supported: {}",
                    LR_SCHEDULERS.join(", ")
                ),
            }
        };
        Ok(Schedule {
            kind,
            warmup,
            total,
        })
    }

    /// λ(s), in f64 as Python computes it.
    pub fn lambda(&self, s: i64) -> f64 {
        let (w, t) = (self.warmup, self.total);
        let warm = |s: i64| s as f64 / (w.max(1) as f64);
        let progress = |s: i64| (s - w) as f64 / ((t - w).max(1) as f64);
        match &self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Adafactor { initial_lr } => *initial_lr,
            ScheduleKind::ConstantWithWarmup => {
                if s < w {
                    warm(s)
                } else {
                    1.0
                }
            }
            ScheduleKind::Linear => {
                if s < w {
                    warm(s)
                } else {
                    0f64.max((t - s) as f64 / ((t - w).max(1) as f64))
                }
            }
            ScheduleKind::Cosine => {
                if s < w {
                    warm(s)
                } else {
                    0f64.max(0.5 * (1.0 + (PI * 0.5 * 2.0 * progress(s)).cos()))
                }
            }
            ScheduleKind::CosineWithRestarts { num_cycles } => {
                if s < w {
                    return warm(s);
                }
                let p = progress(s);
                if p >= 1.0 {
                    return 0.0;
                }
                0f64.max(0.5 * (1.0 + (PI * ((*num_cycles as f64 * p) % 1.0)).cos()))
            }
            ScheduleKind::Polynomial { power, lr_init } => {
                if s < w {
                    warm(s)
                } else if s > t {
                    POLY_LR_END / lr_init
                } else {
                    let lr_range = lr_init - POLY_LR_END;
                    let decay_steps = (t - w) as f64;
                    let pct_remaining = 1.0 - (s - w) as f64 / decay_steps;
                    (lr_range * pct_remaining.powf(*power) + POLY_LR_END) / lr_init
                }
            }
        }
    }
}

/// The scheduler of a run: per-group base lrs and the step counter, with accelerate's cadence
/// (the caller skips `step` when the fp16 scaler skipped the optimizer step).
#[derive(Debug, Clone)]
pub struct LrScheduler {
    pub schedule: Schedule,
    pub base_lrs: Vec<f64>,
    /// Number of scheduler steps taken (LambdaLR's `last_epoch`).
    pub steps: i64,
}

impl LrScheduler {
    /// Takes the groups' current lrs as base lrs and applies λ(0), as LambdaLR's constructor.
    pub fn new(schedule: Schedule, opt: &mut dyn Optimizer) -> Self {
        let base_lrs = (0..opt.num_groups()).map(|g| opt.lr(g)).collect();
        let s = LrScheduler {
            schedule,
            base_lrs,
            steps: 0,
        };
        s.apply(opt);
        s
    }

    /// Current lr of every group.
    pub fn lrs(&self) -> Vec<f64> {
        let l = self.schedule.lambda(self.steps);
        self.base_lrs.iter().map(|b| b * l).collect()
    }

    fn apply(&self, opt: &mut dyn Optimizer) {
        if matches!(self.schedule.kind, ScheduleKind::Adafactor { .. }) {
            return; // relative-step Adafactor computes its own step size
        }
        for (g, lr) in self.lrs().into_iter().enumerate() {
            opt.set_lr(g, lr);
        }
    }

    /// One scheduler step (after a successful optimizer step), `num_processes` LambdaLR steps.
    pub fn step(&mut self, opt: &mut dyn Optimizer, num_processes: i64) {
        self.steps += num_processes;
        self.apply(opt);
    }

    /// Restores the step count from a saved state and re-applies the lrs.
    pub fn set_steps(&mut self, steps: i64, opt: &mut dyn Optimizer) {
        self.steps = steps;
        self.apply(opt);
    }
}
