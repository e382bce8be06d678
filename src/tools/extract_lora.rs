//! `sdlora extract_lora_from_models` — sd-scripts' `networks/extract_lora_from_models.py` for
//! SD1.x/2.x: the difference of a fine-tuned model from its base, per LoRA target layer,
//! factored by SVD to `--dim` (`--conv_dim` for 3×3 convs), clamped at the `--clamp_quantile`;
//! the text encoder is left out when it did not change by more than `--min_diff`.
//!
//! Single-file checkpoints are read tensor by tensor from their memory maps, so only the layers a
//! LoRA targets are ever in memory, two at a time (sd-scripts holds both whole models).
use super::lowrank;
use super::{check_save_to, file_stem, parse_args, precision_kind, PRECISIONS};
use crate::models::loading::{
    ldm_key_map, load_checkpoint, LoadOptions, MappedSafetensors, Target,
};
use crate::models::weights::WeightMap;
use crate::modelspec::ModelSpec;
use anyhow::{bail, Context, Result};
use clap::Parser;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

#[derive(Parser, Debug)]
#[command(
    name = "extract_lora_from_models",
    about = "Extract a LoRA from the difference of two models (sd-scripts networks/extract_lora_from_models.py)"
)]
pub struct Args {
    /// the models are Stable Diffusion 2.x
    #[arg(long = "v2")]
    pub v2: bool,
    /// v-prediction metadata (default: same as --v2)
    #[arg(long = "v_parameterization")]
    pub v_parameterization: bool,
    /// SDXL models (not supported by sdlora yet)
    #[arg(long = "sdxl")]
    pub sdxl: bool,
    /// precision the models are loaded in (default: float32)
    #[arg(long = "load_precision", value_parser = PRECISIONS)]
    pub load_precision: Option<String>,
    /// precision in saving (default: float32)
    #[arg(long = "save_precision", value_parser = PRECISIONS)]
    pub save_precision: Option<String>,
    /// the base model
    #[arg(long = "model_org")]
    pub model_org: Option<PathBuf>,
    /// the fine-tuned model; the LoRA is its difference from --model_org
    #[arg(long = "model_tuned")]
    pub model_tuned: Option<PathBuf>,
    /// the LoRA file to write
    #[arg(long = "save_to")]
    pub save_to: Option<PathBuf>,
    /// rank of the LoRA
    #[arg(long = "dim", default_value_t = 4)]
    pub dim: i64,
    /// rank of 3×3 conv modules; omitted: no conv modules
    #[arg(long = "conv_dim")]
    pub conv_dim: Option<i64>,
    /// where to compute the SVDs: cpu, cuda, cuda:N
    #[arg(long = "device")]
    pub device: Option<String>,
    /// quantile at which the factors are clamped
    #[arg(long = "clamp_quantile", default_value_t = 0.99)]
    pub clamp_quantile: f64,
    /// the text encoder counts as changed when some weight moved by more than this
    #[arg(long = "min_diff", default_value_t = 0.01)]
    pub min_diff: f64,
    /// no modelspec metadata
    #[arg(long = "no_metadata")]
    pub no_metadata: bool,
    /// SDXL only
    #[arg(long = "load_original_model_to")]
    pub load_original_model_to: Option<String>,
    /// SDXL only
    #[arg(long = "load_tuned_model_to")]
    pub load_tuned_model_to: Option<String>,
}

/// A model's weights under Diffusers/transformers names, read one at a time.
enum Source {
    /// An LDM single file: Diffusers name → (file key, third of a fused q/k/v or None).
    File {
        st: MappedSafetensors,
        names: HashMap<String, (String, Option<usize>)>,
    },
    /// A Diffusers folder, loaded whole.
    Folder { te: WeightMap, unet: WeightMap },
}

