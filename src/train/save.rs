//! Output names and the save / remove schedule (spec: sdscripts_cli_data.md §5.1, §5.3):
//! pure functions of the arguments and counters, so the loop only performs what they return.
use std::path::{Path, PathBuf};

const DEFAULT_EPOCH_NAME: &str = "epoch";
const DEFAULT_STEP_NAME: &str = "at";
const DEFAULT_LAST_OUTPUT_NAME: &str = "last";

/// The saving options, copied from the arguments.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SavePlan {
    pub output_name: Option<String>,
    /// `--save_model_as` ("safetensors", "ckpt" or "pt"); the extension of every file.
    pub save_model_as: String,
    pub save_every_n_epochs: Option<i64>,
    pub save_every_n_steps: Option<i64>,
    pub save_last_n_epochs: Option<i64>,
    pub save_last_n_epochs_state: Option<i64>,
    pub save_last_n_steps: Option<i64>,
    pub save_last_n_steps_state: Option<i64>,
    pub save_state: bool,
    pub save_state_on_train_end: bool,
}

/// Python's `"{:06d}".format(n)` (a minus sign counts in the width).
fn zpad(n: i64, width: usize) -> String {
    if n < 0 {
        format!("-{:0>w$}", -n, w = width.saturating_sub(1))
    } else {
        format!("{n:0>width$}")
    }
}

/// Python's `%` for a positive divisor (result has the divisor's sign).
fn py_mod(a: i64, b: i64) -> i64 {
    a.rem_euclid(b)
}

/// What to do after an optimizer step or at an epoch end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SaveActions {
    /// LoRA file to write (name inside output_dir).
    pub save: Option<String>,
    /// State directory to write (with `--save_state`).
    pub save_state: Option<String>,
    /// Older LoRA file to remove if it exists.
    pub remove: Option<String>,
    /// Older state directory to remove if it exists.
    pub remove_state: Option<String>,
}

impl SavePlan {
    fn ext(&self) -> String {
        format!(".{}", self.save_model_as)
    }

    /// `{name}-{epoch:06d}.{ext}` (name defaults to "epoch").
    pub fn epoch_ckpt_name(&self, epoch: i64) -> String {
        let n = self.output_name.as_deref().unwrap_or(DEFAULT_EPOCH_NAME);
        format!("{n}-{}{}", zpad(epoch, 6), self.ext())
    }

    /// `{name}-step{step:08d}.{ext}` (name defaults to "at").
    pub fn step_ckpt_name(&self, step: i64) -> String {
        let n = self.output_name.as_deref().unwrap_or(DEFAULT_STEP_NAME);
        format!("{n}-step{}{}", zpad(step, 8), self.ext())
    }

    /// `{name}.{ext}` (name defaults to "last").
    pub fn last_ckpt_name(&self) -> String {
        let n = self
            .output_name
            .as_deref()
            .unwrap_or(DEFAULT_LAST_OUTPUT_NAME);
        format!("{n}{}", self.ext())
    }

    /// `{name}-{epoch:06d}-state`.
    pub fn epoch_state_name(&self, epoch: i64) -> String {
        let n = self.output_name.as_deref().unwrap_or(DEFAULT_EPOCH_NAME);
        format!("{n}-{}-state", zpad(epoch, 6))
    }

    /// `{name}-step{step:08d}-state`.
    pub fn step_state_name(&self, step: i64) -> String {
        let n = self.output_name.as_deref().unwrap_or(DEFAULT_STEP_NAME);
        format!("{n}-step{}-state", zpad(step, 8))
    }

    /// `{name}-state`.
    pub fn last_state_name(&self) -> String {
        let n = self
            .output_name
            .as_deref()
            .unwrap_or(DEFAULT_LAST_OUTPUT_NAME);
        format!("{n}-state")
    }

    /// `get_remove_epoch_no`: epoch − every × last_n, if ≥ 0.
    pub fn remove_epoch_no(&self, epoch: i64) -> Option<i64> {
        let last = self.save_last_n_epochs?;
        let r = epoch - self.save_every_n_epochs.unwrap_or(0) * last;
        (r >= 0).then_some(r)
    }

