//! `torch.optim.SGD` with nesterov=True, as sd-scripts builds "SGDNesterov" (momentum 0.9 added
//! when absent; spec: sdscripts_cli_data.md §1.5).
use super::common::{Optimizer, ParamGroup, Slot, Slots};
use anyhow::Result;

#[derive(Debug, Clone, PartialEq)]
pub struct SgdConfig {
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub maximize: bool,
}

impl Default for SgdConfig {
    /// sd-scripts' SGDNesterov: nesterov=True, momentum 0.9, torch defaults otherwise.
    fn default() -> Self {
        SgdConfig {
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: true,
            maximize: false,
        }
    }
}

pub struct Sgd {
    pub groups: Vec<ParamGroup>,
    pub config: SgdConfig,
    slots: Slots,
}

impl Sgd {
    pub fn new(groups: Vec<ParamGroup>, config: SgdConfig) -> Result<Self> {
        // torch's own constructor check
        if config.nesterov && (config.momentum <= 0.0 || config.dampening != 0.0) {
            anyhow::bail!("Nesterov momentum requires a momentum and zero dampening");
        }
        let slots = Slots::new(&groups);
        Ok(Sgd {
            groups,
            config,
            slots,
        })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self) -> Result<()> {
        let c = &self.config;
        let _guard = tch::no_grad_guard();
        for (gi, group) in self.groups.iter().enumerate() {
            let lr = group.lr;
            for (pi, p) in group.params.iter().enumerate() {
                let mut p = p.shallow_clone();
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut d_p = if c.maximize { -g } else { g };
                if c.weight_decay != 0.0 {
                    d_p = &d_p + p.g_mul_scalar(c.weight_decay);
                }
                if c.momentum != 0.0 {
                    let slot = &mut self.slots.slots[gi][pi];
                    let buf = match slot {
                        None => {
                            // torch: the first buffer is a detached copy of d_p, no dampening
                            let mut s = Slot::default();
                            s.tensors
                                .insert("momentum_buffer".into(), d_p.detach().copy());
                            slot.insert(s).get("momentum_buffer").shallow_clone()
                        }
                        Some(s) => {
                            let mut b = s.get("momentum_buffer").shallow_clone();
                            let _ = b
                                .g_mul_scalar_(c.momentum)
                                .g_add_(&d_p.g_mul_scalar(1.0 - c.dampening));
                            b
                        }
                    };
                    d_p = if c.nesterov {
                        &d_p + buf.g_mul_scalar(c.momentum)
                    } else {
                        buf
                    };
                }
                let _ = p.g_sub_(&d_p.g_mul_scalar(lr));
            }
        }
        Ok(())
    }

    crate::optimizer_group_methods!();

    fn class_name(&self) -> String {
        "torch.optim.sgd.SGD".to_string()
    }
}
