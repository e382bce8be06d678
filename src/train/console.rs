//! sd-scripts' console output for a training run (spec: sdscripts_cli_data.md §4.2, §4.3):
//! the fixed lines, the tqdm-style "steps" progress bar with its `avr_loss=` postfix, and the
//! LossRecorder moving average behind it.
use indicatif::{ProgressBar, ProgressState, ProgressStyle};

/// `train_util.LossRecorder`: epoch 0 appends every micro-batch loss; later epochs overwrite
/// slot `step` (the micro-batch index within the epoch). The average is over the list.
#[derive(Debug, Clone, Default)]
pub struct LossRecorder {
    pub loss_list: Vec<f64>,
    pub loss_total: f64,
}

impl LossRecorder {
    pub fn add(&mut self, epoch: i64, step: usize, loss: f64) {
        if epoch == 0 {
            self.loss_list.push(loss);
        } else {
            while self.loss_list.len() <= step {
                self.loss_list.push(0.0);
            }
            self.loss_total -= self.loss_list[step];
            self.loss_list[step] = loss;
        }
        self.loss_total += loss;
    }

    pub fn moving_average(&self) -> f64 {
        if self.loss_list.is_empty() {
            0.0
        } else {
            self.loss_total / self.loss_list.len() as f64
        }
    }
}

/// Python's `'{0:.3g}'.format(v)`.
pub fn py_format_g3(v: f64) -> String {
    if v.is_nan() {
        return "nan".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf" } else { "-inf" }.into();
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0" } else { "0" }.into();
    }
    // round to 3 significant digits first; the exponent after rounding picks the style
    let sci = format!("{:.2e}", v);
    let (mant, exp) = sci.split_once('e').expect("exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let strip = |s: String| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if (-4..3).contains(&exp) {
        let decimals = (2 - exp).max(0) as usize;
        strip(format!("{:.*}", decimals, v))
    } else {
        let m = strip(mant.to_string());
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{m}e{sign}{:02}", exp.abs())
    }
}

/// tqdm's `format_num`: the shorter of `{:.3g}` (with "+0"/"-0" squeezed) and `str(v)`.
pub fn tqdm_format_num(v: f64) -> String {
    let f = py_format_g3(v).replace("+0", "+").replace("-0", "-");
    let n = crate::train::args::py_float_repr(v);
    if f.len() < n.len() {
        f
    } else {
        n
    }
}

/// The counts printed before training.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub num_train_images: i64,
    pub num_validation_images: i64,
    pub num_reg_images: i64,
    pub batches_per_epoch: i64,
    pub num_epochs: i64,
    /// One per dataset.
    pub batch_sizes: Vec<i64>,
    pub gradient_accumulation_steps: i64,
    pub max_train_steps: i64,
}

/// The "running training / 学習開始" block, line by line (stdout).
pub fn running_training_lines(s: &RunSummary) -> Vec<String> {
    let bs: Vec<String> = s.batch_sizes.iter().map(|b| b.to_string()).collect();
    vec![
        "running training / 学習開始".to_string(),
        format!(
            "  num train images * repeats / 学習画像の数×繰り返し回数: {}",
            s.num_train_images
        ),
        format!(
            "  num validation images * repeats / 学習画像の数×繰り返し回数: {}",
            s.num_validation_images
        ),
        format!("  num reg images / 正則化画像の数: {}", s.num_reg_images),
        format!(
            "  num batches per epoch / 1epochのバッチ数: {}",
            s.batches_per_epoch
        ),
        format!("  num epochs / epoch数: {}", s.num_epochs),
        format!("  batch size per device / バッチサイズ: {}", bs.join(", ")),
        format!(
            "  gradient accumulation steps / 勾配を合計するステップ数 = {}",
            s.gradient_accumulation_steps
        ),
        format!(
            "  total optimization steps / 学習ステップ数: {}",
            s.max_train_steps
        ),
    ]
}

/// "\nepoch {e}/{E}\n" (e 1-based), printed with print's own newline after it.
pub fn epoch_line(epoch: i64, num_epochs: i64) -> String {
    format!("\nepoch {epoch}/{num_epochs}\n")
}

/// "epoch is incremented. current_epoch: {old}, epoch: {new}" (collate-time log line).
pub fn epoch_incremented_line(old: i64, new: i64) -> String {
    format!("epoch is incremented. current_epoch: {old}, epoch: {new}")
}

/// tqdm's `format_interval`: "MM:SS", or "H:MM:SS" from one hour.
pub fn tqdm_interval(secs: f64) -> String {
    let t = secs.max(0.0) as u64;
    let (h, m, s) = (t / 3600, (t % 3600) / 60, t % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m:02}:{s:02}")
    }
}

/// tqdm's rate: "{:.2f}it/s", or "{:.2f}s/it" below one iteration per second.
pub fn tqdm_rate(per_sec: f64) -> String {
    if per_sec <= 0.0 || !per_sec.is_finite() {
        "?it/s".to_string()
    } else if per_sec >= 1.0 {
        format!("{per_sec:.2}it/s")
    } else {
        format!("{:.2}s/it", 1.0 / per_sec)
    }
}

/// The "steps" bar on stderr: advanced once per optimizer step, postfix updated every
/// micro-batch. Layout as tqdm: `steps:  10%|█▌   | 61/610 [00:30<04:30,  2.03it/s, avr_loss=0.123]`.
pub struct StepsBar {
    pub bar: ProgressBar,
}

impl StepsBar {
    pub fn new(total: u64) -> Self {
        let style = ProgressStyle::with_template(
            "{prefix}: {percent:>3}%|{bar:10}| {pos}/{len} [{tq_elapsed}<{tq_eta}, {tq_rate}{msg}]",
        )
        .expect("static template")
        .with_key(
            "tq_elapsed",
            |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&tqdm_interval(s.elapsed().as_secs_f64()));
            },
        )
        .with_key(
            "tq_eta",
            |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&tqdm_interval(s.eta().as_secs_f64()));
            },
        )
        .with_key(
            "tq_rate",
            |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                // tqdm smoothing=0: overall average rate
                let el = s.elapsed().as_secs_f64();
                let rate = if el > 0.0 { s.pos() as f64 / el } else { 0.0 };
                let _ = write!(w, "{:>6}", tqdm_rate(rate));
            },
        )
        .progress_chars("█▉▊▋▌▍▎▏ ");
        let bar = ProgressBar::new(total)
            .with_style(style)
            .with_prefix("steps");
        StepsBar { bar }
    }

    /// One optimizer step done.
    pub fn inc(&self) {
        self.bar.inc(1);
    }

    /// `set_postfix(avr_loss=...)`.
    pub fn set_avr_loss(&self, avr_loss: f64) {
        self.bar
            .set_message(format!(", avr_loss={}", tqdm_format_num(avr_loss)));
    }

    /// Prints a line above the bar (sd-scripts' prints interleave with tqdm the same way).
    /// Prints a line above the bar (stdout, as sd-scripts' `accelerator.print`). indicatif drops
    /// `println` when the bar is hidden (output not a terminal), so print directly then.
    pub fn println(&self, line: &str) {
        if self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    pub fn finish(&self) {
        self.bar.finish();
    }
}
