//! `sdlora inspect FILE`: what a kohya-layout LoRA contains — metadata, module counts, rank and
//! alpha per module group, dtypes and weight norms. Works on files from any trainer that writes
//! the kohya layout; anything else gets an error that says what the file looks like instead.
use super::file::{dtype_name, LoraFile, ModuleTensors};
use anyhow::Result;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use tch::Kind;

pub fn run(file: &Path) -> Result<i32> {
    let f = LoraFile::load(file)?;
    print!("{}", report(&f));
    Ok(0)
}

/// Which part of the model a module wraps, for grouping.
fn group_of(name: &str, m: &ModuleTensors) -> String {
    let side = if name.starts_with("lora_te_") {
        "text encoder"
    } else {
        "UNet"
    };
    let d = m.down.as_ref().expect("validated");
    let kind = match d.size().as_slice() {
        [_, _] => "Linear".to_string(),
        [_, _, 1, 1] => "Conv2d 1x1".to_string(),
        [_, _, kh, kw] => format!("Conv2d {kh}x{kw}"),
        _ => "?".to_string(),
    };
    format!("{side} {kind}")
}

fn fmt_alpha(m: &ModuleTensors) -> String {
    match m.alpha_value() {
        Some(a) => format!("{a}"),
        None => "none (= rank)".to_string(),
    }
}

/// Pretty-prints a metadata value: JSON objects/lists indented, long strings cut.
fn pretty_value(v: &str) -> String {
    let t = v.trim_start();
    if t.starts_with('{') || t.starts_with('[') {
        if let Ok(j) = serde_json::from_str::<serde_json::Value>(v) {
            let s = serde_json::to_string_pretty(&j).unwrap_or_else(|_| v.to_string());
            let lines: Vec<&str> = s.lines().collect();
            let shown: Vec<&str> = lines.iter().take(40).copied().collect();
            let mut out = shown.join("\n      ");
            if lines.len() > 40 {
                let _ = write!(out, "\n      … ({} more lines)", lines.len() - 40);
            }
            return out;
        }
    }
    if v.len() > 200 {
        let cut: String = v.chars().take(200).collect();
        return format!("{cut}… ({} bytes)", v.len());
    }
    v.to_string()
}

/// The text `sdlora inspect` prints.
pub fn report(f: &LoraFile) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "file: {}", f.path);
    let n_te = f
        .modules
        .keys()
        .filter(|k| k.starts_with("lora_te_"))
        .count();
    let n_unet = f.modules.len() - n_te;
    let _ = writeln!(
        o,
        "format: kohya LoRA (networks.lora), {} tensors, {} modules: UNet {n_unet}, text encoder {n_te}",
        f.tensors.len(),
        f.modules.len()
    );

    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for (k, t) in &f.tensors {
        let role = if k.ends_with(".alpha") {
            "alpha"
        } else {
            "weights"
        };
        *dtypes
            .entry(format!("{role} {}", dtype_name(t.kind())))
            .or_default() += 1;
    }
    let dt: Vec<String> = dtypes.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
    let _ = writeln!(o, "dtypes: {}", dt.join(", "));
    let params: i64 = f
        .modules
        .values()
        .map(|m| {
            m.down.as_ref().map_or(0, |t| t.numel() as i64)
                + m.up.as_ref().map_or(0, |t| t.numel() as i64)
        })
        .sum();
    let _ = writeln!(o, "parameters: {params}");

    // group → (rank, alpha) → modules, with norm statistics
    struct Stats {
        count: usize,
        rank: i64,
        alpha: String,
        scale: f64,
        down: Vec<f64>,
        up: Vec<f64>,
        delta: Vec<f64>,
        example: String,
    }
    let mut groups: BTreeMap<(String, i64, String), Stats> = BTreeMap::new();
    for (name, m) in &f.modules {
        let rank = m.rank().unwrap_or(0);
        let alpha = fmt_alpha(m);
        let scale = m.alpha_value().unwrap_or(rank as f64) / rank.max(1) as f64;
        let down = m.down.as_ref().expect("validated").to_kind(Kind::Float);
        let up = m.up.as_ref().expect("validated").to_kind(Kind::Float);
        let d2 = down.reshape([rank, -1]);
        let u2 = up.reshape([up.size()[0], rank]);
        // ‖up·down‖·scale: the Frobenius norm of the weight change at multiplier 1.
        let delta = u2.matmul(&d2).norm().double_value(&[]) * scale;
        let key = (group_of(name, m), rank, alpha.clone());
        let s = groups.entry(key).or_insert_with(|| Stats {
            count: 0,
            rank,
            alpha,
            scale,
            down: vec![],
            up: vec![],
            delta: vec![],
            example: name.clone(),
        });
        s.count += 1;
        s.down.push(down.norm().double_value(&[]));
        s.up.push(up.norm().double_value(&[]));
        s.delta.push(delta);
    }
    let mm = |v: &[f64]| {
        let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        format!("{min:.4}/{mean:.4}/{max:.4}")
    };
    let _ = writeln!(o, "\nmodule groups (norms: min/mean/max over the group):");
    for ((g, _, _), s) in &groups {
        let _ = writeln!(
            o,
            "  {g}: {} modules, rank {}, alpha {}, scale {}",
            s.count, s.rank, s.alpha, s.scale
        );
        let _ = writeln!(
            o,
            "      ‖lora_down‖ {}  ‖lora_up‖ {}  ‖up·down‖·scale {}",
            mm(&s.down),
            mm(&s.up),
            mm(&s.delta)
        );
        let _ = writeln!(o, "      e.g. {}", s.example);
    }
    if f.modules.values().all(|m| {
        m.up.as_ref()
            .is_some_and(|u| u.abs().max().double_value(&[]) == 0.0)
    }) {
        let _ = writeln!(
            o,
            "  note: every lora_up is zero — this LoRA does nothing (untrained or freshly initialised)"
        );
    }

    let _ = writeln!(o, "\nmetadata ({} keys):", f.metadata.len());
    if f.metadata.is_empty() {
        let _ = writeln!(o, "  (none)");
    }
    let order = |k: &str| {
        if k.starts_with("modelspec.") {
            0
        } else if k.starts_with("ss_") {
            1
        } else {
            2
        }
    };
    let mut keys: Vec<&String> = f.metadata.keys().collect();
    keys.sort_by_key(|k| (order(k), k.to_string()));
    for k in keys {
        let _ = writeln!(o, "  {k}: {}", pretty_value(&f.metadata[k]));
    }
    o
}
