//! The Stable Diffusion VAE (Diffusers `AutoencoderKL`, 0.32.1): encoder to the diagonal-Gaussian
//! posterior and decoder back to pixels. Parameter names follow Diffusers (`encoder.down_blocks.0.
//! resnets.0.norm1.weight`, `encoder.mid_block.attentions.0.to_q.weight`, `quant_conv.weight`,
//! `decoder.up_blocks.…`), so a [`WeightMap`] from any loader plugs in unchanged.
//! spec: sdscripts_model_math.md §1.3
use super::attention::{attention, AttentionBackend, AttentionOptions};
use super::config::VaeConfig;
use super::layers::{Conv2d, Linear};
use super::nn::{key, GroupNorm};
use super::weights::WeightMap;
use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

/// GroupNorm eps of every VAE norm (Diffusers builds the VAE blocks with `resnet_eps=1e-6`).
const NORM_EPS: f64 = 1e-6;
/// `DiagonalGaussianDistribution` clamps the log-variance to this range.
pub const LOGVAR_MIN: f64 = -30.0;
pub const LOGVAR_MAX: f64 = 20.0;
/// Encoder downsamplers pad right and bottom by one pixel and then convolve without padding
/// (`Downsample2D` with `padding=0`): (left, right, top, bottom).
const DOWNSAMPLE_PAD: [i64; 4] = [0, 1, 0, 1];
/// The Diffusers nearest-neighbour upsampling factor of `Upsample2D`.
const UPSAMPLE_FACTOR: f64 = 2.0;

impl VaeConfig {
    /// Reads a Diffusers `vae/config.json`. Fields this implementation does not support (other
    /// block types, activations, no mid attention, no quant convs) are errors rather than being
    /// silently ignored.
    pub fn from_diffusers_json(json: &serde_json::Value, source: &str) -> Result<Self> {
        let d = VaeConfig::sd();
        let int = |name: &str, default: i64| -> Result<i64> {
            match json.get(name) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => v
                    .as_i64()
                    .with_context(|| format!("{source}: `{name}` must be an integer, got {v}")),
            }
        };
        let block_out_channels = match json.get("block_out_channels") {
            None => d.block_out_channels.clone(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_i64()).collect::<Option<Vec<_>>>())
                .with_context(|| {
                    format!("{source}: `block_out_channels` must be a list of integers, got {v}")
                })?,
        };
        if block_out_channels.is_empty() {
            bail!("{source}: `block_out_channels` is empty");
        }
        let n = block_out_channels.len();
        let check_list = |name: &str, want: &str| -> Result<()> {
            if let Some(v) = json.get(name) {
                let ok = v
                    .as_array()
                    .is_some_and(|a| a.len() == n && a.iter().all(|x| x.as_str() == Some(want)));
                if !ok {
                    bail!("{source}: unsupported `{name}` {v}: sdlora's VAE supports {n} × \"{want}\"");
                }
            }
            Ok(())
        };
        check_list("down_block_types", "DownEncoderBlock2D")?;
        check_list("up_block_types", "UpDecoderBlock2D")?;
        let check_eq = |name: &str, want: serde_json::Value| -> Result<()> {
            match json.get(name) {
                None | Some(serde_json::Value::Null) => Ok(()),
                Some(v) if *v == want => Ok(()),
                Some(v) => {
                    bail!("{source}: unsupported `{name}` = {v} (sdlora's VAE needs {want})")
                }
            }
        };
        check_eq("act_fn", "silu".into())?;
        check_eq("mid_block_add_attention", true.into())?;
        check_eq("use_quant_conv", true.into())?;
        check_eq("use_post_quant_conv", true.into())?;
        let scaling_factor = match json.get("scaling_factor") {
            None | Some(serde_json::Value::Null) => d.scaling_factor,
            Some(v) => v
                .as_f64()
                .with_context(|| format!("{source}: `scaling_factor` must be a number, got {v}"))?,
        };
        Ok(VaeConfig {
            in_channels: int("in_channels", d.in_channels)?,
            out_channels: int("out_channels", d.out_channels)?,
            block_out_channels,
            layers_per_block: int("layers_per_block", d.layers_per_block)?,
            latent_channels: int("latent_channels", d.latent_channels)?,
            norm_num_groups: int("norm_num_groups", d.norm_num_groups)?,
            scaling_factor,
        })
    }
}

