//! `sdlora merge_lora` — sd-scripts' `networks/merge_lora.py`:
//! - with `--sd_model`: the LoRAs folded into the checkpoint's weights
//!   (`W += ratio · up @ down · alpha / rank`; Linear, 1×1 and k×k conv), saved as a checkpoint;
//! - without it: several LoRAs combined into one (same-rank weighted sum with the alphas
//!   reconciled, or `--concat` stacking the ranks; `--shuffle` permutes the rank components).
//!
//! The checkpoint is edited key by key on the LDM single file, never built as models: each
//! LoRA module is found through the same key map the loader uses, each tensor is read from the
//! memory-mapped input, changed if a LoRA targets it, written and dropped. What sd-scripts'
//! load-models-and-save-again round trip does to the other keys is reproduced: the UNet, text
//! encoder and VAE weights come out in the save precision, every other key (EMA copies, schedule
//! buffers, the SD2 text tower's unused last block…) exactly as it was.
use super::svd_merge_lora::scaled_delta;
use super::{
    check_save_to, file_stem, merged_from, parse_args, precision_kind, StateDict, PRECISIONS,
};
use crate::models::config::SdVersion;
use crate::models::loading::{ldm_key_map, MappedSafetensors, Target, CLIP_V1_PREFIX};
use crate::models::saving::{write_safetensors_streaming, Planned};
use crate::modelspec::ModelSpec;
use anyhow::{bail, Context, Result};
use clap::Parser;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

#[derive(Parser, Debug)]
#[command(
    name = "merge_lora",
    about = "Merge LoRAs into a Stable Diffusion checkpoint, or into one LoRA (sd-scripts networks/merge_lora.py)"
)]
pub struct Args {
    /// the checkpoint is Stable Diffusion 2.x
    #[arg(long = "v2")]
    pub v2: bool,
    /// precision in saving (default: --precision)
    #[arg(long = "save_precision", value_parser = PRECISIONS)]
    pub save_precision: Option<String>,
    /// precision in merging: float (default), fp16, bf16
    #[arg(long = "precision", default_value = "float", value_parser = PRECISIONS)]
    pub precision: String,
    /// the checkpoint to merge into (.safetensors or .ckpt); omitted: merge the LoRAs together
    #[arg(long = "sd_model")]
    pub sd_model: Option<PathBuf>,
    /// the output file (.safetensors, or .ckpt for a pickle)
    #[arg(long = "save_to")]
    pub save_to: Option<PathBuf>,
    /// LoRA files to merge
    #[arg(long = "models", num_args = 0..)]
    pub models: Vec<PathBuf>,
    /// ratio of each LoRA
    #[arg(long = "ratios", num_args = 0.., allow_negative_numbers = true)]
    pub ratios: Vec<f64>,
    /// no modelspec metadata (a merged LoRA keeps the minimum ss_* keys)
    #[arg(long = "no_metadata")]
    pub no_metadata: bool,
    /// stack the ranks instead of summing (the LoRAs may have different ranks)
    #[arg(long = "concat")]
    pub concat: bool,
    /// permute the rank components of the result
    #[arg(long = "shuffle")]
    pub shuffle: bool,
}

pub fn run(argv: &[String]) -> Result<i32> {
    let Some(args) = parse_args::<Args>("merge_lora", argv)? else {
        return Ok(0);
    };
    super::check_models_ratios(&args.models, &args.ratios)?;
    let save_to = check_save_to("--save_to", args.save_to.as_ref())?;
    let merge_kind = precision_kind(&args.precision);
    let save_kind = super::save_kind_or(args.save_precision.as_deref(), merge_kind);
    match &args.sd_model {
        Some(model) => merge_into_model(&args, model, &save_to, merge_kind, save_kind),
        None => merge_loras(&args, &save_to, merge_kind, save_kind),
    }
    .map(|_| 0)
}

// ---------------------------------------------------------------------------------------------
// LoRAs into a checkpoint.

/// Where a LoRA module lands in an LDM file: the key and, for a fused OpenCLIP q/k/v
/// projection, which third.
#[derive(Debug, Clone)]
struct Slot {
    key: String,
    part: Option<usize>,
}

