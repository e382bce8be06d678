//! `sdlora svd_merge_lora` — sd-scripts' `networks/svd_merge_lora.py`: the weighted sum of
//! several LoRAs' full deltas (`ratio · up @ down · alpha / rank`, optionally weighted per block
//! with `--lbws`), re-factored by SVD to `--new_rank` / `--new_conv_rank` with the factors clamped
//! at their 0.99 quantile; alpha = the new rank.
use super::lowrank;
use super::{check_save_to, parse_args, precision_kind, StateDict, PRECISIONS};
use anyhow::{bail, Context, Result};
use clap::Parser;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use tch::Tensor;

#[derive(Parser, Debug)]
#[command(
    name = "svd_merge_lora",
    about = "Merge LoRAs into one of a given rank by SVD (sd-scripts networks/svd_merge_lora.py)"
)]
pub struct Args {
    /// precision in saving (default: --precision)
    #[arg(long = "save_precision", value_parser = PRECISIONS)]
    pub save_precision: Option<String>,
    /// precision in merging: float (default), fp16, bf16
    #[arg(long = "precision", default_value = "float", value_parser = PRECISIONS)]
    pub precision: String,
    /// the output file: .safetensors, or a pickle (.ckpt/.pt)
    #[arg(long = "save_to")]
    pub save_to: Option<PathBuf>,
    /// LoRA files to merge
    #[arg(long = "models", num_args = 0..)]
    pub models: Vec<PathBuf>,
    /// ratio of each model
    #[arg(long = "ratios", num_args = 0.., allow_negative_numbers = true)]
    pub ratios: Vec<f64>,
    /// per-block weights of each model, a JSON list of 12/17/20/26 numbers each
    #[arg(long = "lbws", num_args = 0..)]
    pub lbws: Vec<String>,
    /// rank of the output LoRA
    #[arg(long = "new_rank", default_value_t = 4)]
    pub new_rank: i64,
    /// rank of 3×3 conv modules (default: --new_rank)
    #[arg(long = "new_conv_rank")]
    pub new_conv_rank: Option<i64>,
    /// where to compute: cpu, cuda, cuda:N
    #[arg(long = "device")]
    pub device: Option<String>,
    /// write only the minimum ss_* metadata (no modelspec)
    #[arg(long = "no_metadata")]
    pub no_metadata: bool,
}

/// Which of the 26 block slots (BASE, IN00–IN11, MID, OUT00–OUT11) an lbw list of each accepted
/// length addresses, in order (sd-scripts' LAYER12/17/20/26 tables: the blocks that have LoRA
/// modules in the usual SD1 / SDXL networks).
fn lbw_slots(len: usize) -> Option<Vec<usize>> {
    let on: &[usize] = match len {
        12 => &[0, 5, 6, 8, 9, 13, 14, 15, 16, 17, 18, 19],
        17 => &[0, 2, 3, 5, 6, 8, 9, 13, 17, 18, 19, 20, 21, 22, 23, 24, 25],
        20 => &[
            0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
        ],
        26 => return Some((0..26).collect()),
        _ => return None,
    };
    Some(on.to_vec())
}

/// The lbw slot of a module name (`get_lbw_block_index`): 0 for the text encoder, 1–12 the SD1
/// down path, 13 the middle, 14–25 the up path; −1 when the name fits none. `sdxl` (lbw lists of
/// 12 or 20) reads the LDM-style names of SDXL LoRAs instead.
pub fn lbw_block_index(name: &str, sdxl: bool) -> i64 {
    if name.contains("text_model_encoder_") {
        return 0;
    }
    if sdxl {
        let Some(n) = name.strip_prefix("lora_unet_") else {
            return -1;
        };
        let num = |s: &str| -> i64 {
            s.split('_')
                .nth(2)
                .and_then(|x| x.parse().ok())
                .unwrap_or(-1)
        };
        return if n.starts_with("time_embed_") || n.starts_with("label_emb_") {
            1
        } else if n.starts_with("input_blocks_") {
            1 + num(n)
        } else if n.starts_with("middle_block_") {
            13
        } else if n.starts_with("output_blocks_") {
            14 + num(n)
        } else if n.starts_with("out_") {
            23
        } else {
            -1
        };
    }
    // (up|down)_blocks_<i>_(resnets|upsamplers|downsamplers|attentions)_<j>_ anywhere in the name
    let mut rest = name;
    while let Some(pos) = rest.find("_blocks_") {
        let before = &rest[..pos];
        let dir = if before.ends_with("down") {
            Some("down")
        } else if before.ends_with("up") {
            Some("up")
        } else {
            None
        };
        let after = &rest[pos + "_blocks_".len()..];
        let mut it = after.splitn(4, '_');
        let i = it.next().and_then(|x| x.parse::<i64>().ok());
        let kind = it.next();
        let j = it.next().and_then(|x| x.parse::<i64>().ok());
        let tail_ok = it.next().is_some();
        if let (Some(dir), Some(i), Some(kind), Some(j), true) = (dir, i, kind, j, tail_ok) {
            if ["resnets", "upsamplers", "downsamplers", "attentions"].contains(&kind) {
                let idx = match (dir, kind) {
                    ("down", "resnets" | "attentions") => 3 * i + j + 1,
                    ("down", "downsamplers") => 3 * (i + 1),
                    ("up", "resnets" | "attentions") => 3 * i + j,
                    ("up", "upsamplers") => 3 * i + 2,
                    _ => return -1,
                };
                return if dir == "down" {
                    1 + idx
                } else {
                    1 + 12 + 1 + idx
                };
            }
        }
        rest = &rest[pos + 1..];
    }
    if name.contains("mid_block_") {
        return 13;
    }
    -1
}

