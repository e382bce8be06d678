//! The LoRA network: which layers get a module, their ranks/alphas, parameter groups, save and
//! load (spec: sdscripts_model_math.md §3; sdscripts_cli_data.md §1.6, §5.2).
use super::file::{save_with_hashes, LoraFile};
use super::module::{Alpha, LoraModule, WrappedKind};
use crate::models::layers::{Adapter, Container, LayerInfo, LayerMut, VisitLayers};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

pub const PREFIX_UNET: &str = "lora_unet";
pub const PREFIX_TEXT_ENCODER: &str = "lora_te";
/// The only `--network_module` sdlora implements.
pub const NETWORK_MODULE: &str = "networks.lora";

/// `--network_args` keys sd-scripts' `networks.lora` accepts that sdlora does not implement.
const UNSUPPORTED_ARGS: [&str; 8] = [
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
    "block_lr_zero_threshold",
];

/// Everything that shapes the network, from sd-scripts' network flags.
#[derive(Debug, Clone)]
pub struct LoraOptions {
    /// `--network_dim` (None → 4).
    pub network_dim: i64,
    /// `--network_alpha`: omitted → the int 1 (int64 alpha buffer), given → float32 buffer.
    pub network_alpha: Alpha,
    /// `conv_dim` network arg: enables LoRA on the 3×3 convs of ResnetBlock2D/Down/Upsample2D.
    pub conv_dim: Option<i64>,
    /// `conv_alpha` network arg (default 1.0 when conv_dim is given).
    pub conv_alpha: Option<Alpha>,
    /// `--network_dropout` (neuron dropout on the rank activations).
    pub dropout: Option<f64>,
    pub rank_dropout: Option<f64>,
    pub module_dropout: Option<f64>,
    /// 1.0 in training (`create_network(1.0, ...)`).
    pub multiplier: f64,
    /// false with `--network_train_unet_only`: TE modules are still created (RNG) but not applied.
    pub apply_text_encoder: bool,
    /// false with `--network_train_text_encoder_only`.
    pub apply_unet: bool,
    pub loraplus_lr_ratio: Option<f64>,
    pub loraplus_unet_lr_ratio: Option<f64>,
    pub loraplus_text_encoder_lr_ratio: Option<f64>,
    /// `--network_args` as parsed by train_network.py (`key=value` split at the first '=', later
    /// duplicates overwrite in place), in order; used for `ss_network_args`.
    pub network_args: Vec<(String, String)>,
}

impl Default for LoraOptions {
    fn default() -> Self {
        LoraOptions {
            network_dim: 4,
            network_alpha: Alpha::int(1),
            conv_dim: None,
            conv_alpha: None,
            dropout: None,
            rank_dropout: None,
            module_dropout: None,
            multiplier: 1.0,
            apply_text_encoder: true,
            apply_unet: true,
            loraplus_lr_ratio: None,
            loraplus_unet_lr_ratio: None,
            loraplus_text_encoder_lr_ratio: None,
            network_args: vec![],
        }
    }
}

fn parse_f64(key: &str, v: &str) -> Result<f64> {
    v.trim().parse::<f64>().with_context(|| {
        format!("--network_args {key}={v}: {key} must be a number (e.g. {key}=0.1)")
    })
}

/// `--network_args` list → ordered (key, value) pairs, as train_network.py builds `net_kwargs`.
pub fn parse_network_args(network_args: &[String]) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = vec![];
    for a in network_args {
        let Some((k, v)) = a.split_once('=') else {
            bail!("--network_args {a:?}: each network argument must be key=value (e.g. \"conv_dim=4\")");
        };
        match out.iter_mut().find(|(ek, _)| ek == k) {
            Some(e) => e.1 = v.to_string(),
            None => out.push((k.to_string(), v.to_string())),
        }
    }
    Ok(out)
}

