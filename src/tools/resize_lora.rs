//! `sdlora resize_lora` — sd-scripts' `networks/resize_lora.py`: every module's delta
//! `up @ down` re-factored by SVD to `--new_rank` (`--new_conv_rank` for conv modules), or to the
//! rank a `--dynamic_method` picks, with the alpha that keeps the module's scale.
use super::lowrank::{self, Dynamic, RankChoice, Scale};
use super::{check_save_to, has_ext, parse_args, StateDict, PRECISIONS};
use anyhow::{bail, Context, Result};
use clap::Parser;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};

#[derive(Parser, Debug)]
#[command(
    name = "resize_lora",
    about = "Resize a LoRA to a new rank by SVD (sd-scripts networks/resize_lora.py)"
)]
pub struct Args {
    /// precision in saving: float (default), fp16, bf16
    #[arg(long = "save_precision", value_parser = PRECISIONS)]
    pub save_precision: Option<String>,
    /// rank of the output LoRA (the upper bound with --dynamic_method)
    #[arg(long = "new_rank", default_value_t = 4)]
    pub new_rank: i64,
    /// rank of conv modules (default: --new_rank)
    #[arg(long = "new_conv_rank")]
    pub new_conv_rank: Option<i64>,
    /// the output file: .safetensors, .ckpt, .pt or .pth
    #[arg(long = "save_to")]
    pub save_to: Option<PathBuf>,
    /// the LoRA to resize (.safetensors or .ckpt)
    #[arg(long = "model")]
    pub model: Option<PathBuf>,
    /// where to compute: cpu, cuda, cuda:N
    #[arg(long = "device")]
    pub device: Option<String>,
    /// print sd-scripts' per-module retention report
    #[arg(long = "verbose")]
    pub verbose: bool,
    /// sv_ratio, sv_fro or sv_cumulative
    #[arg(long = "dynamic_method", value_parser = ["sv_ratio", "sv_fro", "sv_cumulative"])]
    pub dynamic_method: Option<String>,
    /// the target of the dynamic method
    #[arg(long = "dynamic_param")]
    pub dynamic_param: Option<f64>,
}

/// The key suffix pairs resize_lora.py recognises: kohya, PEFT, ControlLoRA.
const DOWN_UP: [(&str, &str); 3] = [
    ("lora_down", "lora_up"),
    ("lora_A", "lora_B"),
    ("down", "up"),
];