impl Source {
    fn open(path: &Path, v2: bool) -> Result<Self> {
        if path.is_dir() {
            let ck = load_checkpoint(
                path,
                &LoadOptions {
                    v2: Some(v2),
                    ..Default::default()
                },
            )?;
            return Ok(Source::Folder {
                te: ck.text_encoder,
                unet: ck.unet,
            });
        }
        let st = MappedSafetensors::open(path)?;
        let keys: Vec<&str> = st.names().collect();
        let map = ldm_key_map(path, &keys)?;
        let is_v2 = map.version == crate::models::config::SdVersion::V2;
        if is_v2 != v2 {
            bail!(
                "{}: a Stable Diffusion {} checkpoint; {}",
                path.display(),
                if is_v2 { "2.x" } else { "1.x" },
                if is_v2 { "pass --v2" } else { "remove --v2" }
            );
        }
        let mut names = HashMap::new();
        for (k, t) in &map.targets {
            match t {
                Target::Unet(d) | Target::UnetToConv(d) => {
                    names.insert(format!("unet:{d}"), (k.clone(), None));
                }
                Target::Text(d) => {
                    names.insert(format!("te:{d}"), (k.clone(), None));
                }
                Target::TextSplit(ds) => {
                    for (i, d) in ds.iter().enumerate() {
                        names.insert(format!("te:{d}"), (k.clone(), Some(i)));
                    }
                }
                _ => {}
            }
        }
        Ok(Source::File { st, names })
    }

    /// `unet:<name>` / `te:<name>` weight names with their shapes, as stored.
    fn shapes(&self) -> BTreeMap<String, Vec<i64>> {
        match self {
            Source::File { st, names } => names
                .iter()
                .map(|(n, (k, part))| {
                    let mut s = st.info(k).map(|e| e.shape.clone()).unwrap_or_default();
                    if part.is_some() && !s.is_empty() {
                        s[0] /= 3;
                    }
                    (n.clone(), s)
                })
                .collect(),
            Source::Folder { te, unet } => te
                .keys()
                .map(|k| {
                    (
                        format!("te:{k}"),
                        te.get(k).map(|t| t.size()).unwrap_or_default(),
                    )
                })
                .chain(unet.keys().map(|k| {
                    (
                        format!("unet:{k}"),
                        unet.get(k).map(|t| t.size()).unwrap_or_default(),
                    )
                }))
                .collect(),
        }
    }

    /// One weight in float32 (as sd-scripts' models hold it), then in `kind`.
    fn get(&self, name: &str, kind: Kind) -> Result<Tensor> {
        let t = match self {
            Source::File { st, names } => {
                let (k, part) = names
                    .get(name)
                    .with_context(|| format!("{}: no weight for {name}", st.path().display()))?;
                let t = st.tensor(k)?.to_kind(Kind::Float);
                match part {
                    Some(i) => t.chunk(3, 0)[*i].contiguous(),
                    None => t,
                }
            }
            Source::Folder { te, unet } => {
                let (map, n) = match name.split_once(':') {
                    Some(("te", n)) => (te, n),
                    Some((_, n)) => (unet, n),
                    None => bail!("internal: weight name {name}"),
                };
                map.get(n)
                    .with_context(|| format!("{}: no weight {n}", map.source))?
                    .to_kind(Kind::Float)
            }
        };
        Ok(if kind != Kind::Float {
            t.to_kind(kind)
        } else {
            t
        })
    }
}

/// A layer the LoRA network targets: its sd-scripts module name, its weight, and its rank.
struct LoraTarget {
    lora_name: String,
    weight: String,
    rank: i64,
    conv3: bool,
    text_encoder: bool,
}