impl LoraOptions {
    /// Builds the options from sd-scripts' flags. `network_alpha` is None when the flag was
    /// omitted (sd-scripts then uses the int 1); given, it keeps its Python type: a command-line
    /// value is a float (float32 alpha, even for `--network_alpha=1`), a `--config_file` integer
    /// an int (int64 alpha). Errors name the flag.
    pub fn from_args(
        network_module: Option<&str>,
        network_dim: Option<i64>,
        network_alpha: Option<Alpha>,
        network_dropout: Option<f64>,
        network_args: &[String],
        network_train_unet_only: bool,
        network_train_text_encoder_only: bool,
    ) -> Result<Self> {
        match network_module {
            Some(NETWORK_MODULE) => {}
            Some(m) => bail!(
                "--network_module={m} is not supported: sdlora implements only --network_module={NETWORK_MODULE} \
                 (LoRA / LoCon with conv_dim); LyCORIS, DyLoRA, OFT and others are not available"
            ),
            None => bail!("--network_module is required; use --network_module={NETWORK_MODULE}"),
        }
        if network_train_unet_only && network_train_text_encoder_only {
            bail!(
                "--network_train_unet_only and --network_train_text_encoder_only together leave nothing to train; give at most one"
            );
        }
        let network_dim = network_dim.unwrap_or(4);
        if network_dim < 0 {
            bail!("--network_dim={network_dim}: the rank must be a positive integer (e.g. --network_dim=4)");
        }
        let mut o = LoraOptions {
            network_dim,
            network_alpha: network_alpha.unwrap_or(Alpha::int(1)),
            dropout: network_dropout,
            apply_text_encoder: !network_train_unet_only,
            apply_unet: !network_train_text_encoder_only,
            network_args: parse_network_args(network_args)?,
            ..Default::default()
        };
        for (k, v) in o.network_args.clone() {
            match k.as_str() {
                "conv_dim" => {
                    o.conv_dim = Some(v.trim().parse::<i64>().with_context(|| {
                        format!("--network_args conv_dim={v}: conv_dim must be an integer rank")
                    })?)
                }
                "conv_alpha" => o.conv_alpha = Some(Alpha::float(parse_f64(&k, &v)?)),
                "rank_dropout" => o.rank_dropout = Some(parse_f64(&k, &v)?),
                "module_dropout" => o.module_dropout = Some(parse_f64(&k, &v)?),
                // train_network.py itself inserts "dropout" (= --network_dropout); LoRA ignores it.
                "dropout" => {}
                "loraplus_lr_ratio" => o.loraplus_lr_ratio = Some(parse_f64(&k, &v)?),
                "loraplus_unet_lr_ratio" => o.loraplus_unet_lr_ratio = Some(parse_f64(&k, &v)?),
                "loraplus_text_encoder_lr_ratio" => {
                    o.loraplus_text_encoder_lr_ratio = Some(parse_f64(&k, &v)?)
                }
                k if UNSUPPORTED_ARGS.contains(&k) => bail!(
                    "--network_args {k}=…: block-wise ranks/learning rates are not supported by sdlora yet; \
                     supported keys: conv_dim, conv_alpha, rank_dropout, module_dropout, loraplus_lr_ratio, \
                     loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio"
                ),
                k => bail!(
                    "--network_args {k}={v}: unknown key for networks.lora; supported keys: conv_dim, conv_alpha, \
                     rank_dropout, module_dropout, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio"
                ),
            }
        }
        if o.conv_dim.is_some() && o.conv_alpha.is_none() {
            o.conv_alpha = Some(Alpha::float(1.0));
        }
        if let Some(d) = o.conv_dim.filter(|&d| d < 0) {
            bail!("--network_args conv_dim={d}: the rank must be a positive integer");
        }
        // sd-scripts skips every layer whose rank is 0: rank 0 with conv_dim trains the 3x3 convs
        // only; without it there is no module at all and its optimizer stops on an empty list.
        if network_dim == 0 && o.conv_dim.unwrap_or(0) == 0 {
            bail!(
                "--network_dim=0: a rank of 0 creates no LoRA module (sd-scripts skips rank-0 layers), and \
                 no --network_args conv_dim=… gives the 3x3 convs one: nothing to train. Use e.g. --network_dim=4"
            );
        }
        Ok(o)
    }
}

/// One optimizer parameter group, the optimizers' own type; `name` is sd-scripts' lr
/// description ("textencoder", "textencoder plus", "unet", "unet plus").
pub use crate::train::optim::common::ParamGroup;

/// What `load_weights` did, like torch's `load_state_dict(strict=False)` report.
#[derive(Debug, Default, Clone)]
pub struct LoadInfo {
    pub loaded_modules: usize,
    /// Network keys the file did not have (left at their current values).
    pub missing_keys: Vec<String>,
    /// File keys the network has no module for (ignored, as sd-scripts does).
    pub unexpected_keys: Vec<String>,
}

impl std::fmt::Display for LoadInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} modules loaded, {} missing keys, {} unexpected keys",
            self.loaded_modules,
            self.missing_keys.len(),
            self.unexpected_keys.len()
        )
    }
}

