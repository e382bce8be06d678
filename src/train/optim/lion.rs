//! `lion_pytorch.Lion` (0.2.x): sign of the interpolated momentum, decoupled-style weight decay
//! `p *= 1 - lr*wd` (spec: sdscripts_cli_data.md §1.5).
use super::common::{Optimizer, ParamGroup, Slot, Slots};
use anyhow::Result;

#[derive(Debug, Clone, PartialEq)]
pub struct LionConfig {
    pub betas: (f64, f64),
    pub weight_decay: f64,
    /// lion-pytorch's `decoupled_weight_decay`: wd is divided by the constructor lr.
    pub decoupled_weight_decay: bool,
}

impl Default for LionConfig {
    fn default() -> Self {
        LionConfig {
            betas: (0.9, 0.99),
            weight_decay: 0.0,
            decoupled_weight_decay: false,
        }
    }
}

pub struct Lion {
    pub groups: Vec<ParamGroup>,
    pub config: LionConfig,
    /// The constructor lr (`--learning_rate`), used by decoupled weight decay.
    pub init_lr: f64,
    slots: Slots,
}

impl Lion {
    pub fn new(groups: Vec<ParamGroup>, init_lr: f64, config: LionConfig) -> Result<Self> {
        if init_lr <= 0.0 {
            anyhow::bail!("Lion requires a learning rate > 0 (got {init_lr})");
        }
        let slots = Slots::new(&groups);
        Ok(Lion {
            groups,
            config,
            init_lr,
            slots,
        })
    }
}

impl Optimizer for Lion {
    fn step(&mut self) -> Result<()> {
        let c = &self.config;
        let (beta1, beta2) = c.betas;
        let _guard = tch::no_grad_guard();
        for (gi, group) in self.groups.iter().enumerate() {
            let lr = group.lr;
            let wd = if c.decoupled_weight_decay {
                c.weight_decay / self.init_lr
            } else {
                c.weight_decay
            };
            for (pi, p) in group.params.iter().enumerate() {
                let mut p = p.shallow_clone();
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                let st = self.slots.slots[gi][pi].get_or_insert_with(|| {
                    let mut s = Slot::default();
                    s.tensors.insert("exp_avg".into(), p.zeros_like());
                    s
                });
                st.step += 1;
                let _ = p.g_mul_scalar_(1.0 - lr * wd);
                let exp_avg = st.get("exp_avg");
                let update = (exp_avg.g_mul_scalar(beta1) + grad.g_mul_scalar(1.0 - beta1)).sgn();
                let _ = p.g_sub_(&update.g_mul_scalar(lr));
                let _ = exp_avg
                    .g_mul_scalar_(beta2)
                    .g_add_(&grad.g_mul_scalar(1.0 - beta2));
            }
        }
        Ok(())
    }

    crate::optimizer_group_methods!();

    fn class_name(&self) -> String {
        "lion_pytorch.lion_pytorch.Lion".to_string()
    }
}