pub fn run(argv: &[String]) -> Result<i32> {
    let Some(args) = parse_args::<Args>("resize_lora", argv)? else {
        return Ok(0);
    };
    let save_to = check_save_to("--save_to", args.save_to.as_ref())?;
    let ok_ext = ["ckpt", "pt", "pth", "safetensors"]
        .iter()
        .any(|e| has_ext(&save_to, e));
    if !ok_ext {
        bail!(
            "--save_to={}: must be a .ckpt, .pt, .pth or .safetensors file",
            save_to.display()
        );
    }
    let model = args
        .model
        .clone()
        .context("--model is required: the LoRA file to resize")?;
    if args.new_rank < 1 || args.new_conv_rank.is_some_and(|r| r < 1) {
        bail!("--new_rank/--new_conv_rank must be at least 1");
    }
    let dynamic = match (&args.dynamic_method, args.dynamic_param) {
        (None, _) => None,
        // sd-scripts: `if args.dynamic_method and not args.dynamic_param` (0 counts as missing)
        (Some(m), Some(p)) if p != 0.0 => Some(Dynamic::parse(m, p)?),
        (Some(m), _) => bail!("--dynamic_method={m} needs --dynamic_param (e.g. 0.9 for sv_fro)"),
    };
    let device = super::parse_device("--device", args.device.as_deref())?;
    let new_conv_rank = args.new_conv_rank.unwrap_or(args.new_rank);
    let save_kind = super::save_kind_or(args.save_precision.as_deref(), Kind::Float);

    eprintln!("loading Model...");
    let sd = StateDict::load(&model, Some(Kind::Float))?;
    eprintln!("Resizing Lora...");
    if let Some(d) = dynamic {
        eprintln!(
            "Dynamically determining new alphas and dims based off {}: {}, max rank is {}",
            args.dynamic_method.as_deref().unwrap_or_default(),
            match d {
                Dynamic::SvRatio(p) | Dynamic::SvFro(p) | Dynamic::SvCumulative(p) =>
                    crate::lora::metadata::py_float(p),
            },
            args.new_rank
        );
    }
    let out = resize(
        &sd,
        args.new_rank,
        new_conv_rank,
        dynamic,
        device,
        save_kind,
    )?;
    if out.modules == 0 {
        bail!(
            "{}: no LoRA modules (`<name>.lora_down.weight` + `<name>.lora_up.weight`) to resize",
            model.display()
        );
    }
    if args.verbose {
        println!("{}", out.report);
        let n = out.fro.len() as f64;
        let mean = out.fro.iter().sum::<f64>() / n;
        let std = (out.fro.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        println!(
            "Average Frobenius norm retention: {}% | std: {}",
            py_fixed(mean * 100.0, 2),
            py_fixed(std, 3)
        );
    }
    eprintln!("resizing complete");

    let mut metadata = sd.metadata.clone();
    let comment = metadata
        .get("ss_training_comment")
        .cloned()
        .unwrap_or_default();
    let old = out.max_old_rank;
    match (&args.dynamic_method, dynamic) {
        (Some(m), Some(d)) => {
            let p = match d {
                Dynamic::SvRatio(p) | Dynamic::SvFro(p) | Dynamic::SvCumulative(p) => p,
            };
            metadata.insert(
                "ss_training_comment".into(),
                format!(
                    "Dynamic resize with {m}: {} from {old}; {comment}",
                    crate::lora::metadata::py_float(p)
                ),
            );
            metadata.insert("ss_network_dim".into(), "Dynamic".into());
            metadata.insert("ss_network_alpha".into(), "Dynamic".into());
        }
        _ => {
            let conv_desc = if args.new_rank == new_conv_rank {
                String::new()
            } else {
                format!(" (conv: {new_conv_rank})")
            };
            metadata.insert(
                "ss_training_comment".into(),
                format!(
                    "dimension is resized from {old} to {}{conv_desc}; {comment}",
                    args.new_rank
                ),
            );
            metadata.insert("ss_network_dim".into(), args.new_rank.to_string());
            // the alpha of the last module resized, as a Python float
            metadata.insert(
                "ss_network_alpha".into(),
                crate::lora::metadata::py_float(out.last_alpha),
            );
        }
    }
    let (h, l) = super::sshs_hashes(&out.tensors, &metadata)?;
    metadata.insert("sshs_model_hash".into(), h);
    metadata.insert("sshs_legacy_hash".into(), l);
    eprintln!("saving model to: {}", save_to.display());
    super::save_state_dict(&save_to, &out.tensors, Some(&metadata))?;
    Ok(0)
}

/// Python's fixed-point format (`f"{x:.Nf}"`, `f"{x:.N%}"` after ×100): "nan", "inf", "-inf"
/// where Rust would write "NaN"/"inf".
fn py_fixed(x: f64, digits: usize) -> String {
    if x.is_nan() {
        "nan".into()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{x:.digits$}")
    }
}

/// The resized state dict and what the script reports about it.
pub struct Resized {
    /// Every key of the input, in its order, LoRA pairs and alphas replaced.
    pub tensors: Vec<(String, Tensor)>,
    pub modules: usize,
    pub max_old_rank: i64,
    /// `new_alpha` of the last module processed (the script writes it as `ss_network_alpha`).
    pub last_alpha: f64,
    /// The `--verbose` lines.
    pub report: String,
    /// Frobenius retention of each module (NaN excluded), for the verbose summary.
    pub fro: Vec<f64>,
    pub choices: Vec<(String, RankChoice)>,
}

/// `resize_lora_model`: `sd` holds float32 tensors in the file's key order.
pub fn resize(
    sd: &StateDict,
    new_rank: i64,
    new_conv_rank: i64,
    dynamic: Option<Dynamic>,
    device: tch::Device,
    save_kind: Kind,
) -> Result<Resized> {
    let mut replaced: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut out = Resized {
        tensors: vec![],
        modules: 0,
        max_old_rank: 0,
        last_alpha: 0.0,
        report: "\n".into(),
        fro: vec![],
        choices: vec![],
    };
    let _guard = tch::no_grad_guard();
    for key in &sd.keys {
        let parts: Vec<&str> = key.split('.').collect();
        // `<block>.<down>.<weight>` or `<block>.<down>`, first matching format wins
        let mut found = None;
        for (down, up) in DOWN_UP {
            if parts.len() >= 2 && parts[parts.len() - 2] == down {
                found = Some((
                    parts[..parts.len() - 2].join("."),
                    down,
                    up,
                    format!(".{}", parts[parts.len() - 1]),
                ));
                break;
            }
            if !parts.is_empty() && parts[parts.len() - 1] == down {
                found = Some((parts[..parts.len() - 1].join("."), down, up, String::new()));
                break;
            }
        }
        let Some((block, down_name, up_name, weight)) = found else {
            continue;
        };
        let down_key = format!("{block}.{down_name}{weight}");
        let up_key = format!("{block}.{up_name}{weight}");
        let (Some(down), Some(up)) = (sd.get(&down_key), sd.get(&up_key)) else {
            continue;
        };
        let alpha = sd.get(&format!("{block}.alpha"));
        let ds = down.size();
        let us = up.size();
        if ds.len() != us.len() || us.get(1) != ds.first() {
            bail!(
                "{}: `{down_key}` {ds:?} and `{up_key}` {us:?} do not form a LoRA pair",
                sd.path.display()
            );
        }
        let conv = ds.len() == 4;
        let old_rank = ds[0];
        out.max_old_rank = out.max_old_rank.max(old_rank);
        let scale = match alpha {
            None => Scale::One,
            Some(a) => Scale::F32((a.double_value(&[]) as f32) / old_rank as f32),
        };
        // the delta up @ down is decomposed through its two factors (see lowrank::pair_svd)
        let (down_m, kernel) = lowrank::as_matrix(&down.to_device(device));
        let (up_m, _) = lowrank::as_matrix(&up.to_device(device));
        let (u, s, vh) = lowrank::pair_svd(&up_m, &down_m);
        let max_rank = if conv { new_conv_rank } else { new_rank };
        let c = lowrank::rank_resize(&s, max_rank, dynamic, scale);
        let (new_up, new_down) = lowrank::truncate(&u, &s, &vh, c.new_rank);
        let (new_up, new_down) = lowrank::to_lora_shapes(new_up, new_down, kernel, ds[1]);
        let cpu = |t: Tensor| {
            t.to_device(tch::Device::Cpu)
                .to_kind(save_kind)
                .contiguous()
        };
        out.report += &format!(
            "{block:75} | sum(S) retained: {}%, fro retained: {}%, max(S) ratio: {}",
            py_fixed(c.sum_retained * 100.0, 1),
            py_fixed(c.fro_retained * 100.0, 1),
            py_fixed(c.max_ratio, 1)
        );
        if !c.fro_retained.is_nan() {
            out.fro.push(c.fro_retained);
        }
        if dynamic.is_some() {
            out.report += &format!(
                ", dynamic | dim: {}, alpha: {}\n",
                c.new_rank,
                crate::lora::metadata::py_float(c.new_alpha)
            );
        } else {
            out.report += "\n";
        }
        replaced.insert(down_key, cpu(new_down));
        replaced.insert(up_key, cpu(new_up));
        replaced.insert(
            format!("{block}.alpha"),
            Tensor::from(c.new_alpha as f32).to_kind(save_kind),
        );
        out.last_alpha = c.new_alpha;
        out.modules += 1;
        out.choices.push((block, c));
    }
    // Keys the script adds (an alpha a module lacked) come after the input's own.
    let mut order: Vec<String> = sd.keys.clone();
    for k in replaced.keys() {
        if !sd.tensors.contains_key(k) {
            order.push(k.clone());
        }
    }
    for k in order {
        let t = match replaced.remove(&k) {
            Some(t) => t,
            None => {
                let t = sd.tensors[&k].shallow_clone();
                // cast to save_dtype before hashing: floating tensors only
                if t.is_floating_point() && t.kind() != save_kind {
                    t.to_kind(save_kind)
                } else {
                    t
                }
            }
        };
        out.tensors.push((k, t));
    }
    Ok(out)
}