/// The layers `networks.lora` gives a module: the text encoder's attention and MLP Linears, the
/// UNet's Transformer2DModel Linears and 1×1 convs; with `conv_dim` also the ResnetBlock2D /
/// Downsample2D / Upsample2D convs (3×3 at `conv_dim`, the 1×1 shortcut and the time embedding
/// projection at `dim`).
fn lora_targets(
    shapes: &BTreeMap<String, Vec<i64>>,
    dim: i64,
    conv_dim: Option<i64>,
) -> Vec<LoraTarget> {
    let mut te = Vec::new();
    let mut unet = Vec::new();
    for (n, s) in shapes {
        let Some(module) = n.strip_suffix(".weight") else {
            continue;
        };
        if let Some(m) = module.strip_prefix("te:") {
            if m.starts_with("text_model.encoder.layers.")
                && (m.contains(".self_attn.") || m.contains(".mlp."))
                && s.len() == 2
            {
                te.push(LoraTarget {
                    lora_name: format!("lora_te_{}", m.replace('.', "_")),
                    weight: n.clone(),
                    rank: dim,
                    conv3: false,
                    text_encoder: true,
                });
            }
        } else if let Some(m) = module.strip_prefix("unet:") {
            let conv3 = s.len() == 4 && (s[2], s[3]) != (1, 1);
            let in_attn = m.contains(".attentions.");
            let in_conv_block = [".resnets.", ".downsamplers.", ".upsamplers."]
                .iter()
                .any(|b| m.contains(b));
            let rank = if in_attn && s.len() >= 2 && !conv3 {
                Some(dim)
            } else if in_conv_block && s.len() >= 2 {
                conv_dim.map(|c| if conv3 { c } else { dim })
            } else {
                None
            };
            if let Some(rank) = rank.filter(|&r| r > 0) {
                unet.push(LoraTarget {
                    lora_name: format!("lora_unet_{}", m.replace('.', "_")),
                    weight: n.clone(),
                    rank,
                    conv3,
                    text_encoder: false,
                });
            }
        }
    }
    te.extend(unet);
    te
}