fn conv(
    w: &mut WeightMap,
    prefix: &str,
    (cin, cout, k): (i64, i64, i64),
    stride: i64,
    padding: i64,
) -> Result<Conv2d> {
    let weight = w.take_shaped(&key(prefix, "weight"), &[cout, cin, k, k])?;
    let bias = w.take_shaped(&key(prefix, "bias"), &[cout])?;
    Ok(Conv2d::new(weight, Some(bias), stride, padding))
}

fn linear(w: &mut WeightMap, prefix: &str, cin: i64, cout: i64) -> Result<Linear> {
    let weight = w.take_shaped(&key(prefix, "weight"), &[cout, cin])?;
    let bias = w.take_shaped(&key(prefix, "bias"), &[cout])?;
    Ok(Linear::new(weight, Some(bias)))
}

fn group_norm(w: &mut WeightMap, prefix: &str, groups: i64, channels: i64) -> Result<GroupNorm> {
    let gn = GroupNorm::load(w, prefix, groups, NORM_EPS)?;
    for (name, t) in [("weight", &gn.weight), ("bias", &gn.bias)] {
        if t.size() != [channels] {
            bail!(
                "{}: key `{}` has shape {:?}, expected [{channels}]",
                w.source,
                key(prefix, name),
                t.size()
            );
        }
    }
    Ok(gn)
}

/// Diffusers `ResnetBlock2D` without time embedding (VAE flavour: no temb, output scale 1).
#[derive(Debug)]
pub struct ResnetBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(w: &mut WeightMap, p: &str, groups: i64, cin: i64, cout: i64) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: group_norm(w, &key(p, "norm1"), groups, cin)?,
            conv1: conv(w, &key(p, "conv1"), (cin, cout, 3), 1, 1)?,
            norm2: group_norm(w, &key(p, "norm2"), groups, cout)?,
            conv2: conv(w, &key(p, "conv2"), (cout, cout, 3), 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(conv(w, &key(p, "conv_shortcut"), (cin, cout, 1), 1, 0)?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.conv_shortcut {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }
}

/// The mid block's single-head self-attention over the H·W positions (Diffusers `Attention`
/// with `residual_connection=True`, `rescale_output_factor=1`).
#[derive(Debug)]
pub struct SpatialSelfAttention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
}

impl SpatialSelfAttention {
    fn load(w: &mut WeightMap, p: &str, groups: i64, c: i64) -> Result<Self> {
        Ok(SpatialSelfAttention {
            group_norm: group_norm(w, &key(p, "group_norm"), groups, c)?,
            to_q: linear(w, &key(p, "to_q"), c, c)?,
            to_k: linear(w, &key(p, "to_k"), c, c)?,
            to_v: linear(w, &key(p, "to_v"), c, c)?,
            to_out: linear(w, &key(p, "to_out.0"), c, c)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("VAE attention input must be (B, C, H, W)");
        // (B, C, H, W) -> (B, H·W, C): the norm runs over channels first, as Diffusers does.
        let t = self
            .group_norm
            .forward(x)
            .view([b, c, h * w])
            .transpose(1, 2);
        // One head of width C, scale C^-0.5: Diffusers' default processor is SDPA (sd-scripts
        // leaves the VAE on it; spec §1.3, §7).
        let q = self.to_q.forward(&t).unsqueeze(1);
        let k = self.to_k.forward(&t).unsqueeze(1);
        let v = self.to_v.forward(&t).unsqueeze(1);
        let a = attention(
            &q,
            &k,
            &v,
            AttentionBackend::Sdpa,
            AttentionOptions::default(),
        )
        .squeeze_dim(1);
        let out = self.to_out.forward(&a);
        out.transpose(1, 2).reshape([b, c, h, w]) + x
    }
}

/// `UNetMidBlock2D` as the VAE uses it: resnet → attention → resnet.
#[derive(Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock>,
    pub attention: SpatialSelfAttention,
}

impl MidBlock {
    fn load(w: &mut WeightMap, p: &str, groups: i64, c: i64) -> Result<Self> {
        Ok(MidBlock {
            resnets: vec![
                ResnetBlock::load(w, &key(p, "resnets.0"), groups, c, c)?,
                ResnetBlock::load(w, &key(p, "resnets.1"), groups, c, c)?,
            ],
            attention: SpatialSelfAttention::load(w, &key(p, "attentions.0"), groups, c)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.resnets[0].forward(x);
        let h = self.attention.forward(&h);
        self.resnets[1].forward(&h)
    }
}

/// `DownEncoderBlock2D`: resnets, then (except at the last level) the asymmetric-pad downsampler.
#[derive(Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock>,
    pub downsampler: Option<Conv2d>,
}

impl DownBlock {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnets[0].forward(x);
        for r in &self.resnets[1..] {
            h = r.forward(&h);
        }
        match &self.downsampler {
            Some(d) => d.forward(&h.constant_pad_nd(DOWNSAMPLE_PAD)),
            None => h,
        }
    }
}

/// `UpDecoderBlock2D`: resnets, then (except at the last level) nearest ×2 and a 3×3 conv.
#[derive(Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock>,
    pub upsampler: Option<Conv2d>,
}

