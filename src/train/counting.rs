//! Step and epoch counting (spec: sdscripts_cli_data.md §4.1, §5.3;
//! `NetworkTrainer.train`): everything derived from the number of batches per epoch.
use anyhow::{bail, Result};

/// ceil(a / b) for positive b, as Python's `math.ceil(a / b)` for the sizes involved.
fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1).div_euclid(b)
}

/// `max_train_steps`: `--max_train_epochs × ceil(L / P / GA)` when epochs are given, else
/// `--max_train_steps`. `batches` is L = len(train_dataloader) before prepare.
pub fn max_train_steps(
    max_train_epochs: Option<i64>,
    max_train_steps: i64,
    batches: i64,
    num_processes: i64,
    grad_accum: i64,
) -> i64 {
    match max_train_epochs {
        Some(e) => e * ceil_div(ceil_div(batches, num_processes), grad_accum),
        None => max_train_steps,
    }
}

/// "override steps. steps for {E} epochs is / 指定エポックまでのステップ数: {S}"
pub fn override_steps_line(epochs: i64, steps: i64) -> String {
    format!("override steps. steps for {epochs} epochs is / 指定エポックまでのステップ数: {steps}")
}

/// ceil(len(prepared loader) / GA).
pub fn num_update_steps_per_epoch(batches_per_epoch: i64, grad_accum: i64) -> i64 {
    ceil_div(batches_per_epoch, grad_accum)
}

/// ceil(max_train_steps / num_update_steps_per_epoch).
pub fn num_train_epochs(max_train_steps: i64, update_steps_per_epoch: i64) -> i64 {
    ceil_div(max_train_steps, update_steps_per_epoch)
}

/// `--save_n_epoch_ratio`: floor(num_epochs / ratio) or 1.
pub fn save_every_n_epochs_from_ratio(num_train_epochs: i64, ratio: i64) -> i64 {
    let v = (num_train_epochs as f64 / ratio as f64).floor() as i64;
    if v == 0 {
        1
    } else {
        v
    }
}

/// Where a (resumed) run starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartPoint {
    /// First epoch index (0-based) of the epoch loop.
    pub epoch_to_start: i64,
    /// Micro-batches to skip in the first epoch (only with `--skip_until_initial_step`).
    pub skip_batches: i64,
    /// global_step at the start of the loop.
    pub global_step: i64,
    /// tqdm total: max_train_steps − initial_step.
    pub progress_total: i64,
    /// Log lines sd-scripts prints on the way.
    pub logs: Vec<String>,
}

/// sd-scripts' initial-step logic (`--initial_step`, `--initial_epoch`, the state's step,
/// `--skip_until_initial_step`).
#[allow(clippy::too_many_arguments)]
pub fn start_point(
    initial_epoch: Option<i64>,
    initial_step_arg: Option<i64>,
    steps_from_state: Option<i64>,
    skip_until_initial_step: bool,
    resuming: bool,
    max_train_steps: i64,
    batches: i64,
    num_processes: i64,
    grad_accum: i64,
) -> Result<StartPoint> {
    let mut logs = Vec::new();
    let mut initial_step = 0;
    if initial_epoch.is_some() || initial_step_arg.is_some() {
        if steps_from_state.is_some() {
            logs.push("steps from the state is ignored because initial_step is specified / initial_stepが指定されているため、stateからのステップ数は無視されます".to_string());
        }
        initial_step = match initial_step_arg {
            Some(s) => s,
            None => {
                (initial_epoch.unwrap_or(1) - 1)
                    * ceil_div(ceil_div(batches, num_processes), grad_accum)
            }
        };
    } else if let Some(s) = steps_from_state {
        initial_step = s;
    }
    if initial_step > 0 && max_train_steps <= initial_step {
        bail!("max_train_steps should be greater than initial step / max_train_stepsは初期ステップより大きい必要があります: {max_train_steps} vs {initial_step}");
    }
    let upe = ceil_div(batches, grad_accum);
    let mut epoch_to_start = 0;
    let mut progress_initial = 0;
    let mut skip_batches = 0;
    let mut global_step = 0;
    if initial_step > 0 {
        if skip_until_initial_step {
            if !resuming {
                logs.push("initial_step is specified but not resuming. lr scheduler will be started from the beginning / initial_stepが指定されていますがresumeしていないため、lr schedulerは最初から始まります".to_string());
            }
            logs.push(format!(
                "skipping {initial_step} steps / {initial_step}ステップをスキップします"
            ));
            let mut micro = initial_step * grad_accum;
            epoch_to_start = micro / upe;
            for e in 0..epoch_to_start {
                logs.push(format!(
                    "skipping epoch {} because initial_step (multiplied) is {micro}",
                    e + 1
                ));
                micro -= batches;
            }
            skip_batches = micro;
            // sd-scripts sets global_step and the bar total from the remaining micro-batch count
            global_step = micro;
            progress_initial = micro;
        } else {
            epoch_to_start = initial_step / upe;
        }
    }
    Ok(StartPoint {
        epoch_to_start,
        skip_batches,
        global_step,
        progress_total: max_train_steps - progress_initial,
        logs,
    })
}