/// `--lbws` parsed: per model 26 slot weights (1 where the list does not reach), and whether the
/// lists are SDXL-style.
fn parse_lbws(lbws: &[String]) -> Result<(Vec<[f64; 26]>, bool, Vec<usize>)> {
    let mut lists = Vec::new();
    for (i, s) in lbws.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(s).with_context(|| {
            format!(
                "--lbws #{}: {s:?} is not JSON (e.g. \"[1,0.5,...]\")",
                i + 1
            )
        })?;
        let arr = v
            .as_array()
            .with_context(|| format!("--lbws #{}: {s:?} must be a JSON list", i + 1))?;
        let nums: Option<Vec<f64>> = arr.iter().map(|x| x.as_f64()).collect();
        lists.push(
            nums.with_context(|| format!("--lbws #{}: every value must be a number", i + 1))?,
        );
    }
    let len = lists[0].len();
    if lists.iter().any(|l| l.len() != len) {
        bail!("--lbws: all lists must have the same length");
    }
    let slots = lbw_slots(len)
        .with_context(|| format!("--lbws: lists of length {len}; expected 12, 17, 20 or 26"))?;
    let out = lists
        .iter()
        .map(|l| {
            let mut w = [1.0; 26];
            for (&slot, &v) in slots.iter().zip(l) {
                w[slot] = v;
            }
            w
        })
        .collect();
    Ok((out, len == 12 || len == 20, slots))
}

/// How a LoRA's alpha multiplies: its tensor (in the merge dtype) or the Python int rank.
fn module_scale(alpha: Option<&Tensor>, rank: i64) -> Tensor {
    match alpha {
        Some(a) => a / rank,
        // no alpha: alpha = rank, so the Python float rank / rank = 1.0
        None => Tensor::from(1.0f32),
    }
}