    /// `get_remove_step_no`: r = step − last_n − 1, rounded down to a multiple of every, if ≥ 0.
    pub fn remove_step_no(&self, step: i64) -> Option<i64> {
        let last = self.save_last_n_steps?;
        let every = self.save_every_n_steps?;
        let r = step - last - 1;
        let r = r - py_mod(r, every);
        (r >= 0).then_some(r)
    }

    /// After epoch `epoch` (1-based) of `num_epochs`: saved when `epoch % every == 0` and it is
    /// not the last epoch (the last one is the final file).
    pub fn on_epoch_end(&self, epoch: i64, num_epochs: i64) -> SaveActions {
        let mut a = SaveActions::default();
        let Some(every) = self.save_every_n_epochs else {
            return a;
        };
        if every == 0 || epoch % every != 0 || epoch >= num_epochs {
            return a;
        }
        a.save = Some(self.epoch_ckpt_name(epoch));
        a.remove = self.remove_epoch_no(epoch).map(|r| self.epoch_ckpt_name(r));
        if self.save_state {
            a.save_state = Some(self.epoch_state_name(epoch));
            // state dirs: save_last_n_epochs_state if set (and non-zero), else save_last_n_epochs
            let last = self
                .save_last_n_epochs_state
                .filter(|v| *v != 0)
                .or(self.save_last_n_epochs);
            if let Some(last) = last {
                let r = epoch - every * last;
                a.remove_state = Some(self.epoch_state_name(r));
            }
        }
        a
    }

    /// After the optimizer step that made `global_step`: saved when it is a multiple of
    /// `--save_every_n_steps` (the last step too).
    pub fn on_step(&self, global_step: i64) -> SaveActions {
        let mut a = SaveActions::default();
        let Some(every) = self.save_every_n_steps else {
            return a;
        };
        if every == 0 || global_step % every != 0 {
            return a;
        }
        a.save = Some(self.step_ckpt_name(global_step));
        if self.save_state {
            a.save_state = Some(self.step_state_name(global_step));
            let last = self
                .save_last_n_steps_state
                .filter(|v| *v != 0)
                .or(self.save_last_n_steps);
            if let Some(last) = last {
                let r = global_step - last - 1;
                let r = r - py_mod(r, every);
                if r > 0 {
                    a.remove_state = Some(self.step_state_name(r));
                }
            }
        }
        a.remove = self
            .remove_step_no(global_step)
            .map(|r| self.step_ckpt_name(r));
        a
    }

    /// At the end: the final file, and the final state with `--save_state` or
    /// `--save_state_on_train_end`.
    pub fn on_train_end(&self) -> SaveActions {
        SaveActions {
            save: Some(self.last_ckpt_name()),
            save_state: (self.save_state || self.save_state_on_train_end)
                .then(|| self.last_state_name()),
            remove: None,
            remove_state: None,
        }
    }
}

/// `os.path.join(output_dir, name)`.
pub fn output_path(output_dir: &Path, name: &str) -> PathBuf {
    output_dir.join(name)
}

/// "\nsaving checkpoint: {path}"
pub fn saving_line(path: &Path) -> String {
    format!("\nsaving checkpoint: {}", path.display())
}

/// "removing old checkpoint: {path}"
pub fn removing_line(path: &Path) -> String {
    format!("removing old checkpoint: {}", path.display())
}

/// sd-scripts' `train_state.json` content: `{"current_epoch": E, "current_step": S}`.
pub fn train_state_json(current_epoch: i64, current_step: i64) -> String {
    format!("{{\"current_epoch\": {current_epoch}, \"current_step\": {current_step}}}")
}

/// Reads `current_step` from a state dir's `train_state.json` (`steps_from_state`).
pub fn read_train_state(dir: &Path) -> anyhow::Result<(i64, i64)> {
    let path = dir.join("train_state.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} is not JSON: {e}", path.display()))?;
    let get = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_i64())
            .ok_or_else(|| anyhow::anyhow!("{}: missing integer `{k}`", path.display()))
    };
    Ok((get("current_epoch")?, get("current_step")?))
}