impl UpBlock {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnets[0].forward(x);
        for r in &self.resnets[1..] {
            h = r.forward(&h);
        }
        match &self.upsampler {
            Some(u) => {
                // Diffusers upcasts bf16 around the interpolation only (nearest is exact anyway,
                // but the upcast keeps the kernel choice identical).
                let kind = h.kind();
                let src = if kind == Kind::BFloat16 {
                    h.to_kind(Kind::Float)
                } else {
                    h
                };
                let (_, _, hh, ww) = src.size4().expect("VAE upsampler input must be 4-D");
                let up = src.upsample_nearest2d(
                    [
                        (hh as f64 * UPSAMPLE_FACTOR) as i64,
                        (ww as f64 * UPSAMPLE_FACTOR) as i64,
                    ],
                    UPSAMPLE_FACTOR,
                    UPSAMPLE_FACTOR,
                );
                u.forward(&up.to_kind(kind))
            }
            None => h,
        }
    }
}

#[derive(Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

#[derive(Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

/// Diffusers `AutoencoderKL`.
#[derive(Debug)]
pub struct AutoencoderKL {
    pub config: VaeConfig,
    pub encoder: Encoder,
    pub quant_conv: Conv2d,
    pub post_quant_conv: Conv2d,
    pub decoder: Decoder,
}

impl AutoencoderKL {
    /// Builds the VAE from Diffusers-named weights (converted to the map's device/dtype). Every
    /// shape is checked against `config`; tensors left over in the map are an error.
    pub fn load(config: &VaeConfig, mut weights: WeightMap) -> Result<Self> {
        let w = &mut weights;
        let cfg = config;
        let ch = &cfg.block_out_channels;
        if ch.is_empty() {
            bail!("{}: VAE config has no levels", w.source);
        }
        let g = cfg.norm_num_groups;
        let last = *ch.last().unwrap();
        let lat = cfg.latent_channels;

        // Encoder: conv_in, levels top-down, mid, out (2·latent channels: mean and logvar).
        let conv_in = conv(w, "encoder.conv_in", (cfg.in_channels, ch[0], 3), 1, 1)?;
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let p = format!("encoder.down_blocks.{i}");
            let mut resnets = Vec::new();
            for j in 0..cfg.layers_per_block {
                let c = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock::load(
                    w,
                    &format!("{p}.resnets.{j}"),
                    g,
                    c,
                    cout,
                )?);
            }
            let downsampler = if i + 1 < ch.len() {
                Some(conv(
                    w,
                    &format!("{p}.downsamplers.0.conv"),
                    (cout, cout, 3),
                    2,
                    0,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                downsampler,
            });
            cin = cout;
        }
        let encoder = Encoder {
            conv_in,
            down_blocks,
            mid_block: MidBlock::load(w, "encoder.mid_block", g, last)?,
            conv_norm_out: group_norm(w, "encoder.conv_norm_out", g, last)?,
            conv_out: conv(w, "encoder.conv_out", (last, 2 * lat, 3), 1, 1)?,
        };
        let quant_conv = conv(w, "quant_conv", (2 * lat, 2 * lat, 1), 1, 0)?;
        let post_quant_conv = conv(w, "post_quant_conv", (lat, lat, 1), 1, 0)?;

