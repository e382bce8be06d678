//! The SD 1.x/2.x UNet (`UNet2DConditionModel`), as sd-scripts' `library/original_unet.py`
//! computes it (spec: sdscripts_model_math.md §1.1, §1.4), with Diffusers parameter names (§2.1),
//! selectable attention backend (§7) and per-block gradient checkpointing (§6).
use super::attention::{attention, AttentionBackend, AttentionOptions};
use super::config::{BlockKind, UNetConfig};
use super::layers::{Container, Conv2d, LayerInfo, LayerMut, Linear, VisitLayers};
use super::nn::{key, GroupNorm, LayerNorm};
use super::recompute::{alias, checkpoint, Tape};
use super::weights::WeightMap;
use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

/// sd-scripts' `get_timestep_embedding` max_period.
const TIMESTEP_MAX_PERIOD: f64 = 10000.0;
/// `FeedForward` inner width multiplier (GEGLU projects to 2× this).
const FF_MULT: i64 = 4;
/// Spatial factor of one Downsample2D / Upsample2D.
const RESAMPLE_FACTOR: i64 = 2;

fn linear(
    w: &mut WeightMap,
    prefix: &str,
    fan_in: i64,
    fan_out: i64,
    bias: bool,
) -> Result<Linear> {
    let weight = w.take_shaped(&key(prefix, "weight"), &[fan_out, fan_in])?;
    let b = if bias {
        Some(w.take_shaped(&key(prefix, "bias"), &[fan_out])?)
    } else {
        None
    };
    Ok(Linear::new(weight, b))
}

fn conv(
    w: &mut WeightMap,
    prefix: &str,
    cin: i64,
    cout: i64,
    k: i64,
    stride: i64,
    padding: i64,
) -> Result<Conv2d> {
    let weight = w.take_shaped(&key(prefix, "weight"), &[cout, cin, k, k])?;
    let b = w.take_shaped(&key(prefix, "bias"), &[cout])?;
    Ok(Conv2d::new(weight, Some(b), stride, padding))
}

fn group_norm(w: &mut WeightMap, prefix: &str, c: i64, groups: i64, eps: f64) -> Result<GroupNorm> {
    Ok(GroupNorm {
        weight: w.take_shaped(&key(prefix, "weight"), &[c])?,
        bias: w.take_shaped(&key(prefix, "bias"), &[c])?,
        groups,
        eps,
    })
}

fn layer_norm(w: &mut WeightMap, prefix: &str, c: i64, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: w.take_shaped(&key(prefix, "weight"), &[c])?,
        bias: w.take_shaped(&key(prefix, "bias"), &[c])?,
        eps,
    })
}