/// The sd-scripts module name of each mergeable weight (children of the blocks `merge_lora.py`
/// walks: Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D in the UNet, CLIPAttention
/// and CLIPMLP in the text encoder) → where it is in the file.
fn module_slots(
    targets: &HashMap<String, Target>,
    shapes: &HashMap<String, Vec<i64>>,
) -> HashMap<String, Slot> {
    let lora_name = |prefix: &str, d: &str| -> Option<String> {
        d.strip_suffix(".weight")
            .map(|m| format!("{prefix}_{}", m.replace('.', "_")))
    };
    let mut out = HashMap::new();
    for (key, t) in targets {
        let nd = shapes.get(key).map(|s| s.len()).unwrap_or(0);
        match t {
            Target::Unet(d) | Target::UnetToConv(d) => {
                let in_block = [
                    ".attentions.",
                    ".resnets.",
                    ".downsamplers.",
                    ".upsamplers.",
                ]
                .iter()
                .any(|b| d.contains(b));
                if in_block && nd >= 2 {
                    if let Some(n) = lora_name("lora_unet", d) {
                        out.insert(
                            n,
                            Slot {
                                key: key.clone(),
                                part: None,
                            },
                        );
                    }
                }
            }
            Target::Text(d) => {
                let in_block = d.starts_with("text_model.encoder.layers.")
                    && (d.contains(".self_attn.") || d.contains(".mlp."));
                if in_block && nd == 2 {
                    if let Some(n) = lora_name("lora_te", d) {
                        out.insert(
                            n,
                            Slot {
                                key: key.clone(),
                                part: None,
                            },
                        );
                    }
                }
            }
            Target::TextSplit(ds) => {
                for (i, d) in ds.iter().enumerate() {
                    if let Some(n) = lora_name("lora_te", d) {
                        out.insert(
                            n,
                            Slot {
                                key: key.clone(),
                                part: Some(i),
                            },
                        );
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The key sd-scripts writes for a model weight: old SD1 files without `text_model.` in their
/// text-encoder keys come back with it.
fn output_key(key: &str, t: &Target) -> String {
    match t {
        Target::Text(d) if key.starts_with(CLIP_V1_PREFIX) => format!("{CLIP_V1_PREFIX}{d}"),
        _ => key.to_string(),
    }
}

fn merge_into_model(
    args: &Args,
    model: &Path,
    save_to: &Path,
    merge_kind: Kind,
    save_kind: Kind,
) -> Result<()> {
    if model.is_dir() {
        bail!(
            "--sd_model={}: a Diffusers folder; merge_lora merges into a single-file checkpoint \
             (.safetensors or .ckpt)",
            model.display()
        );
    }
    eprintln!("loading SD model: {}", model.display());
    let st = MappedSafetensors::open(model)?;
    let pickle = super::is_pickle(model)?;
    let mut names: Vec<String> = st.names().map(String::from).collect();
    if !pickle {
        names.sort();
    }
    let name_refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let map = ldm_key_map(model, &name_refs)?;
    match (args.v2, map.version) {
        (true, SdVersion::V1) => bail!(
            "--sd_model={}: --v2 was given but this is a Stable Diffusion 1.x checkpoint; remove --v2",
            model.display()
        ),
        (false, SdVersion::V2) => bail!(
            "--sd_model={}: a Stable Diffusion 2.x checkpoint; pass --v2",
            model.display()
        ),
        _ => {}
    }
    let shapes: HashMap<String, Vec<i64>> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                st.info(n).map(|e| e.shape.clone()).unwrap_or_default(),
            )
        })
        .collect();
    let slots = module_slots(&map.targets, &shapes);

    // Every LoRA is read and checked against the model before anything is written.
    // Kept as factors (the LoRA files are small); each full delta is made when its weight is
    // written, so memory stays at one weight at a time.
    let mut deltas: HashMap<String, Vec<Pending>> = HashMap::new();
    for (path, &ratio) in args.models.iter().zip(&args.ratios) {
        eprintln!("loading: {}", path.display());
        let sd = StateDict::load(path, Some(merge_kind))?;
        let mut missing = Vec::new();
        let mut count = 0;
        for key in &sd.keys {
            if !key.contains("lora_down") {
                continue;
            }
            let parts: Vec<&str> = key.split('.').collect();
            let module = parts[..parts.len().saturating_sub(2)].join(".");
            let Some(slot) = slots.get(&module) else {
                missing.push(key.clone());
                continue;
            };
            let down = &sd.tensors[key];
            let up_key = key.replace("lora_down", "lora_up");
            let up = sd
                .get(&up_key)
                .with_context(|| format!("{}: `{key}` has no `{up_key}`", path.display()))?;
            let rank = down.size()[0];
            let alpha_key = format!("{}alpha", &key[..key.find("lora_down").unwrap_or(0)]);
            let scale = match sd.get(&alpha_key) {
                Some(a) => a / rank,
                None => Tensor::from(1.0f32).to_kind(merge_kind),
            };
            let wshape = &shapes[&slot.key];
            let target: Vec<i64> = match slot.part {
                Some(_) => vec![wshape[0] / 3, wshape[1]],
                None => wshape.clone(),
            };
            check_fits(down, up, &target).with_context(|| {
                format!(
                    "{}: module {module} does not fit `{}` of shape {wshape:?} in {}",
                    path.display(),
                    slot.key,
                    model.display()
                )
            })?;
            deltas.entry(slot.key.clone()).or_default().push(Pending {
                part: slot.part,
                down: down.shallow_clone(),
                up: up.shallow_clone(),
                ratio,
                scale,
                target,
            });
            count += 1;
        }
        if !missing.is_empty() {
            bail!(
                "{}: {} LoRA module(s) have no matching layer in {} (a LoRA for another model \
                 type?), e.g. {}",
                path.display(),
                missing.len(),
                model.display(),
                missing
                    .iter()
                    .take(3)
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if count == 0 {
            bail!("{}: no LoRA modules (`*.lora_down.weight`)", path.display());
        }
    }

    eprintln!("merging...");
    let metadata = if args.no_metadata {
        None
    } else {
        let mut spec = ModelSpec::new(args.v2, args.v2, None);
        spec.title = Some(file_stem(save_to));
        let mut from = vec![model.to_path_buf()];
        from.extend(args.models.iter().cloned());
        spec.merged_from = Some(merged_from(&from)?);
        if args.v2 {
            eprintln!(
                "warning: cannot tell whether the model is for v-prediction; the metadata says it is"
            );
        }
        Some(spec.keys(crate::lora::metadata::now_unix()))
    };

    let is_model = |t: &Target| !matches!(t, Target::Ignore);
    let mut plan = Vec::new();
    let mut source: HashMap<String, String> = HashMap::new();
    for n in &names {
        let info = st.info(n).expect("listed");
        let t = &map.targets[n];
        let out = output_key(n, t);
        let kind = if is_model(t) { save_kind } else { info.kind };
        let mut shape = info.shape.clone();
        if matches!(t, Target::VaeToLinear(_)) && shape.len() == 2 {
            // sd-scripts writes the VAE attention projections as 1×1 convs, whatever they were
            shape.extend([1, 1]);
        }
        source.insert(out.clone(), n.clone());
        plan.push(Planned {
            name: out,
            kind,
            shape,
        });
    }
    let produce = |p: &Planned| -> Result<Tensor> {
        let key = &source[&p.name];
        let raw = st.tensor(key)?;
        let t = &map.targets[key];
        if !is_model(t) {
            return Ok(raw);
        }
        // sd-scripts' path: the model in float32, the UNet and text encoder then in the merge
        // precision (the VAE stays float32), the merge, the cast to the save precision.
        let mut w = raw.to_kind(Kind::Float);
        let te_or_unet = !matches!(t, Target::Vae(_) | Target::VaeToLinear(_));
        if te_or_unet {
            w = w.to_kind(merge_kind);
        }
        if let Some(ds) = deltas.get(key) {
            for p in ds {
                let d = &lora_delta(&p.down, &p.up, p.ratio, &p.scale, &p.target)?;
                w = match p.part {
                    None => &w + d,
                    Some(i) => {
                        let mut chunks = w.chunk(3, 0);
                        chunks[i] = &chunks[i] + d;
                        Tensor::cat(&chunks, 0)
                    }
                };
            }
        }
        let w = w.to_kind(save_kind);
        Ok(if w.size() != p.shape {
            w.reshape(&p.shape)
        } else {
            w
        })
    };
    eprintln!("saving SD model to: {}", save_to.display());
    if super::has_ext(save_to, "safetensors") {
        write_safetensors_streaming(save_to, &plan, metadata.as_ref(), produce)
    } else {
        // torch.save({"state_dict": …, "epoch": …, "global_step": …}); a training checkpoint's
        // own epoch and step carry over, as sd-scripts adds them to 0
        let epoch = st.counter("epoch").unwrap_or(0);
        let step = st.counter("global_step").unwrap_or(0);
        let mut tensors = Vec::with_capacity(plan.len());
        for p in &plan {
            tensors.push((p.name.clone(), produce(p)?));
        }
        crate::models::ckpt::write_checkpoint(save_to, &tensors, epoch, step)
    }
}

/// One LoRA module waiting to be folded into its weight.
struct Pending {
    part: Option<usize>,
    down: Tensor,
    up: Tensor,
    ratio: f64,
    scale: Tensor,
    target: Vec<i64>,
}

/// Checks, without computing it, that a LoRA pair's delta has the weight's shape.
fn check_fits(down: &Tensor, up: &Tensor, target: &[i64]) -> Result<()> {
    let (ds, us) = (down.size(), up.size());
    let squeeze = |s: &[i64]| -> Vec<i64> {
        if s.len() == 4 && s[2] == 1 && s[3] == 1 {
            s[..2].to_vec()
        } else {
            s.to_vec()
        }
    };
    let shape: Vec<i64> = if target.len() == 2 {
        let (d, u) = (squeeze(&ds), squeeze(&us));
        if d.len() != 2 || u.len() != 2 || u[1] != d[0] {
            bail!("lora_down {ds:?} / lora_up {us:?} is not a LoRA pair for a Linear layer");
        }
        vec![u[0], d[1]]
    } else {
        if ds.len() != 4 || us.len() != 4 || us[1] != ds[0] || us[2] != 1 || us[3] != 1 {
            bail!("lora_down {ds:?} / lora_up {us:?} is not a LoRA pair for a conv layer");
        }
        vec![us[0], ds[1], ds[2], ds[3]]
    };
    if shape != target {
        bail!("the LoRA's delta would have shape {shape:?}");
    }
    Ok(())
}

/// The delta of one LoRA module for a weight of shape `target` (merge_to_sd_model's three
/// cases, keyed on the weight: Linear (a conv-shaped LoRA squeezed), 1×1 conv, k×k conv).
fn lora_delta(
    down: &Tensor,
    up: &Tensor,
    ratio: f64,
    scale: &Tensor,
    target: &[i64],
) -> Result<Tensor> {
    let ds = down.size();
    let d = if target.len() == 2 {
        let (down, up) = if up.dim() == 4 {
            (
                down.squeeze_dim(3).squeeze_dim(2),
                up.squeeze_dim(3).squeeze_dim(2),
            )
        } else {
            (down.shallow_clone(), up.shallow_clone())
        };
        if down.dim() != 2 || up.dim() != 2 {
            bail!("a {}-D LoRA for a Linear layer", ds.len());
        }
        up.matmul(&down) * ratio * scale
    } else if ds.len() == 4 {
        scaled_delta(down, up, ratio, scale, tch::Device::Cpu)?
    } else {
        bail!("a {}-D LoRA for a conv layer", ds.len());
    };
    if d.size() != target {
        bail!("the LoRA's delta has shape {:?}", d.size());
    }
    Ok(d)
}

// ---------------------------------------------------------------------------------------------
// LoRAs into one LoRA.

fn merge_loras(args: &Args, save_to: &Path, merge_kind: Kind, save_kind: Kind) -> Result<()> {
    let mut base_alphas: Vec<(String, f64, bool)> = Vec::new(); // (module, alpha, is an int)
    let mut base_index: HashMap<String, usize> = HashMap::new();
    let mut base_dims: Vec<(String, i64)> = Vec::new();
    let mut merged: Vec<(String, Tensor)> = Vec::new();
    let mut merged_index: HashMap<String, usize> = HashMap::new();
    let mut facts = super::MergedFacts::default();
    for (path, &ratio) in args.models.iter().zip(&args.ratios) {
        eprintln!("loading: {}", path.display());
        let sd = StateDict::load(path, Some(merge_kind))?;
        facts.take(&sd.metadata);
        // this model's alphas and ranks; the first model to have a module sets its base
        let mut alphas: HashMap<String, f64> = HashMap::new();
        let mut dims: Vec<(String, i64)> = Vec::new();
        for key in &sd.keys {
            if key.contains("alpha") {
                let m = key[..key.rfind(".alpha").unwrap_or(key.len())].to_string();
                let a = sd.tensors[key].to_kind(Kind::Float).double_value(&[]);
                alphas.insert(m.clone(), a);
                if !base_index.contains_key(&m) {
                    base_index.insert(m.clone(), base_alphas.len());
                    base_alphas.push((m, a, false));
                }
            } else if key.contains("lora_down") {
                let m = key[..key.rfind(".lora_down").unwrap_or(key.len())].to_string();
                let d = sd.tensors[key].size()[0];
                dims.push((m.clone(), d));
                if !base_dims.iter().any(|(n, _)| *n == m) {
                    base_dims.push((m, d));
                }
            }
        }
        for (m, d) in &dims {
            if !alphas.contains_key(m) {
                // no alpha: alpha = rank, a Python int
                alphas.insert(m.clone(), *d as f64);
                if !base_index.contains_key(m) {
                    base_index.insert(m.clone(), base_alphas.len());
                    base_alphas.push((m.clone(), *d as f64, true));
                }
            }
        }
        eprintln!("merging...");
        for key in &sd.keys {
            if key.contains("alpha") {
                continue;
            }
            let concat_dim = match (
                args.concat,
                key.contains("lora_up"),
                key.contains("lora_down"),
            ) {
                (true, true, _) => Some(1),
                (true, false, true) => Some(0),
                _ => None,
            };
            let Some(pos) = key.rfind(".lora_") else {
                bail!("{}: unexpected key `{key}` in a LoRA file", path.display());
            };
            let m = &key[..pos];
            let (Some(&bi), Some(&a)) = (base_index.get(m), alphas.get(m)) else {
                bail!("{}: `{key}` has no lora_down weight", path.display());
            };
            let base_alpha = base_alphas[bi].1;
            let mut scale = (a / base_alpha).sqrt() * ratio;
            if key.contains("lora_up") {
                scale = scale.abs();
            }
            let t = &sd.tensors[key] * scale;
            match merged_index.get(key) {
                Some(&i) => {
                    let prev = &merged[i].1;
                    merged[i].1 = match concat_dim {
                        Some(d) => Tensor::cat(&[prev.shallow_clone(), t], d),
                        None => {
                            if prev.size() != t.size() {
                                bail!(
                                    "{}: `{key}` has shape {:?} but the earlier models' is {:?}: \
                                     LoRAs of different ranks (or for different models) cannot be \
                                     summed; use --concat for different ranks",
                                    path.display(),
                                    t.size(),
                                    prev.size()
                                );
                            }
                            prev + t
                        }
                    };
                }
                None => {
                    merged_index.insert(key.clone(), merged.len());
                    merged.push((key.clone(), t));
                }
            }
        }
    }
    for (m, a, int) in &base_alphas {
        let key = format!("{m}.alpha");
        // torch.tensor(alpha): int64 for an alpha that came from a rank (hashed as such, then
        // cast with the rest on saving)
        let t = if *int {
            Tensor::from(*a as i64)
        } else {
            Tensor::from(*a as f32)
        };
        match merged_index.get(&key) {
            Some(&i) => merged[i].1 = t,
            None => {
                merged_index.insert(key.clone(), merged.len());
                merged.push((key, t));
            }
        }
        if args.shuffle {
            let (dk, uk) = (
                format!("{m}.lora_down.weight"),
                format!("{m}.lora_up.weight"),
            );
            let (Some(&di), Some(&ui)) = (merged_index.get(&dk), merged_index.get(&uk)) else {
                continue;
            };
            let dim = merged[di].1.size()[0];
            // torch.randperm on the global generator, never seeded by the script
            let perm = Tensor::randperm(dim, (Kind::Int64, tch::Device::Cpu));
            merged[di].1 = merged[di].1.index_select(0, &perm);
            merged[ui].1 = merged[ui].1.index_select(1, &perm);
        }
    }
    let same = |v: Vec<String>| -> String {
        match v.first() {
            Some(f) if v.iter().all(|x| x == f) => f.clone(),
            Some(_) => "Dynamic".into(),
            None => "None".into(),
        }
    };
    let dims = same(base_dims.iter().map(|(_, d)| d.to_string()).collect());
    let alphas = same(
        base_alphas
            .iter()
            .map(|(_, a, int)| {
                if *int {
                    (*a as i64).to_string()
                } else {
                    crate::lora::metadata::py_float(*a)
                }
            })
            .collect(),
    );
    eprintln!("merged model");
    let mut metadata = BTreeMap::new();
    metadata.insert("ss_network_module".into(), "networks.lora".to_string());
    metadata.insert("ss_network_dim".into(), dims);
    metadata.insert("ss_network_alpha".into(), alphas);
    facts.insert_into(&mut metadata);
    eprintln!("calculating hashes and creating metadata...");
    // hashed in the merge precision, before the cast to the save precision (as the script does)
    let (h, l) = super::sshs_hashes(&merged, &metadata)?;
    metadata.insert("sshs_model_hash".into(), h);
    metadata.insert("sshs_legacy_hash".into(), l);
    if !args.no_metadata {
        metadata.extend(facts.modelspec(save_to, &args.models)?);
    }
    let tensors: Vec<(String, Tensor)> = merged
        .into_iter()
        .map(|(k, t)| {
            let t = if t.kind() != save_kind {
                t.to_kind(save_kind)
            } else {
                t
            };
            (k, t)
        })
        .collect();
    eprintln!("saving model to: {}", save_to.display());
    super::save_state_dict(save_to, &tensors, Some(&metadata))
}