pub fn run(argv: &[String]) -> Result<i32> {
    let Some(args) = parse_args::<Args>("extract_lora_from_models", argv)? else {
        return Ok(0);
    };
    let mut refused = Vec::new();
    if args.sdxl {
        refused.push("--sdxl: SDXL models are not supported by sdlora's tools yet");
    }
    if args.load_original_model_to.is_some() || args.load_tuned_model_to.is_some() {
        refused.push("--load_original_model_to/--load_tuned_model_to: SDXL-only options");
    }
    if !refused.is_empty() {
        bail!("not supported:\n  {}", refused.join("\n  "));
    }
    let org = args
        .model_org
        .clone()
        .context("--model_org is required: the base model")?;
    let tuned = args
        .model_tuned
        .clone()
        .context("--model_tuned is required: the fine-tuned model")?;
    let save_to = check_save_to("--save_to", args.save_to.as_ref())?;
    for (f, p) in [("--model_org", &org), ("--model_tuned", &tuned)] {
        if !p.exists() {
            bail!("{f}={}: no such file or folder", p.display());
        }
    }
    if args.dim < 1 || args.conv_dim.is_some_and(|c| c < 0) {
        bail!("--dim must be at least 1 and --conv_dim not negative");
    }
    if !(0.0..=1.0).contains(&args.clamp_quantile) {
        bail!(
            "--clamp_quantile={}: must be within [0, 1]",
            args.clamp_quantile
        );
    }
    let device = super::parse_device("--device", args.device.as_deref())?;
    // --v_parameterization is store_true with default None: absent → same as --v2
    let v_param = args.v_parameterization || args.v2;
    let load_kind = args
        .load_precision
        .as_deref()
        .map(precision_kind)
        .unwrap_or(Kind::Float);
    let save_kind = args.save_precision.as_deref().map(precision_kind);

    eprintln!("loading original SD model : {}", org.display());
    let src_o = Source::open(&org, args.v2)?;
    eprintln!("loading tuned SD model : {}", tuned.display());
    let src_t = Source::open(&tuned, args.v2)?;
    let shapes_o = src_o.shapes();
    let shapes_t = src_t.shapes();
    let targets = lora_targets(&shapes_o, args.dim, args.conv_dim);
    for t in &targets {
        if shapes_t.get(&t.weight) != shapes_o.get(&t.weight) {
            bail!(
                "{} and {} are different model types: `{}` is {:?} in one and {:?} in the other",
                org.display(),
                tuned.display(),
                t.weight,
                shapes_o.get(&t.weight),
                shapes_t.get(&t.weight)
            );
        }
    }

    let _guard = tch::no_grad_guard();
    let mut text_encoder_different = false;
    let mut diffs: Vec<(&LoraTarget, Tensor)> = Vec::new();
    for t in targets.iter().filter(|t| t.text_encoder) {
        let d = src_t.get(&t.weight, load_kind)? - src_o.get(&t.weight, load_kind)?;
        if !text_encoder_different {
            // a tensor-scalar comparison, in the diff's dtype, as the script makes it
            let m = d.abs().max();
            if m.gt(args.min_diff).int64_value(&[]) != 0 {
                text_encoder_different = true;
                eprintln!(
                    "Text encoder is different. {} > {}",
                    m.to_kind(Kind::Double).double_value(&[]),
                    args.min_diff
                );
            }
        }
        diffs.push((t, d));
    }
    if !text_encoder_different {
        eprintln!("warning: Text encoder is same. Extract U-Net only.");
        diffs.clear();
    }
    let te_diffs = std::mem::take(&mut diffs);

    eprintln!("calculating by svd");
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut factor = |t: &LoraTarget, diff: Tensor| -> Result<()> {
        let mat = diff.to_device(device).to_kind(Kind::Float);
        let s = mat.size();
        let (out_dim, in_dim) = (s[0], s[1]);
        let rank = t.rank.min(in_dim).min(out_dim);
        let m2 = if t.conv3 {
            mat.flatten(1, -1)
        } else if s.len() == 4 {
            mat.reshape([out_dim, in_dim])
        } else {
            mat
        };
        let (u, sv, vh) = lowrank::svd(&m2);
        let (up, down) = lowrank::truncate(&u, &sv, &vh, rank);
        let (up, down) = lowrank::clamp_quantile(&up, &down, args.clamp_quantile);
        let kernel = (s.len() == 4).then(|| (s[2], s[3]));
        let (up, down) = lowrank::to_lora_shapes(up, down, kernel, in_dim);
        // the factors go through the save dtype into the network's float32 parameters, which
        // save_weights casts to it again: one rounding
        let through = |x: Tensor| -> Tensor {
            let x = x.to_device(tch::Device::Cpu);
            match save_kind {
                Some(k) => x.to_kind(k),
                None => x,
            }
            .contiguous()
        };
        let alpha = Tensor::from(rank as f32);
        let alpha = match save_kind {
            Some(k) => alpha.to_kind(k),
            None => alpha,
        };
        tensors.push((format!("{}.alpha", t.lora_name), alpha));
        tensors.push((format!("{}.lora_down.weight", t.lora_name), through(down)));
        tensors.push((format!("{}.lora_up.weight", t.lora_name), through(up)));
        Ok(())
    };
    for (t, d) in te_diffs {
        factor(t, d)?;
    }
    for t in targets.iter().filter(|t| !t.text_encoder) {
        let d = src_t.get(&t.weight, load_kind)? - src_o.get(&t.weight, load_kind)?;
        factor(t, d)?;
    }

    let mut metadata = BTreeMap::new();
    let py_bool = crate::lora::metadata::py_bool;
    metadata.insert("ss_v2".to_string(), py_bool(args.v2));
    let version = format!(
        "sd_{}{}",
        if args.v2 { "v2" } else { "v1" },
        if v_param { "_v" } else { "" }
    );
    metadata.insert("ss_base_model_version".into(), version);
    metadata.insert("ss_network_module".into(), "networks.lora".into());
    metadata.insert("ss_network_dim".into(), args.dim.to_string());
    metadata.insert(
        "ss_network_alpha".into(),
        crate::lora::metadata::py_float(args.dim as f64),
    );
    metadata.insert(
        "ss_network_args".into(),
        match args.conv_dim {
            Some(c) => format!(
                "{{\"conv_dim\": \"{c}\", \"conv_alpha\": \"{}\"}}",
                crate::lora::metadata::py_float(c as f64)
            ),
            None => "{}".into(),
        },
    );
    if !args.no_metadata {
        let mut spec = ModelSpec::new(args.v2, v_param, Some("lora"));
        spec.title = Some(file_stem(&save_to));
        metadata.extend(spec.keys(crate::lora::metadata::now_unix()));
    }
    let (h, l) = super::sshs_hashes(&tensors, &metadata)?;
    metadata.insert("sshs_model_hash".into(), h);
    metadata.insert("sshs_legacy_hash".into(), l);
    super::save_state_dict(&save_to, &tensors, Some(&metadata))?;
    eprintln!("LoRA weights are saved to: {}", save_to.display());
    Ok(0)
}