pub fn run(argv: &[String]) -> Result<i32> {
    let Some(args) = parse_args::<Args>("svd_merge_lora", argv)? else {
        return Ok(0);
    };
    super::check_models_ratios(&args.models, &args.ratios)?;
    if !args.lbws.is_empty() && args.lbws.len() != args.models.len() {
        bail!(
            "--lbws has {} list(s) for {} model(s): give one per model",
            args.lbws.len(),
            args.models.len()
        );
    }
    let save_to = check_save_to("--save_to", args.save_to.as_ref())?;
    let lbws = if args.lbws.is_empty() {
        None
    } else {
        Some(parse_lbws(&args.lbws)?)
    };
    let device = super::parse_device("--device", args.device.as_deref())?;
    let merge_kind = precision_kind(&args.precision);
    let save_kind = super::save_kind_or(args.save_precision.as_deref(), merge_kind);
    let new_rank = args.new_rank;
    let new_conv_rank = args.new_conv_rank.unwrap_or(new_rank);
    eprintln!("new rank: {new_rank}, new conv rank: {new_conv_rank}");

    let _guard = tch::no_grad_guard();
    let mut merged: Vec<(String, Tensor)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut facts = super::MergedFacts::default();
    for (mi, (model, &ratio)) in args.models.iter().zip(&args.ratios).enumerate() {
        eprintln!("loading: {}", model.display());
        let sd = StateDict::load(model, Some(merge_kind))?;
        facts.take(&sd.metadata);
        if !args.no_metadata
            && facts
                .base_model
                .as_deref()
                .is_some_and(|b| b.to_lowercase().starts_with("sdxl"))
        {
            bail!(
                "{}: an SDXL LoRA (ss_base_model_version sdxl_*); sdlora's tools handle SD1.x/2.x \
                 LoRAs only so far",
                model.display()
            );
        }
        eprintln!("merging...");
        for key in &sd.keys {
            if !key.contains("lora_down") {
                continue;
            }
            let name = &key[..key
                .rfind(".lora_down")
                .with_context(|| format!("{}: unexpected key `{key}`", model.display()))?];
            let down = &sd.tensors[key];
            let up_key = format!("{name}.lora_up.weight");
            let up = sd
                .get(&up_key)
                .with_context(|| format!("{}: `{key}` has no `{up_key}`", model.display()))?;
            let rank = down.size()[0];
            let mut scale = module_scale(sd.get(&format!("{name}.alpha")), rank);
            if let Some((w, sdxl, slots)) = &lbws {
                let i = lbw_block_index(key, *sdxl);
                if i >= 0 && slots.contains(&(i as usize)) {
                    scale *= w[mi][i as usize];
                }
            }
            let scale = scale.to_device(device);
            let delta = scaled_delta(down, up, ratio, &scale, device)?;
            match index.get(name) {
                Some(&i) => {
                    let w = &merged[i].1;
                    if w.size() != delta.size() {
                        bail!(
                            "{}: module {name} has shape {:?} but an earlier model's is {:?}: \
                             the LoRAs are for different models",
                            model.display(),
                            delta.size(),
                            w.size()
                        );
                    }
                    merged[i].1 = (w.to_device(device) + delta).to_device(tch::Device::Cpu);
                }
                None => {
                    // zeros + delta, as the script starts from a zero weight
                    let z = Tensor::zeros(delta.size(), (merge_kind, device));
                    index.insert(name.to_string(), merged.len());
                    merged.push((name.to_string(), (z + delta).to_device(tch::Device::Cpu)));
                }
            }
        }
    }
    if merged.is_empty() {
        bail!("no LoRA modules (`*.lora_down.weight`) in the given --models");
    }

    eprintln!("extract new lora...");
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, mat) in &merged {
        let mat = mat.to_device(device);
        let s = mat.size();
        let conv3 = s.len() == 4 && (s[2], s[3]) != (1, 1);
        let (out_dim, in_dim) = (s[0], s[1]);
        let m2 = if conv3 {
            mat.flatten(1, -1)
        } else if s.len() == 4 {
            mat.reshape([out_dim, in_dim])
        } else {
            mat.shallow_clone()
        };
        let rank = if conv3 { new_conv_rank } else { new_rank }
            .min(in_dim)
            .min(out_dim);
        let (u, sv, vh) = lowrank::svd(&m2);
        let (up, down) = lowrank::truncate(&u, &sv, &vh, rank);
        let (up, down) = lowrank::clamp_quantile(&up, &down, 0.99);
        let kernel = (s.len() == 4).then(|| (s[2], s[3]));
        let (up, down) = lowrank::to_lora_shapes(up, down, kernel, in_dim);
        let cast = |t: Tensor| {
            let t = t.to_device(tch::Device::Cpu).to_kind(merge_kind);
            if save_kind != merge_kind {
                t.to_kind(save_kind)
            } else {
                t
            }
            .contiguous()
        };
        tensors.push((format!("{name}.lora_up.weight"), cast(up)));
        tensors.push((format!("{name}.lora_down.weight"), cast(down)));
        // torch.tensor(int): int64, not cast with the floats
        tensors.push((format!("{name}.alpha"), Tensor::from(rank)));
    }

    let mut metadata = BTreeMap::new();
    metadata.insert("ss_network_module".into(), "networks.lora".into());
    metadata.insert("ss_network_dim".into(), new_rank.to_string());
    metadata.insert("ss_network_alpha".into(), new_rank.to_string());
    facts.insert_into(&mut metadata);
    metadata.insert(
        "ss_network_args".into(),
        format!("{{\"conv_dim\": {new_conv_rank}, \"conv_alpha\": {new_conv_rank}}}"),
    );
    eprintln!("calculating hashes and creating metadata...");
    let (h, l) = super::sshs_hashes(&tensors, &metadata)?;
    metadata.insert("sshs_model_hash".into(), h);
    metadata.insert("sshs_legacy_hash".into(), l);
    if !args.no_metadata {
        metadata.extend(facts.modelspec(&save_to, &args.models)?);
    }
    eprintln!("saving model to: {}", save_to.display());
    super::save_state_dict(&save_to, &tensors, Some(&metadata))?;
    Ok(0)
}

/// `ratio · (up @ down) · scale` for a Linear, 1×1 or k×k conv pair, in the pair's dtype.
pub fn scaled_delta(
    down: &Tensor,
    up: &Tensor,
    ratio: f64,
    scale: &Tensor,
    device: tch::Device,
) -> Result<Tensor> {
    let down = down.to_device(device);
    let up = up.to_device(device);
    let ds = down.size();
    Ok(if ds.len() == 2 {
        up.matmul(&down) * ratio * scale
    } else if ds.len() == 4 && (ds[2], ds[3]) == (1, 1) {
        let m = up
            .squeeze_dim(3)
            .squeeze_dim(2)
            .matmul(&down.squeeze_dim(3).squeeze_dim(2));
        m.unsqueeze(2).unsqueeze(3) * ratio * scale
    } else if ds.len() == 4 {
        conv_kernel_product(&down, &up) * ratio * scale
    } else {
        bail!("lora_down of shape {ds:?}: expected 2 or 4 dimensions");
    })
}

/// The k×k kernel of a conv LoRA: `conv2d(down.permute(1,0,2,3), up).permute(1,0,2,3)`.
pub fn conv_kernel_product(down: &Tensor, up: &Tensor) -> Tensor {
    down.permute([1, 0, 2, 3])
        .conv2d(up, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 1)
        .permute([1, 0, 2, 3])
}
