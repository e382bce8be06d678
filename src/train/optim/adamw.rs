//! `torch.optim.AdamW` (single-tensor path, torch 2.11 semantics), sd-scripts' default optimizer
//! (spec: sdscripts_model_math.md §4 step 11: betas (0.9, 0.999), eps 1e-8, weight_decay 0.01).
use super::common::{Optimizer, ParamGroup, Slot, Slots};
use anyhow::Result;

/// Hyper-parameters, torch's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub amsgrad: bool,
    pub maximize: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
            amsgrad: false,
            maximize: false,
        }
    }
}

pub struct AdamW {
    pub groups: Vec<ParamGroup>,
    pub config: AdamWConfig,
    slots: Slots,
}

impl AdamW {
    pub fn new(groups: Vec<ParamGroup>, config: AdamWConfig) -> Self {
        let slots = Slots::new(&groups);
        AdamW {
            groups,
            config,
            slots,
        }
    }
}

impl Optimizer for AdamW {
    fn step(&mut self) -> Result<()> {
        let c = &self.config;
        let (beta1, beta2) = c.betas;
        let _guard = tch::no_grad_guard();
        for (gi, group) in self.groups.iter().enumerate() {
            let lr = group.lr;
            for (pi, p) in group.params.iter().enumerate() {
                let mut p = p.shallow_clone();
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let grad = if c.maximize { -g } else { g };
                let st = self.slots.slots[gi][pi].get_or_insert_with(|| {
                    let mut s = Slot::default();
                    s.tensors.insert("exp_avg".into(), p.zeros_like());
                    s.tensors.insert("exp_avg_sq".into(), p.zeros_like());
                    if c.amsgrad {
                        s.tensors.insert("max_exp_avg_sq".into(), p.zeros_like());
                    }
                    s
                });
                st.step += 1;
                let step = st.step as f64;
                // decoupled weight decay before the moments, as torch does
                let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                let _ = st.get("exp_avg").lerp_(&grad, 1.0 - beta1);
                let _ = st
                    .get("exp_avg_sq")
                    .g_mul_scalar_(beta2)
                    .g_add_(&(&grad * &grad).g_mul_scalar(1.0 - beta2));
                let bias_correction1 = 1.0 - beta1.powf(step);
                let bias_correction2 = 1.0 - beta2.powf(step);
                let step_size = lr / bias_correction1;
                let second = if c.amsgrad {
                    let v = st.get("exp_avg_sq").shallow_clone();
                    let m = st.get("max_exp_avg_sq").maximum(&v);
                    st.get("max_exp_avg_sq").copy_(&m);
                    m
                } else {
                    st.get("exp_avg_sq").shallow_clone()
                };
                let denom = second
                    .sqrt()
                    .g_div_scalar(bias_correction2.sqrt())
                    .g_add_scalar(c.eps);
                let upd = (&*st.get("exp_avg") / &denom).g_mul_scalar(step_size);
                let _ = p.g_sub_(&upd);
            }
        }
        Ok(())
    }

    crate::optimizer_group_methods!();

    fn class_name(&self) -> String {
        "torch.optim.adamw.AdamW".to_string()
    }
}