/// The network: LoRA modules for the text encoder and the UNet, in creation order.
#[derive(Debug)]
pub struct LoraNetwork {
    /// Applied text-encoder modules (empty with `--network_train_unet_only`).
    pub text_encoder_loras: Vec<Arc<LoraModule>>,
    /// Applied UNet modules (empty with `--network_train_text_encoder_only`).
    pub unet_loras: Vec<Arc<LoraModule>>,
    pub opts: LoraOptions,
    /// Modules created per side, applied or not (sd-scripts logs these counts).
    pub created_text_encoder: usize,
    pub created_unet: usize,
    /// Built by `--dim_from_weights`.
    pub from_weights: bool,
}

/// `--save_model_as`: safetensors (with metadata and hashes), or ckpt/pt, which sd-scripts writes
/// as `torch.save(state_dict)` without metadata; checked before training starts.
pub fn check_save_model_as(save_model_as: &str) -> Result<()> {
    match save_model_as {
        "safetensors" | "ckpt" | "pt" => Ok(()),
        v => bail!("--save_model_as={v}: invalid choice (choose from ckpt, pt, safetensors)"),
    }
}

/// Per-module rank and alpha taken from a file (`--dim_from_weights`).
struct FromWeights {
    dims: HashMap<String, i64>,
    alphas: HashMap<String, Alpha>,
}

fn module_name(prefix: &str, path: &str) -> String {
    format!("{prefix}.{path}").replace('.', "_")
}

fn is_te_container(c: Container) -> bool {
    matches!(c, Container::ClipAttention | Container::ClipMlp)
}

fn is_conv3x3_container(c: Container) -> bool {
    matches!(
        c,
        Container::ResnetBlock2D | Container::Downsample2D | Container::Upsample2D
    )
}

impl LoraNetwork {
    /// Creates the network as `networks.lora.create_network` + `apply_to` do: modules for the text
    /// encoder first, then the UNet, each in the model's `named_modules()` order, weights drawn
    /// from the libtorch global CPU generator (seed it with `tch::manual_seed` first). Modules of
    /// a side that is not trained are still created (they consume RNG, as in sd-scripts) but not
    /// attached.
    pub fn create(
        text_encoder: Option<&mut dyn VisitLayers>,
        unet: &mut dyn VisitLayers,
        opts: &LoraOptions,
    ) -> Result<Self> {
        Self::build(text_encoder, unet, opts, None)
    }

    /// `--dim_from_weights`: the rank and alpha of every module come from `file` (missing alpha →
    /// alpha = rank), only modules present in the file are created (3×3 conv targets included),
    /// then the file's weights are loaded. `opts` supplies dropout, multiplier and which sides are
    /// applied; its dims/alphas are ignored.
    pub fn create_from_weights(
        text_encoder: Option<&mut dyn VisitLayers>,
        unet: &mut dyn VisitLayers,
        file: &LoraFile,
        opts: &LoraOptions,
    ) -> Result<Self> {
        let mut fw = FromWeights {
            dims: HashMap::new(),
            alphas: HashMap::new(),
        };
        for (name, m) in &file.modules {
            let rank = m.rank().expect("validated: every module has lora_down");
            fw.dims.insert(name.clone(), rank);
            let alpha = match m.alpha_value() {
                Some(a) => Alpha::from_file_value(a),
                None => Alpha::int(rank),
            };
            fw.alphas.insert(name.clone(), alpha);
        }
        let net = Self::build(text_encoder, unet, opts, Some(&fw))?;
        let created: HashSet<&str> = net.all_modules().map(|m| m.name.as_str()).collect();
        let orphans: Vec<&String> = fw
            .dims
            .keys()
            .filter(|n| !created.contains(n.as_str()))
            .collect();
        if !orphans.is_empty() && net.opts.apply_text_encoder && net.opts.apply_unet {
            eprintln!(
                "warning: {}: {} modules match no layer of this model and are ignored (first: {})",
                file.path,
                orphans.len(),
                orphans[0]
            );
        }
        net.load_file(file)?;
        Ok(net)
    }