        // Decoder: levels bottom-up with one more resnet each.
        let rev: Vec<i64> = ch.iter().rev().copied().collect();
        let dec_conv_in = conv(w, "decoder.conv_in", (lat, last, 3), 1, 1)?;
        let dec_mid = MidBlock::load(w, "decoder.mid_block", g, last)?;
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut cin = rev[0];
        for (i, &cout) in rev.iter().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            let mut resnets = Vec::new();
            for j in 0..=cfg.layers_per_block {
                let c = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock::load(
                    w,
                    &format!("{p}.resnets.{j}"),
                    g,
                    c,
                    cout,
                )?);
            }
            let upsampler = if i + 1 < rev.len() {
                Some(conv(
                    w,
                    &format!("{p}.upsamplers.0.conv"),
                    (cout, cout, 3),
                    1,
                    1,
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
            cin = cout;
        }
        let decoder = Decoder {
            conv_in: dec_conv_in,
            mid_block: dec_mid,
            up_blocks,
            conv_norm_out: group_norm(w, "decoder.conv_norm_out", g, ch[0])?,
            conv_out: conv(w, "decoder.conv_out", (ch[0], cfg.out_channels, 3), 1, 1)?,
        };
        weights.finish()?;
        Ok(AutoencoderKL {
            config: config.clone(),
            encoder,
            quant_conv,
            post_quant_conv,
            decoder,
        })
    }

    pub fn device(&self) -> Device {
        self.quant_conv.weight.device()
    }

    pub fn kind(&self) -> Kind {
        self.quant_conv.weight.kind()
    }

    /// Images in [-1, 1], (B, in_channels, H, W) with H, W multiples of the downscale factor →
    /// posterior `(mean, logvar)`, each (B, latent_channels, H/f, W/f); logvar clamped to
    /// [−30, 20] (`DiagonalGaussianDistribution`).
    pub fn encode(&self, x: &Tensor) -> (Tensor, Tensor) {
        let e = &self.encoder;
        let mut h = e.conv_in.forward(x);
        for b in &e.down_blocks {
            h = b.forward(&h);
        }
        let h = e.mid_block.forward(&h);
        let h = e.conv_out.forward(&e.conv_norm_out.forward(&h).silu());
        let moments = self.quant_conv.forward(&h);
        let mut parts = moments.chunk(2, 1);
        let logvar = parts.pop().unwrap().clamp(LOGVAR_MIN, LOGVAR_MAX);
        let mean = parts.pop().unwrap();
        (mean, logvar)
    }

    /// A posterior sample `mean + exp(logvar/2)·ε`, ε drawn from the global torch generator on
    /// the moments' device and dtype (as `latent_dist.sample()`, which sd-scripts uses instead of
    /// the mean; spec §1.3).
    pub fn sample(&self, mean: &Tensor, logvar: &Tensor) -> Tensor {
        let std = (logvar * 0.5).exp();
        let eps = Tensor::randn(mean.size(), (mean.kind(), mean.device()));
        mean + std * eps
    }

    /// `encode` then `sample`: the unscaled latents sd-scripts caches (multiply by
    /// [`VaeConfig::scaling_factor`]-like 0.18215 afterwards).
    pub fn encode_sample(&self, x: &Tensor) -> Tensor {
        let (mean, logvar) = self.encode(x);
        self.sample(&mean, &logvar)
    }

    /// Unscaled latents (B, latent_channels, h, w) → images (B, out_channels, h·f, w·f).
    pub fn decode(&self, z: &Tensor) -> Tensor {
        let d = &self.decoder;
        let z = self.post_quant_conv.forward(z);
        let mut h = d.conv_in.forward(&z);
        h = d.mid_block.forward(&h);
        for b in &d.up_blocks {
            h = b.forward(&h);
        }
        d.conv_out.forward(&d.conv_norm_out.forward(&h).silu())
    }
}