/// `ResnetBlock2D`: norm1 → SiLU → conv1 (+ time projection) → norm2 → SiLU → conv2, plus
/// shortcut (1×1 conv when channels change).
#[derive(Debug)]
pub struct ResnetBlock2D {
    pub path: String,
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Linear,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    fn load(
        w: &mut WeightMap,
        cfg: &UNetConfig,
        path: String,
        cin: i64,
        cout: i64,
    ) -> Result<Self> {
        let (g, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        Ok(ResnetBlock2D {
            norm1: group_norm(w, &key(&path, "norm1"), cin, g, eps)?,
            conv1: conv(w, &key(&path, "conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: linear(
                w,
                &key(&path, "time_emb_proj"),
                cfg.time_embed_dim(),
                cout,
                true,
            )?,
            norm2: group_norm(w, &key(&path, "norm2"), cout, g, eps)?,
            conv2: conv(w, &key(&path, "conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(conv(w, &key(&path, "conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
            path,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let t = self
            .time_emb_proj
            .forward(&temb.silu())
            .unsqueeze(-1)
            .unsqueeze(-1);
        let h = self.conv2.forward(&self.norm2.forward(&(h + t)).silu());
        match &self.conv_shortcut {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }

    fn visit(&mut self, f: &mut dyn FnMut(&LayerInfo<'_>, LayerMut<'_>)) {
        // sd-scripts registration order: norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut
        let c = Container::ResnetBlock2D;
        visit_conv(f, &self.path, "conv1", c, &mut self.conv1);
        visit_linear(f, &self.path, "time_emb_proj", c, &mut self.time_emb_proj);
        visit_conv(f, &self.path, "conv2", c, &mut self.conv2);
        if let Some(s) = &mut self.conv_shortcut {
            visit_conv(f, &self.path, "conv_shortcut", c, s);
        }
    }
}

fn visit_linear(
    f: &mut dyn FnMut(&LayerInfo<'_>, LayerMut<'_>),
    prefix: &str,
    name: &str,
    container: Container,
    l: &mut Linear,
) {
    let path = key(prefix, name);
    f(
        &LayerInfo {
            path: &path,
            container,
        },
        LayerMut::Linear(l),
    );
}

fn visit_conv(
    f: &mut dyn FnMut(&LayerInfo<'_>, LayerMut<'_>),
    prefix: &str,
    name: &str,
    container: Container,
    c: &mut Conv2d,
) {
    let path = key(prefix, name);
    f(
        &LayerInfo {
            path: &path,
            container,
        },
        LayerMut::Conv2d(c),
    );
}

/// `CrossAttention` (Diffusers `Attention`): to_q/to_k/to_v without bias, to_out.0 with bias.
#[derive(Debug)]
pub struct CrossAttention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: i64,
    /// sd-scripts `upcast_attention` (SD2.1, never in the mid block).
    pub upcast: bool,
}

impl CrossAttention {
    fn load(
        w: &mut WeightMap,
        prefix: &str,
        dim: i64,
        ctx_dim: i64,
        heads: i64,
        upcast: bool,
    ) -> Result<Self> {
        Ok(CrossAttention {
            to_q: linear(w, &key(prefix, "to_q"), dim, dim, false)?,
            to_k: linear(w, &key(prefix, "to_k"), ctx_dim, dim, false)?,
            to_v: linear(w, &key(prefix, "to_v"), ctx_dim, dim, false)?,
            to_out: linear(w, &key(prefix, "to_out.0"), dim, dim, true)?,
            heads,
            upcast,
        })
    }

    /// `x` (B, N, C); `context` (B, M, ctx) or `None` for self-attention.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        backend: AttentionBackend,
    ) -> Tensor {
        let (b, n, c) = x.size3().unwrap();
        let d = c / self.heads;
        // sd-scripts' sdpa/xformers/mem_eff paths cast the context to x's dtype; the default
        // path does not, but there a mismatch could only fail, so casting everywhere is harmless.
        let ctx = context.map(|t| t.to_kind(x.kind()));
        let ctx = ctx.as_ref().unwrap_or(x);
        let m = ctx.size()[1];
        let split = |t: Tensor, len: i64| t.reshape([b, len, self.heads, d]).permute([0, 2, 1, 3]);
        let q = split(self.to_q.forward(x), n);
        let k = split(self.to_k.forward(ctx), m);
        let v = split(self.to_v.forward(ctx), m);
        let opts = AttentionOptions {
            // sd-scripts applies upcast_attention only in its default `_attention` path.
            upcast_qk: self.upcast && backend == AttentionBackend::Math,
            ..Default::default()
        };
        let o = attention(&q, &k, &v, backend, opts);
        let o = o.permute([0, 2, 1, 3]).reshape([b, n, c]);
        self.to_out.forward(&o)
    }

    fn visit(&mut self, f: &mut dyn FnMut(&LayerInfo<'_>, LayerMut<'_>), prefix: &str) {
        let c = Container::Transformer2D;
        visit_linear(f, prefix, "to_q", c, &mut self.to_q);
        visit_linear(f, prefix, "to_k", c, &mut self.to_k);
        visit_linear(f, prefix, "to_v", c, &mut self.to_v);
        visit_linear(f, prefix, "to_out.0", c, &mut self.to_out);
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, pre-LayerNorm.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    pub attn1: CrossAttention,
    /// `ff.net.0.proj` (GEGLU projection to 2 × 4C)
    pub ff_proj: Linear,
    /// `ff.net.2`
    pub ff_out: Linear,
    pub attn2: CrossAttention,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub norm3: LayerNorm,
}

impl BasicTransformerBlock {
    fn load(
        w: &mut WeightMap,
        cfg: &UNetConfig,
        prefix: &str,
        dim: i64,
        heads: i64,
        upcast: bool,
    ) -> Result<Self> {
        let inner = dim * FF_MULT;
        let eps = cfg.layer_norm_eps;
        Ok(BasicTransformerBlock {
            attn1: CrossAttention::load(w, &key(prefix, "attn1"), dim, dim, heads, upcast)?,
            ff_proj: linear(w, &key(prefix, "ff.net.0.proj"), dim, inner * 2, true)?,
            ff_out: linear(w, &key(prefix, "ff.net.2"), inner, dim, true)?,
            attn2: CrossAttention::load(
                w,
                &key(prefix, "attn2"),
                dim,
                cfg.cross_attention_dim,
                heads,
                upcast,
            )?,
            norm1: layer_norm(w, &key(prefix, "norm1"), dim, eps)?,
            norm2: layer_norm(w, &key(prefix, "norm2"), dim, eps)?,
            norm3: layer_norm(w, &key(prefix, "norm3"), dim, eps)?,
        })
    }

    pub fn forward(&self, h: &Tensor, context: &Tensor, backend: AttentionBackend) -> Tensor {
        let h = self.attn1.forward(&self.norm1.forward(h), None, backend) + h;
        let h = self
            .attn2
            .forward(&self.norm2.forward(&h), Some(context), backend)
            + &h;
        // GEGLU: first half is the value, second half the gate, exact (erf) GELU.
        let p = self.ff_proj.forward(&self.norm3.forward(&h));
        let parts = p.chunk(2, -1);
        let ff = &parts[0] * parts[1].gelu("none");
        self.ff_out.forward(&ff) + h
    }

    fn visit(&mut self, f: &mut dyn FnMut(&LayerInfo<'_>, LayerMut<'_>), prefix: &str) {
        // sd-scripts registers attn1, ff, attn2 (then the norms).
        self.attn1.visit(f, &key(prefix, "attn1"));
        visit_linear(
            f,
            prefix,
            "ff.net.0.proj",
            Container::Transformer2D,
            &mut self.ff_proj,
        );
        visit_linear(
            f,
            prefix,
            "ff.net.2",
            Container::Transformer2D,
            &mut self.ff_out,
        );
        self.attn2.visit(f, &key(prefix, "attn2"));
    }
}

/// `proj_in` / `proj_out`: Linear (SD2 Diffusers layout) or 1×1 conv (SD1, and SD2 through
/// sd-scripts' single-file loader).
#[derive(Debug)]
pub enum Proj {
    Linear(Linear),
    Conv(Conv2d),
}

impl Proj {
    fn load(w: &mut WeightMap, prefix: &str, cin: i64, cout: i64, as_linear: bool) -> Result<Self> {
        let wk = key(prefix, "weight");
        // Accept either weight layout and convert to the module kind the config asks for, as
        // sd-scripts' `linear_transformer_to_conv` does for single-file SD2 checkpoints.
        let rank = w
            .get(&wk)
            .map(|t| t.dim())
            .with_context(|| format!("{}: missing key `{wk}`", w.source))?;
        let weight = match (as_linear, rank) {
            (true, 2) | (false, 4) => w.take(&wk)?,
            (true, 4) => w.take(&wk)?.flatten(1, 3),
            (false, 2) => w.take(&wk)?.unsqueeze(-1).unsqueeze(-1),
            _ => bail!(
                "{}: key `{wk}` has {rank} dimensions, expected 2 or 4",
                w.source
            ),
        };
        let expected: Vec<i64> = if as_linear {
            vec![cout, cin]
        } else {
            vec![cout, cin, 1, 1]
        };
        if weight.size() != expected {
            bail!(
                "{}: key `{wk}` has shape {:?}, expected {expected:?}",
                w.source,
                weight.size()
            );
        }
        let bias = w.take_shaped(&key(prefix, "bias"), &[cout])?;
        Ok(if as_linear {
            Proj::Linear(Linear::new(weight, Some(bias)))
        } else {
            Proj::Conv(Conv2d::new(weight, Some(bias), 1, 0))
        })
    }

    fn visit(&mut self, f: &mut dyn FnMut(&LayerInfo<'_>, LayerMut<'_>), prefix: &str, name: &str) {
        match self {
            Proj::Linear(l) => visit_linear(f, prefix, name, Container::Transformer2D, l),
            Proj::Conv(c) => visit_conv(f, prefix, name, Container::Transformer2D, c),
        }
    }
}

/// `Transformer2DModel`: GroupNorm, proj_in, transformer blocks over H·W tokens, proj_out,
/// residual.
#[derive(Debug)]
pub struct Transformer2DModel {
    pub path: String,
    pub norm: GroupNorm,
    pub proj_in: Proj,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Proj,
}

impl Transformer2DModel {
    fn load(
        w: &mut WeightMap,
        cfg: &UNetConfig,
        path: String,
        c: i64,
        heads: i64,
        upcast: bool,
    ) -> Result<Self> {
        if c % heads != 0 {
            bail!("UNet config: {c} channels not divisible by {heads} attention heads ({path})");
        }
        let lin = cfg.use_linear_projection;
        Ok(Transformer2DModel {
            norm: group_norm(
                w,
                &key(&path, "norm"),
                c,
                cfg.norm_num_groups,
                cfg.transformer_norm_eps,
            )?,
            proj_in: Proj::load(w, &key(&path, "proj_in"), c, c, lin)?,
            transformer_blocks: vec![BasicTransformerBlock::load(
                w,
                cfg,
                &key(&path, "transformer_blocks.0"),
                c,
                heads,
                upcast,
            )?],
            proj_out: Proj::load(w, &key(&path, "proj_out"), c, c, lin)?,
            path,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor, backend: AttentionBackend) -> Tensor {
        let (b, _, hh, ww) = x.size4().unwrap();
        let h = self.norm.forward(x);
        let to_tokens = |t: &Tensor| {
            let c = t.size()[1];
            t.permute([0, 2, 3, 1]).reshape([b, hh * ww, c])
        };
        let mut h = match &self.proj_in {
            Proj::Conv(p) => to_tokens(&p.forward(&h)),
            Proj::Linear(p) => p.forward(&to_tokens(&h)),
        };
        for block in &self.transformer_blocks {
            h = block.forward(&h, context, backend);
        }
        let c = h.size()[2];
        let from_tokens = |t: &Tensor| t.reshape([b, hh, ww, c]).permute([0, 3, 1, 2]).contiguous();
        let h = match &self.proj_out {
            Proj::Conv(p) => p.forward(&from_tokens(&h)),
            Proj::Linear(p) => from_tokens(&p.forward(&h)),
        };
        h + x
    }

    fn visit(&mut self, f: &mut dyn FnMut(&LayerInfo<'_>, LayerMut<'_>)) {
        self.proj_in.visit(f, &self.path, "proj_in");
        for (i, b) in self.transformer_blocks.iter_mut().enumerate() {
            b.visit(f, &key(&self.path, &format!("transformer_blocks.{i}")));
        }
        self.proj_out.visit(f, &self.path, "proj_out");
    }
}

/// `Downsample2D`: 3×3 conv, stride 2, symmetric padding 1.
#[derive(Debug)]
pub struct Downsample2D {
    pub path: String,
    pub conv: Conv2d,
}

/// `Upsample2D`: nearest ×2 (or to the next skip's size), then 3×3 conv.
#[derive(Debug)]
pub struct Upsample2D {
    pub path: String,
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn forward(&self, x: &Tensor, size: Option<(i64, i64)>) -> Tensor {
        // upsample_nearest2d has no bf16 kernel in the PyTorch sd-scripts targets; it upcasts.
        let kind = x.kind();
        let xf = if kind == Kind::BFloat16 {
            x.to_kind(Kind::Float)
        } else {
            x.shallow_clone()
        };
        let (_, _, h, w) = xf.size4().unwrap();
        let up = match size {
            Some((sh, sw)) => xf.upsample_nearest2d([sh, sw], None, None),
            None => {
                let f = RESAMPLE_FACTOR as f64;
                xf.upsample_nearest2d([h * RESAMPLE_FACTOR, w * RESAMPLE_FACTOR], f, f)
            }
        };
        let up = if kind == Kind::BFloat16 {
            up.to_kind(kind)
        } else {
            up
        };
        self.conv.forward(&up)
    }
}

/// A down block: `CrossAttnDownBlock2D` (attentions non-empty) or `DownBlock2D`.
#[derive(Debug)]
pub struct DownBlock {
    pub attentions: Vec<Transformer2DModel>,
    pub resnets: Vec<ResnetBlock2D>,
    pub downsampler: Option<Downsample2D>,
}

/// An up block: `CrossAttnUpBlock2D` (attentions non-empty) or `UpBlock2D`.
#[derive(Debug)]
pub struct UpBlock {
    pub attentions: Vec<Transformer2DModel>,
    pub resnets: Vec<ResnetBlock2D>,
    pub upsampler: Option<Upsample2D>,
}

/// `UNetMidBlock2DCrossAttn`: resnet → attention → resnet.
#[derive(Debug)]
pub struct MidBlock {
    pub attentions: Vec<Transformer2DModel>,
    pub resnets: Vec<ResnetBlock2D>,
}

fn visit_blocks(
    f: &mut dyn FnMut(&LayerInfo<'_>, LayerMut<'_>),
    attentions: &mut [Transformer2DModel],
    resnets: &mut [ResnetBlock2D],
) {
    // sd-scripts' blocks register `attentions` before `resnets`.
    for a in attentions {
        a.visit(f);
    }
    for r in resnets {
        r.visit(f);
    }
}

#[derive(Debug)]
pub struct UNet2DConditionModel {
    pub cfg: UNetConfig,
    pub conv_in: Conv2d,
    pub time_linear_1: Linear,
    pub time_linear_2: Linear,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    backend: AttentionBackend,
}

impl UNet2DConditionModel {
    /// Builds the UNet from `cfg`, taking every tensor from `w` (Diffusers names); the caller
    /// calls `w.finish()` afterwards to reject unexpected keys.
    pub fn load(cfg: &UNetConfig, w: &mut WeightMap) -> Result<Self> {
        let n = cfg.block_out_channels.len();
        if cfg.down_block_types.len() != n
            || cfg.up_block_types.len() != n
            || cfg.num_heads.len() != n
        {
            bail!("UNet config: block_out_channels, down/up block types and head counts must have the same length");
        }
        let boc = &cfg.block_out_channels;
        let lpb = cfg.layers_per_block;
        let c0 = boc[0];
        let conv_in = conv(w, "conv_in", cfg.in_channels, c0, 3, 1, 1)?;
        let ted = cfg.time_embed_dim();
        let time_linear_1 = linear(w, "time_embedding.linear_1", c0, ted, true)?;
        let time_linear_2 = linear(w, "time_embedding.linear_2", ted, ted, true)?;

        let mut down_blocks = Vec::new();
        let mut out_c = c0;
        for (i, &c) in boc.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let p = format!("down_blocks.{i}");
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..lpb {
                let cin = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock2D::load(
                    w,
                    cfg,
                    format!("{p}.resnets.{j}"),
                    cin,
                    out_c,
                )?);
                if cfg.down_block_types[i] == BlockKind::CrossAttn {
                    let path = format!("{p}.attentions.{j}");
                    attentions.push(Transformer2DModel::load(
                        w,
                        cfg,
                        path,
                        out_c,
                        cfg.num_heads[i],
                        cfg.upcast_attention,
                    )?);
                }
            }
            let downsampler = if i + 1 < n {
                let path = format!("{p}.downsamplers.0");
                let c = conv(w, &key(&path, "conv"), out_c, out_c, 3, RESAMPLE_FACTOR, 1)?;
                Some(Downsample2D { path, conv: c })
            } else {
                None
            };
            down_blocks.push(DownBlock {
                attentions,
                resnets,
                downsampler,
            });
        }

        let cm = boc[n - 1];
        let mid_block = MidBlock {
            resnets: vec![
                ResnetBlock2D::load(w, cfg, "mid_block.resnets.0".into(), cm, cm)?,
                ResnetBlock2D::load(w, cfg, "mid_block.resnets.1".into(), cm, cm)?,
            ],
            // sd-scripts never passes upcast_attention to the mid block (spec §1.4).
            attentions: vec![Transformer2DModel::load(
                w,
                cfg,
                "mid_block.attentions.0".into(),
                cm,
                cfg.num_heads[n - 1],
                false,
            )?],
        };

        let rev: Vec<i64> = boc.iter().rev().copied().collect();
        let rev_heads: Vec<i64> = cfg.num_heads.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut out_c = rev[0];
        for i in 0..n {
            let prev_out = out_c;
            out_c = rev[i];
            let in_c = rev[(i + 1).min(n - 1)];
            let p = format!("up_blocks.{i}");
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..lpb + 1 {
                let skip_c = if j == lpb { in_c } else { out_c };
                let res_in = if j == 0 { prev_out } else { out_c };
                resnets.push(ResnetBlock2D::load(
                    w,
                    cfg,
                    format!("{p}.resnets.{j}"),
                    res_in + skip_c,
                    out_c,
                )?);
                if cfg.up_block_types[i] == BlockKind::CrossAttn {
                    let path = format!("{p}.attentions.{j}");
                    attentions.push(Transformer2DModel::load(
                        w,
                        cfg,
                        path,
                        out_c,
                        rev_heads[i],
                        cfg.upcast_attention,
                    )?);
                }
            }
            let upsampler = if i + 1 < n {
                let path = format!("{p}.upsamplers.0");
                let c = conv(w, &key(&path, "conv"), out_c, out_c, 3, 1, 1)?;
                Some(Upsample2D { path, conv: c })
            } else {
                None
            };
            up_blocks.push(UpBlock {
                attentions,
                resnets,
                upsampler,
            });
        }

        Ok(UNet2DConditionModel {
            cfg: cfg.clone(),
            conv_in,
            time_linear_1,
            time_linear_2,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(w, "conv_norm_out", c0, cfg.norm_num_groups, cfg.norm_eps)?,
            conv_out: conv(w, "conv_out", c0, cfg.out_channels, 3, 1, 1)?,
            backend: AttentionBackend::Math,
        })
    }

    pub fn set_attention_backend(&mut self, backend: AttentionBackend) {
        self.backend = backend;
    }

    pub fn attention_backend(&self) -> AttentionBackend {
        self.backend
    }

    /// dtype of the weights (sd-scripts `self.dtype`: the first parameter's dtype).
    pub fn kind(&self) -> Kind {
        self.conv_in.weight.kind()
    }

    /// Sinusoidal timestep embedding, always fp32: [cos(t·f), sin(t·f)] with flip_sin_to_cos.
    pub fn timestep_embedding(&self, timesteps: &Tensor) -> Tensor {
        let dim = self.cfg.block_out_channels[0];
        let half = dim / 2;
        let dev = timesteps.device();
        let exponent = Tensor::arange(half, (Kind::Float, dev)) * (-TIMESTEP_MAX_PERIOD.ln())
            / (half as f64 - self.cfg.freq_shift);
        let freqs = exponent.exp();
        let e = timesteps.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
        let emb = if self.cfg.flip_sin_to_cos {
            Tensor::cat(&[e.cos(), e.sin()], -1)
        } else {
            Tensor::cat(&[e.sin(), e.cos()], -1)
        };
        if dim % 2 == 1 {
            emb.constant_pad_nd([0, 1, 0, 0])
        } else {
            emb
        }
    }

    /// Noise (or v) prediction for `sample` (B, 4, h, w), `timesteps` (B) or scalar, and
    /// `encoder_hidden_states` (B, L, cross_attention_dim).
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Tensor {
        self.forward_with_tape(sample, timesteps, encoder_hidden_states, None)
    }

    /// [`forward`](Self::forward), checkpointing every ResnetBlock2D and Transformer2DModel on
    /// `tape` when one is given (spec §6; conv_in, time embedding, resamplers and the output head
    /// are not checkpointed, as in sd-scripts).
    pub fn forward_with_tape<'a>(
        &'a self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        tape: Option<&Tape<'a>>,
    ) -> Tensor {
        let backend = self.backend;
        let (b, _, h, w) = sample.size4().unwrap();
        let n_up = self
            .up_blocks
            .iter()
            .filter(|u| u.upsampler.is_some())
            .count() as u32;
        let factor = RESAMPLE_FACTOR.pow(n_up);
        let forward_upsample_size = h % factor != 0 || w % factor != 0;

        let t = if timesteps.dim() == 0 {
            timesteps.unsqueeze(0)
        } else {
            timesteps.shallow_clone()
        };
        let t = t.to_device(sample.device()).expand([b], false);
        let t_emb = self.timestep_embedding(&t).to_kind(self.kind());
        let temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t_emb).silu());
        let temb = alias(tape, &temb);
        let ctx = alias(tape, encoder_hidden_states);

        let resnet = |r: &'a ResnetBlock2D, x: &Tensor| {
            checkpoint(tape, &[x, &temb], move |xs: &[Tensor]| {
                r.forward(&xs[0], &xs[1])
            })
        };
        let transformer = |a: &'a Transformer2DModel, x: &Tensor| {
            checkpoint(tape, &[x, &ctx], move |xs: &[Tensor]| {
                a.forward(&xs[0], &xs[1], backend)
            })
        };

        let mut x = self.conv_in.forward(sample);
        let mut skips = vec![x.shallow_clone()];
        for blk in &self.down_blocks {
            for (j, r) in blk.resnets.iter().enumerate() {
                x = resnet(r, &x);
                if let Some(a) = blk.attentions.get(j) {
                    x = transformer(a, &x);
                }
                skips.push(x.shallow_clone());
            }
            if let Some(d) = &blk.downsampler {
                x = d.conv.forward(&x);
                skips.push(x.shallow_clone());
            }
        }

        let mid = &self.mid_block;
        x = resnet(&mid.resnets[0], &x);
        for (a, r) in mid.attentions.iter().zip(&mid.resnets[1..]) {
            x = transformer(a, &x);
            x = resnet(r, &x);
        }

        for blk in &self.up_blocks {
            for (j, r) in blk.resnets.iter().enumerate() {
                let skip = skips.pop().expect("UNet: skip connections exhausted");
                x = resnet(r, &Tensor::cat(&[&x, &skip], 1));
                if let Some(a) = blk.attentions.get(j) {
                    x = transformer(a, &x);
                }
            }
            if let Some(u) = &blk.upsampler {
                let size = if forward_upsample_size {
                    skips.last().map(|s| {
                        let sz = s.size();
                        (sz[2], sz[3])
                    })
                } else {
                    None
                };
                x = u.forward(&x, size);
            }
        }

        self.conv_out
            .forward(&self.conv_norm_out.forward(&x).silu())
    }
}

impl VisitLayers for UNet2DConditionModel {
    /// sd-scripts' `named_modules()` order: down_blocks, then up_blocks, then mid_block
    /// (spec §2.1 quirk); attentions before resnets before resamplers inside a block.
    fn visit_layers(&mut self, f: &mut dyn FnMut(&LayerInfo<'_>, LayerMut<'_>)) {
        for blk in &mut self.down_blocks {
            visit_blocks(f, &mut blk.attentions, &mut blk.resnets);
            if let Some(d) = &mut blk.downsampler {
                visit_conv(f, &d.path, "conv", Container::Downsample2D, &mut d.conv);
            }
        }
        for blk in &mut self.up_blocks {
            visit_blocks(f, &mut blk.attentions, &mut blk.resnets);
            if let Some(u) = &mut blk.upsampler {
                visit_conv(f, &u.path, "conv", Container::Upsample2D, &mut u.conv);
            }
        }
        visit_blocks(
            f,
            &mut self.mid_block.attentions,
            &mut self.mid_block.resnets,
        );
    }
}

fn block_kind(name: &str, down: bool) -> Result<BlockKind> {
    match (name, down) {
        ("CrossAttnDownBlock2D", true) | ("CrossAttnUpBlock2D", false) => Ok(BlockKind::CrossAttn),
        ("DownBlock2D", true) | ("UpBlock2D", false) => Ok(BlockKind::Plain),
        _ => bail!("unsupported UNet block type `{name}` (SD 1.x/2.x UNets only)"),
    }
}

impl UNetConfig {
    /// Reads a Diffusers `unet/config.json`. Fields that would change the architecture beyond
    /// what SD 1.x/2.x use are rejected with the field's name.
    pub fn from_diffusers_json(v: &serde_json::Value) -> Result<Self> {
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        let int = |k: &str, d: i64| -> Result<i64> {
            match get(k) {
                None => Ok(d),
                Some(x) => x
                    .as_i64()
                    .with_context(|| format!("unet config: `{k}` must be an integer")),
            }
        };
        let float = |k: &str, d: f64| -> Result<f64> {
            match get(k) {
                None => Ok(d),
                Some(x) => x
                    .as_f64()
                    .with_context(|| format!("unet config: `{k}` must be a number")),
            }
        };
        let boolean = |k: &str, d: bool| -> Result<bool> {
            match get(k) {
                None => Ok(d),
                Some(x) => x
                    .as_bool()
                    .with_context(|| format!("unet config: `{k}` must be true/false")),
            }
        };
        let strings = |k: &str| -> Result<Vec<String>> {
            let a = get(k)
                .and_then(|x| x.as_array())
                .with_context(|| format!("unet config: `{k}` must be a list"))?;
            a.iter()
                .map(|s| {
                    s.as_str()
                        .map(String::from)
                        .with_context(|| format!("unet config: `{k}` must hold strings"))
                })
                .collect()
        };
        let ints = |k: &str| -> Result<Vec<i64>> {
            let a = get(k)
                .and_then(|x| x.as_array())
                .with_context(|| format!("unet config: `{k}` must be a list"))?;
            a.iter()
                .map(|s| {
                    s.as_i64()
                        .with_context(|| format!("unet config: `{k}` must hold integers"))
                })
                .collect()
        };

        let block_out_channels = ints("block_out_channels")?;
        let n = block_out_channels.len();
        let down_block_types = strings("down_block_types")?
            .iter()
            .map(|s| block_kind(s, true))
            .collect::<Result<Vec<_>>>()?;
        let up_block_types = strings("up_block_types")?
            .iter()
            .map(|s| block_kind(s, false))
            .collect::<Result<Vec<_>>>()?;
        // Diffusers quirk: `attention_head_dim` holds the number of heads when
        // `num_attention_heads` is absent (spec §1.1).
        let heads_key = if get("num_attention_heads").is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        let num_heads = match get(heads_key) {
            Some(x) if x.is_array() => ints(heads_key)?,
            Some(x) => vec![
                x.as_i64().with_context(|| format!(
                    "unet config: `{heads_key}` must be an integer"
                ))?;
                n
            ],
            None => vec![8; n],
        };
        let cross_attention_dim = match get("cross_attention_dim") {
            Some(x) => x
                .as_i64()
                .context("unet config: `cross_attention_dim` must be an integer")?,
            None => 1280,
        };
        for (k, ok) in [
            ("act_fn", get("act_fn").is_none_or(|x| x == "silu")),
            (
                "mid_block_type",
                get("mid_block_type").is_none_or(|x| x == "UNetMidBlock2DCrossAttn"),
            ),
            (
                "transformer_layers_per_block",
                get("transformer_layers_per_block").is_none_or(|x| x == 1),
            ),
            ("class_embed_type", get("class_embed_type").is_none()),
            ("addition_embed_type", get("addition_embed_type").is_none()),
            ("encoder_hid_dim", get("encoder_hid_dim").is_none()),
            (
                "only_cross_attention",
                get("only_cross_attention").is_none_or(|x| x == false),
            ),
            (
                "dual_cross_attention",
                get("dual_cross_attention").is_none_or(|x| x == false),
            ),
            (
                "time_embedding_type",
                get("time_embedding_type").is_none_or(|x| x == "positional"),
            ),
            (
                "resnet_time_scale_shift",
                get("resnet_time_scale_shift").is_none_or(|x| x == "default"),
            ),
            (
                "conv_in_kernel",
                get("conv_in_kernel").is_none_or(|x| x == 3),
            ),
            (
                "conv_out_kernel",
                get("conv_out_kernel").is_none_or(|x| x == 3),
            ),
            (
                "center_input_sample",
                get("center_input_sample").is_none_or(|x| x == false),
            ),
        ] {
            if !ok {
                bail!(
                    "unet config: unsupported `{k}` = {} (SD 1.x/2.x UNets only)",
                    v[k]
                );
            }
        }
        let sd = UNetConfig::sd1();
        let cfg = UNetConfig {
            in_channels: int("in_channels", sd.in_channels)?,
            out_channels: int("out_channels", sd.out_channels)?,
            block_out_channels,
            layers_per_block: int("layers_per_block", sd.layers_per_block)?,
            down_block_types,
            up_block_types,
            num_heads,
            cross_attention_dim,
            use_linear_projection: boolean("use_linear_projection", false)?,
            upcast_attention: boolean("upcast_attention", false)?,
            norm_num_groups: int("norm_num_groups", sd.norm_num_groups)?,
            norm_eps: float("norm_eps", sd.norm_eps)?,
            transformer_norm_eps: sd.transformer_norm_eps,
            layer_norm_eps: sd.layer_norm_eps,
            flip_sin_to_cos: boolean("flip_sin_to_cos", true)?,
            freq_shift: float("freq_shift", 0.0)?,
        };
        if cfg.down_block_types.len() != n
            || cfg.up_block_types.len() != n
            || cfg.num_heads.len() != n
        {
            bail!("unet config: block_out_channels, down/up_block_types and attention heads differ in length");
        }
        Ok(cfg)
    }
}