    fn build(
        text_encoder: Option<&mut dyn VisitLayers>,
        unet: &mut dyn VisitLayers,
        opts: &LoraOptions,
        from_weights: Option<&FromWeights>,
    ) -> Result<Self> {
        let mut te_loras = vec![];
        if let Some(te) = text_encoder {
            te_loras = Self::create_modules(
                te,
                PREFIX_TEXT_ENCODER,
                false,
                opts,
                from_weights,
                opts.apply_text_encoder,
            )?;
        }
        let conv_targets = from_weights.is_some() || opts.conv_dim.is_some();
        let unet_loras = Self::create_modules(
            unet,
            PREFIX_UNET,
            conv_targets,
            opts,
            from_weights,
            opts.apply_unet,
        )?;
        let mut names = HashSet::new();
        for m in te_loras.iter().chain(unet_loras.iter()) {
            if !names.insert(m.name.clone()) {
                bail!(
                    "duplicated LoRA module name {} (the model's layer paths are not unique)",
                    m.name
                );
            }
        }
        Ok(LoraNetwork {
            created_text_encoder: te_loras.len(),
            created_unet: unet_loras.len(),
            from_weights: from_weights.is_some(),
            text_encoder_loras: if opts.apply_text_encoder {
                te_loras
            } else {
                vec![]
            },
            unet_loras: if opts.apply_unet { unet_loras } else { vec![] },
            opts: opts.clone(),
        })
    }

    fn create_modules(
        model: &mut dyn VisitLayers,
        prefix: &str,
        conv_targets: bool,
        opts: &LoraOptions,
        from_weights: Option<&FromWeights>,
        attach: bool,
    ) -> Result<Vec<Arc<LoraModule>>> {
        let mut loras = vec![];
        let mut error: Option<anyhow::Error> = None;
        let is_te = prefix == PREFIX_TEXT_ENCODER;
        model.visit_layers(&mut |info: &LayerInfo<'_>, layer: LayerMut<'_>| {
            if error.is_some() {
                return;
            }
            let targeted = if is_te {
                is_te_container(info.container)
            } else {
                info.container == Container::Transformer2D
                    || (conv_targets && is_conv3x3_container(info.container))
            };
            if !targeted {
                return;
            }
            let (wrapped, in_dim, out_dim) = match &layer {
                LayerMut::Linear(l) => (WrappedKind::Linear, l.in_features(), l.out_features()),
                LayerMut::Conv2d(c) => (
                    WrappedKind::Conv2d {
                        kernel: c.kernel_size(),
                        stride: c.stride,
                        padding: c.padding,
                    },
                    c.in_channels(),
                    c.out_channels(),
                ),
            };
            let name = module_name(prefix, info.path);
            let (dim, alpha) = match from_weights {
                Some(fw) => match fw.dims.get(&name) {
                    Some(&d) => (d, Some(fw.alphas[&name])),
                    None => return,
                },
                None if wrapped.is_linear_like() => (opts.network_dim, Some(opts.network_alpha)),
                None => match opts.conv_dim {
                    Some(d) => (d, opts.conv_alpha),
                    None => return,
                },
            };
            if dim == 0 {
                return;
            }
            let m = Arc::new(LoraModule::new(
                name,
                wrapped,
                in_dim,
                out_dim,
                dim,
                alpha,
                opts.multiplier,
                opts.dropout,
                opts.rank_dropout,
                opts.module_dropout,
            ));
            if attach {
                let adapter: Arc<dyn Adapter> = m.clone();
                let slot = match layer {
                    LayerMut::Linear(l) => &mut l.adapter,
                    LayerMut::Conv2d(c) => &mut c.adapter,
                };
                if slot.is_some() {
                    error = Some(anyhow::anyhow!(
                        "layer {} already has an adapter attached; create the LoRA network only once per model",
                        info.path
                    ));
                    return;
                }
                *slot = Some(adapter);
            }
            loras.push(m);
        });
        match error {
            Some(e) => Err(e),
            None => Ok(loras),
        }
    }

