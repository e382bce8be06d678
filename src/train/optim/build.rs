//! From `--optimizer_type` / `--optimizer_args` to an optimizer over the network's parameter
//! groups, as sd-scripts' `get_optimizer` (spec: sdscripts_cli_data.md §1.5).
use super::adafactor::{Adafactor, AdafactorConfig};
use super::adamw::{AdamW, AdamWConfig};
use super::common::{Optimizer, ParamGroup};
use super::lion::{Lion, LionConfig};
use super::optimizer_args::{kwargs_repr, parse_kwargs, PyValue};
use super::sgd::{Sgd, SgdConfig};
use anyhow::{bail, Result};

/// The optimizers sdlora implements, by sd-scripts' lower-cased `--optimizer_type` name.
pub const SUPPORTED: &[&str] = &["AdamW", "AdamW8bit", "Lion", "SGDNesterov", "AdaFactor"];

/// The resolved optimizer kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    AdamW,
    AdamW8bit,
    Lion,
    SgdNesterov,
    Adafactor,
}

/// Applies sd-scripts' deprecated aliases and conflict checks, then matches case-insensitively.
pub fn resolve_kind(
    optimizer_type: &str,
    use_8bit_adam: bool,
    use_lion_optimizer: bool,
) -> Result<OptimizerKind> {
    let mut name = optimizer_type.to_string();
    if use_8bit_adam {
        if use_lion_optimizer {
            bail!("both option use_8bit_adam and use_lion_optimizer are specified / use_8bit_adamとuse_lion_optimizerの両方のオプションが指定されています");
        }
        if !name.is_empty() {
            bail!("both option use_8bit_adam and optimizer_type are specified / use_8bit_adamとoptimizer_typeの両方のオプションが指定されています");
        }
        name = "AdamW8bit".into();
    } else if use_lion_optimizer {
        if !name.is_empty() {
            bail!("both option use_lion_optimizer and optimizer_type are specified / use_lion_optimizerとoptimizer_typeの両方のオプションが指定されています");
        }
        name = "Lion".into();
    }
    if name.is_empty() {
        name = "AdamW".into();
    }
    Ok(match name.to_lowercase().as_str() {
        "adamw" => OptimizerKind::AdamW,
        "adamw8bit" => OptimizerKind::AdamW8bit,
        "lion" => OptimizerKind::Lion,
        "sgdnesterov" => OptimizerKind::SgdNesterov,
        "adafactor" => OptimizerKind::Adafactor,
        _ => bail!(
            "--optimizer_type {optimizer_type}: not supported by sdlora; supported (case-insensitive): {}",
            SUPPORTED.join(", ")
        ),
    })
}

fn take_f64(kw: &mut Vec<(String, PyValue)>, key: &str) -> Result<Option<f64>> {
    let Some(pos) = kw.iter().position(|(k, _)| k == key) else {
        return Ok(None);
    };
    let (_, v) = kw.remove(pos);
    match v {
        PyValue::None => Ok(None),
        v => v.as_f64().map(Some).ok_or_else(|| {
            anyhow::anyhow!(
                "--optimizer_args {key}: expected a number, got {}",
                v.repr()
            )
        }),
    }
}

fn take_bool(kw: &mut Vec<(String, PyValue)>, key: &str) -> Option<bool> {
    let pos = kw.iter().position(|(k, _)| k == key)?;
    Some(kw.remove(pos).1.truthy())
}

fn take_pair(kw: &mut Vec<(String, PyValue)>, key: &str) -> Result<Option<(f64, f64)>> {
    let Some(pos) = kw.iter().position(|(k, _)| k == key) else {
        return Ok(None);
    };
    let (_, v) = kw.remove(pos);
    let pair = v
        .as_seq()
        .filter(|s| s.len() == 2)
        .and_then(|s| Some((s[0].as_f64()?, s[1].as_f64()?)));
    pair.map(Some).ok_or_else(|| {
        anyhow::anyhow!(
            "--optimizer_args {key}: expected two numbers like {key}=0.9,0.999, got {}",
            v.repr()
        )
    })
}

fn reject_rest(kw: &[(String, PyValue)], class: &str) -> Result<()> {
    if kw.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = kw.iter().map(|(k, _)| k.as_str()).collect();
    bail!(
        "--optimizer_args: {class} got unexpected keyword argument(s): {}",
        keys.join(", ")
    )
}

/// What the run logs and records about the optimizer.
#[derive(Debug, Clone)]
pub struct OptimizerInfo {
    pub kind: OptimizerKind,
    /// e.g. "use AdamW optimizer | {'weight_decay': 0.1}".
    pub log_line: String,
    /// `ss_optimizer`: class path plus `(k=v,...)` when args were given.
    pub metadata_name: String,
    /// sd-scripts sets lr_scheduler to "adafactor:{lr}" for relative-step Adafactor.
    pub forced_scheduler: Option<String>,
}

