//! The optimizer contract shared by every optimizer the trainer can build
//! (spec: sdscripts_cli_data.md §1.5, §1.6; torch.optim semantics).
//!
//! Parameters are plain tch tensors with `requires_grad`; the training loop runs backward, the
//! optimizer reads `p.grad()` and updates `p` in place under `no_grad`. A parameter whose grad is
//! undefined is skipped, as torch does for `grad is None`.
use anyhow::Result;
use tch::Tensor;

/// One parameter group, as LoRANetwork.prepare_optimizer_params hands them to torch
/// (e.g. "textencoder" then "unet").
pub struct ParamGroup {
    /// Description used for logging keys such as `lr/unet` (sd-scripts' `lr_descriptions`).
    pub name: String,
    pub params: Vec<Tensor>,
    /// Current learning rate of the group (the scheduler overwrites it through `set_lr`).
    pub lr: f64,
}

impl ParamGroup {
    pub fn new(name: impl Into<String>, params: Vec<Tensor>, lr: f64) -> Self {
        ParamGroup {
            name: name.into(),
            params,
            lr,
        }
    }
}

/// The interface the training loop uses; every optimizer (AdamW, AdamW8bit, Lion, SGD, Adafactor)
/// implements it.
pub trait Optimizer {
    /// One update of every parameter that has a gradient, with each group's current lr.
    fn step(&mut self) -> Result<()>;
    /// Zeroes every parameter's gradient (torch's `zero_grad(set_to_none=True)` is equivalent
    /// arithmetically for the next backward, which accumulates into zero).
    fn zero_grad(&mut self);
    /// Sets the learning rate of group `group` (scheduler output: base_lr × λ(s)).
    fn set_lr(&mut self, group: usize, lr: f64);
    /// Current learning rate of group `group`.
    fn lr(&self, group: usize) -> f64;
    /// Number of parameter groups.
    fn num_groups(&self) -> usize;
    /// Every state tensor, named `state.{i}.{key}` with `i` the parameter's index counted over
    /// all groups in order (torch's `state_dict()` numbering), plus scalars such as the step count.
    fn state_tensors(&self) -> Vec<(String, Tensor)>;
    /// Restores what `state_tensors` returned; errors name the missing or mismatched key.
    fn load_state_tensors(&mut self, tensors: &[(String, Tensor)]) -> Result<()>;
    /// Class path recorded in metadata (`ss_optimizer`), e.g. "torch.optim.adamw.AdamW".
    fn class_name(&self) -> String;
}

/// Looks a state tensor up by name; the error names the key so a corrupt state dir is diagnosable.
pub fn find_state<'a>(tensors: &'a [(String, Tensor)], key: &str) -> Result<&'a Tensor> {
    tensors
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, t)| t)
        .ok_or_else(|| anyhow::anyhow!("optimizer state: missing tensor `{key}`"))
}

/// Per-parameter optimizer state: a step count and named tensors (e.g. `exp_avg`).
#[derive(Default)]
pub struct Slot {
    pub step: i64,
    pub tensors: std::collections::BTreeMap<String, Tensor>,
}

impl Slot {
    pub fn get(&mut self, key: &str) -> &mut Tensor {
        self.tensors
            .get_mut(key)
            .unwrap_or_else(|| panic!("optimizer slot `{key}` not initialised"))
    }
}

/// State of every parameter of every group, in torch's numbering (index over all groups).
/// `None` until the parameter's first update, as torch's lazily filled `state`.
pub struct Slots {
    pub slots: Vec<Vec<Option<Slot>>>,
}

impl Slots {
    pub fn new(groups: &[ParamGroup]) -> Self {
        Slots {
            slots: groups
                .iter()
                .map(|g| g.params.iter().map(|_| None).collect())
                .collect(),
        }
    }

    /// `state.{i}.step` and `state.{i}.{key}` for every initialised parameter.
    pub fn to_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (idx, slot) in self.slots.iter().flatten().enumerate() {
            if let Some(s) = slot {
                out.push((format!("state.{idx}.step"), Tensor::from(s.step as f64)));
                for (k, t) in &s.tensors {
                    out.push((format!("state.{idx}.{k}"), t.shallow_clone()));
                }
            }
        }
        out
    }

    /// Restores state from `to_tensors` output; tensors are copied onto each parameter's device
    /// and kind of the saved tensor. A parameter without `state.{i}.step` has no state.
    pub fn load(&mut self, groups: &[ParamGroup], tensors: &[(String, Tensor)]) -> Result<()> {
        let mut idx = 0usize;
        for (gi, g) in groups.iter().enumerate() {
            for (pi, p) in g.params.iter().enumerate() {
                let prefix = format!("state.{idx}.");
                idx += 1;
                let step_key = format!("{prefix}step");
                let Ok(step) = find_state(tensors, &step_key) else {
                    self.slots[gi][pi] = None;
                    continue;
                };
                let mut slot = Slot {
                    step: step.double_value(&[]) as i64,
                    ..Default::default()
                };
                for (k, t) in tensors {
                    if let Some(name) = k.strip_prefix(&prefix) {
                        if name != "step" {
                            let t = t.to_device(p.device()).detach().copy();
                            slot.tensors.insert(name.to_string(), t);
                        }
                    }
                }
                self.slots[gi][pi] = Some(slot);
            }
        }
        Ok(())
    }
}

/// Shared `zero_grad` over groups.
pub fn zero_grads(groups: &mut [ParamGroup]) {
    for g in groups.iter_mut() {
        for p in g.params.iter_mut() {
            p.zero_grad();
        }
    }
}

/// The trait methods that only touch `self.groups` and `self.slots`; every optimizer with those
/// two fields expands this inside its `impl Optimizer`.
#[macro_export]
macro_rules! optimizer_group_methods {
    () => {
        fn zero_grad(&mut self) {
            $crate::train::optim::common::zero_grads(&mut self.groups);
        }
        fn set_lr(&mut self, group: usize, lr: f64) {
            self.groups[group].lr = lr;
        }
        fn lr(&self, group: usize) -> f64 {
            self.groups[group].lr
        }
        fn num_groups(&self) -> usize {
            self.groups.len()
        }
        fn state_tensors(&self) -> Vec<(String, tch::Tensor)> {
            self.slots.to_tensors()
        }
        fn load_state_tensors(&mut self, tensors: &[(String, tch::Tensor)]) -> anyhow::Result<()> {
            self.slots.load(&self.groups, tensors)
        }
    };
}