    /// The lines sd-scripts logs while creating and applying the network (`LoRANetwork.__init__`,
    /// `apply_to`), for the trainer's console output.
    pub fn log_lines(&self) -> Vec<String> {
        let o = &self.opts;
        let p = |v: Option<f64>| {
            v.map(super::metadata::py_float)
                .unwrap_or_else(|| "None".into())
        };
        let mut l = vec![];
        if self.from_weights {
            l.push("create LoRA network from weights".to_string());
        } else {
            l.push(format!(
                "create LoRA network. base dim (rank): {}, alpha: {}",
                o.network_dim,
                o.network_alpha.py_str()
            ));
            l.push(format!(
                "neuron dropout: p={}, rank dropout: p={}, module dropout: p={}",
                p(o.dropout),
                p(o.rank_dropout),
                p(o.module_dropout)
            ));
            if let (Some(d), Some(a)) = (o.conv_dim, &o.conv_alpha) {
                l.push(format!(
                    "apply LoRA to Conv2d with kernel size (3,3). dim (rank): {d}, alpha: {}",
                    a.py_str()
                ));
            }
        }
        l.push("create LoRA for Text Encoder:".into());
        l.push(format!(
            "create LoRA for Text Encoder: {} modules.",
            self.created_text_encoder
        ));
        l.push(format!(
            "create LoRA for U-Net: {} modules.",
            self.created_unet
        ));
        if o.apply_text_encoder {
            l.push(format!(
                "enable LoRA for text encoder: {} modules",
                self.text_encoder_loras.len()
            ));
        }
        if o.apply_unet {
            l.push(format!(
                "enable LoRA for U-Net: {} modules",
                self.unet_loras.len()
            ));
        }
        l
    }

    /// `--scale_weight_norms`: sd-scripts' `apply_max_norm_regularization` — each module's
    /// ‖up·down·alpha/rank‖ is clamped to `max_norm` by scaling up and down by √ratio. Returns
    /// (modules scaled, mean norm, max norm) after scaling.
    pub fn apply_max_norm_regularization(&self, max_norm: f64) -> (usize, f64, f64) {
        let mut scaled = 0;
        let mut norms = vec![];
        tch::no_grad(|| {
            for m in self.all_modules() {
                let (mut down, mut up) = m.parameters();
                let alpha = m.alpha();
                // alpha / dim as a tensor division, as in sd-scripts (int64 alpha → float32).
                let scale = alpha.true_divide_scalar(m.rank).to_kind(Kind::Float);
                let (ds, us) = (down.size(), up.size());
                let updown = if ds.len() == 4 && ds[2..] == [1, 1] && us[2..] == [1, 1] {
                    up.squeeze_dim(3)
                        .squeeze_dim(2)
                        .matmul(&down.squeeze_dim(3).squeeze_dim(2))
                        .unsqueeze(2)
                        .unsqueeze(3)
                } else if ds.len() == 4 {
                    down.permute([1, 0, 2, 3])
                        .conv2d::<&Tensor>(&up, None, [1, 1], [0, 0], [1, 1], 1)
                        .permute([1, 0, 2, 3])
                } else {
                    up.matmul(&down)
                };
                let updown = updown * scale.to_device(down.device());
                let norm = updown.norm().clamp_min(max_norm / 2.0);
                let desired = norm.clamp_max(max_norm);
                let ratio = (&desired / &norm).to_device(Device::Cpu);
                let sqrt_ratio = ratio.pow_tensor_scalar(0.5);
                if ratio.double_value(&[]) != 1.0 {
                    scaled += 1;
                    let s = sqrt_ratio.to_device(down.device());
                    let _ = up.g_mul_(&s);
                    let _ = down.g_mul_(&s);
                }
                let scalednorm = updown.norm().to_device(Device::Cpu) * &ratio;
                norms.push(scalednorm.double_value(&[]));
            }
        });
        let n = norms.len().max(1) as f64;
        let max = norms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        (scaled, norms.iter().sum::<f64>() / n, max)
    }

    /// Text-encoder modules, then UNet modules (sd-scripts' registration order).
    pub fn all_modules(&self) -> impl Iterator<Item = &Arc<LoraModule>> {
        self.text_encoder_loras.iter().chain(self.unet_loras.iter())
    }

    pub fn set_multiplier(&self, multiplier: f64) {
        for m in self.all_modules() {
            m.set_multiplier(multiplier);
        }
    }

    /// Training mode enables the dropouts (sd-scripts `network.train()` / `.eval()`).
    pub fn set_training(&self, training: bool) {
        for m in self.all_modules() {
            m.set_training(training);
        }
    }

    pub fn to_device(&self, device: Device) {
        for m in self.all_modules() {
            m.to_device(device);
        }
    }

    /// `--full_fp16` / `--full_bf16`: cast the network's parameters.
    pub fn to_kind(&self, kind: Kind) {
        for m in self.all_modules() {
            m.to_kind(kind);
        }
    }

    /// All trainable tensors, down before up per module, TE modules first.
    pub fn parameters(&self) -> Vec<Tensor> {
        self.all_modules()
            .flat_map(|m| {
                let (d, u) = m.parameters();
                [d, u]
            })
            .collect()
    }

