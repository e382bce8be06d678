//! `transformers.optimization.Adafactor` (4.54.1 semantics): factored second moment for ≥2-d
//! params, update clipping, relative step size with optional parameter scaling and warmup init
//! (spec: sdscripts_cli_data.md §1.5).
use super::common::{Optimizer, ParamGroup, Slot, Slots};
use anyhow::Result;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct AdafactorConfig {
    pub eps: (f64, f64),
    pub clip_threshold: f64,
    pub decay_rate: f64,
    pub beta1: Option<f64>,
    pub weight_decay: f64,
    pub scale_parameter: bool,
    pub relative_step: bool,
    pub warmup_init: bool,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        AdafactorConfig {
            eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            weight_decay: 0.0,
            scale_parameter: true,
            relative_step: true,
            warmup_init: false,
        }
    }
}

pub struct Adafactor {
    /// With `relative_step` the group lr is ignored by the update (transformers computes it).
    pub groups: Vec<ParamGroup>,
    pub config: AdafactorConfig,
    slots: Slots,
}

fn rms(t: &Tensor) -> f64 {
    t.norm().double_value(&[]) / (t.numel() as f64).sqrt()
}

impl Adafactor {
    /// `lr` is the constructor lr; transformers refuses it together with `relative_step`.
    pub fn new(groups: Vec<ParamGroup>, lr: Option<f64>, config: AdafactorConfig) -> Result<Self> {
        if lr.is_some() && config.relative_step {
            anyhow::bail!("Cannot combine manual `lr` and `relative_step=True` options");
        }
        if config.warmup_init && !config.relative_step {
            anyhow::bail!("`warmup_init=True` requires `relative_step=True`");
        }
        let slots = Slots::new(&groups);
        Ok(Adafactor {
            groups,
            config,
            slots,
        })
    }

    /// The step size transformers' `_get_lr` gives for a parameter at `step` with RMS `p_rms`.
    pub fn step_lr(&self, group_lr: f64, step: i64, p_rms: f64) -> f64 {
        let c = &self.config;
        let mut rel = group_lr;
        if c.relative_step {
            let min_step = if c.warmup_init {
                1e-6 * step as f64
            } else {
                1e-2
            };
            rel = min_step.min(1.0 / (step as f64).sqrt());
        }
        let scale = if c.scale_parameter {
            c.eps.1.max(p_rms)
        } else {
            1.0
        };
        scale * rel
    }

    /// Current step sizes per group (what AdafactorSchedule reports for logging): from the
    /// first parameter of each group, `None` before its first update.
    pub fn current_lrs(&self) -> Vec<Option<f64>> {
        self.groups
            .iter()
            .enumerate()
            .map(|(gi, g)| {
                let slot = self.slots.slots[gi].first()?.as_ref()?;
                let p = g.params.first()?;
                Some(self.step_lr(g.lr, slot.step, rms(&p.to_kind(Kind::Float))))
            })
            .collect()
    }
}

impl Optimizer for Adafactor {
    fn step(&mut self) -> Result<()> {
        let c = self.config.clone();
        let _guard = tch::no_grad_guard();
        for gi in 0..self.groups.len() {
            let group_lr = self.groups[gi].lr;
            for pi in 0..self.groups[gi].params.len() {
                let mut p = self.groups[gi].params[pi].shallow_clone();
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let grad = if matches!(g.kind(), Kind::Half | Kind::BFloat16) {
                    g.to_kind(Kind::Float)
                } else {
                    g
                };
                let shape = grad.size();
                let factored = shape.len() >= 2;
                let st = self.slots.slots[gi][pi].get_or_insert_with(|| {
                    let mut s = Slot::default();
                    if c.beta1.is_some() {
                        s.tensors.insert("exp_avg".into(), grad.zeros_like());
                    }
                    if factored {
                        let n = shape.len();
                        let row: Vec<i64> = shape[..n - 1].to_vec();
                        let mut col: Vec<i64> = shape[..n - 2].to_vec();
                        col.push(shape[n - 1]);
                        let o = (grad.kind(), grad.device());
                        s.tensors
                            .insert("exp_avg_sq_row".into(), Tensor::zeros(row, o));
                        s.tensors
                            .insert("exp_avg_sq_col".into(), Tensor::zeros(col, o));
                    } else {
                        s.tensors.insert("exp_avg_sq".into(), grad.zeros_like());
                    }
                    s
                });
                let half = matches!(p.kind(), Kind::Half | Kind::BFloat16);
                let mut p32 = if half {
                    p.to_kind(Kind::Float)
                } else {
                    p.shallow_clone()
                };
                st.step += 1;
                let step = st.step;
                let p_rms = rms(&p32);
                // same formula as Adafactor::step_lr, inlined because `st` borrows self.slots
                let lr = {
                    let mut rel = group_lr;
                    if c.relative_step {
                        let min_step = if c.warmup_init {
                            1e-6 * step as f64
                        } else {
                            1e-2
                        };
                        rel = min_step.min(1.0 / (step as f64).sqrt());
                    }
                    let scale = if c.scale_parameter {
                        c.eps.1.max(p_rms)
                    } else {
                        1.0
                    };
                    scale * rel
                };
                let beta2t = 1.0 - (step as f64).powf(c.decay_rate);
                let sq = (&grad * &grad).g_add_scalar(c.eps.0);
                let mut update = if factored {
                    let n = shape.len() as i64;
                    let row_mean = sq.mean_dim(&[n - 1][..], false, None::<Kind>);
                    let col_mean = sq.mean_dim(&[n - 2][..], false, None::<Kind>);
                    let _ = st
                        .get("exp_avg_sq_row")
                        .g_mul_scalar_(beta2t)
                        .g_add_(&row_mean.g_mul_scalar(1.0 - beta2t));
                    let _ = st
                        .get("exp_avg_sq_col")
                        .g_mul_scalar_(beta2t)
                        .g_add_(&col_mean.g_mul_scalar(1.0 - beta2t));
                    let row = st.get("exp_avg_sq_row").shallow_clone();
                    let col = st.get("exp_avg_sq_col").shallow_clone();
                    let r_factor = (&row / row.mean_dim(&[-1i64][..], true, None::<Kind>))
                        .rsqrt()
                        .unsqueeze(-1);
                    let c_factor = col.unsqueeze(-2).rsqrt();
                    (r_factor * c_factor) * &grad
                } else {
                    let v = st.get("exp_avg_sq");
                    let _ = v
                        .g_mul_scalar_(beta2t)
                        .g_add_(&sq.g_mul_scalar(1.0 - beta2t));
                    v.rsqrt() * &grad
                };
                let denom = (rms(&update) / c.clip_threshold).max(1.0);
                update = update.g_div_scalar(denom).g_mul_scalar(lr);
                if let Some(beta1) = c.beta1 {
                    let m = st.get("exp_avg");
                    let _ = m
                        .g_mul_scalar_(beta1)
                        .g_add_(&update.g_mul_scalar(1.0 - beta1));
                    update = m.shallow_clone();
                }
                if c.weight_decay != 0.0 {
                    let decay = p32.g_mul_scalar(-c.weight_decay * lr);
                    let _ = p32.g_add_(&decay);
                }
                let _ = p32.g_sub_(&update);
                if half {
                    p.copy_(&p32);
                }
            }
        }
        Ok(())
    }

    crate::optimizer_group_methods!();

    fn class_name(&self) -> String {
        "transformers.optimization.Adafactor".to_string()
    }
}