/// Builds the optimizer. `learning_rate` is `--learning_rate` (the constructor default lr).
pub fn build_optimizer(
    kind: OptimizerKind,
    optimizer_args: &[String],
    groups: Vec<ParamGroup>,
    learning_rate: f64,
) -> Result<(Box<dyn Optimizer>, OptimizerInfo)> {
    let mut kw = parse_kwargs(optimizer_args, "--optimizer_args")?;
    if kind == OptimizerKind::Adafactor && !kw.iter().any(|(k, _)| k == "relative_step") {
        // sd-scripts inserts the default into the kwargs it logs and records
        kw.push(("relative_step".into(), PyValue::Bool(true)));
    }
    let logged_kwargs = kw.clone();
    let args_str: Vec<String> = kw
        .iter()
        .map(|(k, v)| format!("{k}={}", v.py_str()))
        .collect();
    let mut forced_scheduler = None;
    let (opt, log_line): (Box<dyn Optimizer>, String) = match kind {
        OptimizerKind::AdamW => {
            let line = format!("use AdamW optimizer | {}", kwargs_repr(&kw));
            let mut c = AdamWConfig::default();
            if let Some(b) = take_pair(&mut kw, "betas")? {
                c.betas = b;
            }
            if let Some(v) = take_f64(&mut kw, "eps")? {
                c.eps = v;
            }
            if let Some(v) = take_f64(&mut kw, "weight_decay")? {
                c.weight_decay = v;
            }
            c.amsgrad = take_bool(&mut kw, "amsgrad").unwrap_or(false);
            c.maximize = take_bool(&mut kw, "maximize").unwrap_or(false);
            // torch-internal implementation switches that do not change the math
            for k in ["foreach", "fused", "capturable", "differentiable"] {
                take_bool(&mut kw, k);
            }
            reject_rest(&kw, "AdamW")?;
            (Box::new(AdamW::new(groups, c)), line)
        }
        OptimizerKind::Lion => {
            let line = format!("use Lion optimizer | {}", kwargs_repr(&kw));
            let mut c = LionConfig::default();
            if let Some(b) = take_pair(&mut kw, "betas")? {
                c.betas = b;
            }
            if let Some(v) = take_f64(&mut kw, "weight_decay")? {
                c.weight_decay = v;
            }
            c.decoupled_weight_decay =
                take_bool(&mut kw, "decoupled_weight_decay").unwrap_or(false);
            take_bool(&mut kw, "use_triton");
            reject_rest(&kw, "Lion")?;
            (Box::new(Lion::new(groups, learning_rate, c)?), line)
        }
        OptimizerKind::SgdNesterov => {
            let mut c = SgdConfig::default();
            let line = format!("use SGD with Nesterov optimizer | {}", kwargs_repr(&kw));
            if let Some(v) = take_f64(&mut kw, "momentum")? {
                c.momentum = v;
            }
            if let Some(v) = take_f64(&mut kw, "dampening")? {
                c.dampening = v;
            }
            if let Some(v) = take_f64(&mut kw, "weight_decay")? {
                c.weight_decay = v;
            }
            c.maximize = take_bool(&mut kw, "maximize").unwrap_or(false);
            for k in ["foreach", "fused", "differentiable"] {
                take_bool(&mut kw, k);
            }
            reject_rest(&kw, "SGD")?;
            (Box::new(Sgd::new(groups, c)?), line)
        }
        OptimizerKind::Adafactor => {
            let mut c = AdafactorConfig::default();
            if let Some(b) = take_bool(&mut kw, "relative_step") {
                c.relative_step = b;
            }
            c.warmup_init = take_bool(&mut kw, "warmup_init").unwrap_or(false);
            if !c.relative_step && c.warmup_init {
                // sd-scripts: "set relative_step to True because warmup_init is True"
                c.relative_step = true;
            }
            if let Some(v) = take_pair(&mut kw, "eps")? {
                c.eps = v;
            }
            if let Some(v) = take_f64(&mut kw, "clip_threshold")? {
                c.clip_threshold = v;
            }
            if let Some(v) = take_f64(&mut kw, "decay_rate")? {
                c.decay_rate = v;
            }
            c.beta1 = take_f64(&mut kw, "beta1")?;
            if let Some(v) = take_f64(&mut kw, "weight_decay")? {
                c.weight_decay = v;
            }
            if let Some(b) = take_bool(&mut kw, "scale_parameter") {
                c.scale_parameter = b;
            }
            reject_rest(&kw, "Adafactor")?;
            let line = format!("use Adafactor optimizer | {}", kwargs_repr(&logged_kwargs));
            let lr = if c.relative_step {
                // the lr only names the schedule; the update computes its own step size
                forced_scheduler = Some(format!(
                    "adafactor:{}",
                    crate::train::args::py_float_repr(learning_rate)
                ));
                None
            } else {
                Some(learning_rate)
            };
            (Box::new(Adafactor::new(groups, lr, c)?), line)
        }
        OptimizerKind::AdamW8bit => super::adamw8bit::build(&kw, groups, learning_rate)?,
    };
    let class = opt.class_name();
    let metadata_name = if args_str.is_empty() {
        class
    } else {
        format!("{class}({})", args_str.join(","))
    };
    Ok((
        opt,
        OptimizerInfo {
            kind,
            log_line,
            metadata_name,
            forced_scheduler,
        },
    ))
}