    /// Optimizer groups as sd-scripts' `prepare_optimizer_params(text_encoder_lr, unet_lr,
    /// default_lr)`: TE group then UNet group, each split into "lora"/"plus" (lora_up, lr × ratio)
    /// under LoRA+; a group whose lr is 0 is dropped ("NO LR skipping!").
    pub fn param_groups(
        &self,
        text_encoder_lr: Option<f64>,
        unet_lr: Option<f64>,
        default_lr: f64,
    ) -> Vec<ParamGroup> {
        let mut groups = vec![];
        let mut assemble = |loras: &[Arc<LoraModule>], lr: f64, ratio: Option<f64>, desc: &str| {
            let mut lora = vec![];
            let mut plus = vec![];
            for m in loras {
                let (d, u) = m.parameters();
                lora.push(d);
                if ratio.is_some() {
                    plus.push(u);
                } else {
                    lora.push(u);
                }
            }
            for (params, group_lr, suffix) in
                [(lora, lr, ""), (plus, lr * ratio.unwrap_or(1.0), " plus")]
            {
                if params.is_empty() {
                    continue;
                }
                if group_lr == 0.0 {
                    eprintln!("NO LR skipping!");
                    continue;
                }
                groups.push(ParamGroup::new(format!("{desc}{suffix}"), params, group_lr));
            }
        };
        let o = &self.opts;
        if !self.text_encoder_loras.is_empty() {
            assemble(
                &self.text_encoder_loras,
                text_encoder_lr.unwrap_or(default_lr),
                o.loraplus_text_encoder_lr_ratio.or(o.loraplus_lr_ratio),
                "textencoder",
            );
        }
        if !self.unet_loras.is_empty() {
            assemble(
                &self.unet_loras,
                unet_lr.unwrap_or(default_lr),
                o.loraplus_unet_lr_ratio.or(o.loraplus_lr_ratio),
                "unet",
            );
        }
        groups
    }

    /// The network's state dict in registration order: per module alpha, lora_down.weight,
    /// lora_up.weight.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        self.all_modules().flat_map(|m| m.state_dict()).collect()
    }

    /// Saves like sd-scripts' `save_weights`: every tensor (alpha included) cast to
    /// `save_precision` if given (`--save_precision` fp16/bf16/float), else stored as is (fp32
    /// weights, int64 or float32 alpha); `sshs_model_hash`/`sshs_legacy_hash` added to
    /// `metadata`; written atomically. Returns the metadata written.
    pub fn save(
        &self,
        path: &Path,
        save_precision: Option<Kind>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>> {
        let tensors: Vec<(String, Tensor)> = self
            .state_dict()
            .into_iter()
            .map(|(k, t)| {
                let t = t.detach().to_device(Device::Cpu);
                let t = match save_precision {
                    Some(kind) => t.to_kind(kind),
                    None => t,
                };
                (k, t)
            })
            .collect();
        save_with_hashes(path, &tensors, metadata)
    }

    /// `--network_weights`: `load_state_dict(strict=False)` semantics — matching tensors overwrite
    /// the module's (cast into their dtype), missing/unexpected modules are reported, a shape
    /// mismatch or a non-LoRA key is an error. As in sd-scripts, `scale` keeps the value from
    /// the network's own alpha.
    pub fn load_weights(&self, path: &Path) -> Result<LoadInfo> {
        let file = LoraFile::load(path)?;
        self.load_file(&file)
    }

    pub fn load_file(&self, file: &LoraFile) -> Result<LoadInfo> {
        let mut info = LoadInfo::default();
        let mut seen = HashSet::new();
        for m in self.all_modules() {
            seen.insert(m.name.clone());
            match file.modules.get(&m.name) {
                Some(t) => {
                    m.copy_from(t.down.as_ref(), t.up.as_ref(), t.alpha.as_ref())
                        .with_context(|| format!("loading {}", file.path))?;
                    if t.alpha.is_none() {
                        info.missing_keys.push(format!("{}.alpha", m.name));
                    }
                    info.loaded_modules += 1;
                }
                None => {
                    for r in super::file::ROLES {
                        info.missing_keys.push(format!("{}.{r}", m.name));
                    }
                }
            }
        }
        for k in file.tensors.keys() {
            let name = k.split_once('.').map(|(n, _)| n).unwrap_or(k);
            if !seen.contains(name) {
                info.unexpected_keys.push(k.clone());
            }
        }
        Ok(info)
    }
}
