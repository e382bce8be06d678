//! Replays how sd-scripts' base-model construction consumes the global torch CPU generator.
//!
//! `train_network.py` seeds torch (`accelerate.utils.set_seed`) and only then builds the U-Net,
//! VAE and text encoder with PyTorch's default random init, before loading the checkpoint into
//! them. The LoRA init, the timesteps (and on CPU runs the noise and the VAE posterior samples)
//! come from whatever generator state that leaves (spec: sdscripts_cli_data.md §6.3.1,
//! sdscripts_model_math.md §4 last paragraph). sdlora does not build those throw-away models: it
//! issues the same sequence of random fills (same op, numel, dtype, order) on a scratch buffer.
//!
//! The sequence is derived from the detected configs and the load path:
//! * LDM single file (`model_util.load_models_from_stable_diffusion_checkpoint`): sd-scripts' own
//!   U-Net (`original_unet.UNet2DConditionModel`; 1×1-conv projections, because `train_network`
//!   passes `unet_use_linear_projection_in_v2=False`), then diffusers `AutoencoderKL(**cfg)`, then
//!   transformers `CLIPTextModel._from_config` (module constructors, then `post_init` re-draws
//!   embeddings and projection weights with `_init_weights`).
//! * Diffusers folder (`train_util._load_target_model`): `StableDiffusionPipeline.from_pretrained`
//!   builds on the meta device (`low_cpu_mem_usage`), which draws nothing; then the U-Net is
//!   rebuilt as sd-scripts' U-Net from the folder's config (its `use_linear_projection`).
//! * `--vae` given as a file (`model_util.load_vae`): one more `AutoencoderKL(**cfg)` after the
//!   base models; as a Diffusers folder it goes through `from_pretrained` and draws nothing.
//!
//! `scripts/make_rng_replay_fixture.py` traces the real sd-scripts calls;
//! `tests/rng_replay.rs` checks the plan against that trace op by op and the generator state
//! after [`replay`] bit for bit.
use crate::models::config::{BlockKind, ClipTextConfig, UNetConfig, VaeConfig};
use crate::models::loading::{CheckpointFormat, LoadedCheckpoint};
use tch::{Device, Kind, Tensor};

/// One random fill of a float32 tensor on the CPU generator.
#[derive(Debug, Clone, PartialEq)]
pub enum FillOp {
    /// `tensor.uniform_(low, high)`: one 32-bit draw per element.
    Uniform { low: f64, high: f64 },
    /// `tensor.normal_(mean, std)`: for ≥ 16 contiguous elements, one draw per element plus 16
    /// more when the count is not a multiple of 16 (ATen `normal_fill` redoes the last 16).
    Normal { mean: f64, std: f64 },
}

/// A fill as a module constructor issues it: which parameter, its shape, the op.
#[derive(Debug, Clone, PartialEq)]
pub struct Fill {
    /// Parameter name, prefixed by the model (`unet.`, `vae.`, `text_encoder.`), for diagnostics.
    pub name: String,
    pub shape: Vec<i64>,
    pub op: FillOp,
}

impl Fill {
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

/// Where the base models come from, as far as the random init is concerned.
#[derive(Debug, Clone)]
pub struct BaseModels {
    pub format: CheckpointFormat,
    pub unet: UNetConfig,
    pub text_encoder: ClipTextConfig,
    pub vae: VaeConfig,
    /// `--vae`, if given: what it points to.
    pub extra_vae: Option<CheckpointFormat>,
}

impl BaseModels {
    /// From a loaded checkpoint and the format of the path it came from
    /// (`crate::models::loading::checkpoint_format`). `extra_vae` is the format of `--vae`.
    pub fn from_checkpoint(
        ck: &LoadedCheckpoint,
        format: CheckpointFormat,
        extra_vae: Option<CheckpointFormat>,
    ) -> Self {
        BaseModels {
            format,
            unet: ck.unet_config.clone(),
            text_encoder: ck.clip_config.clone(),
            vae: ck.vae_config.clone(),
            extra_vae,
        }
    }
}

/// The ordered fills sd-scripts' model loading issues on the global CPU generator.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InitPlan {
    pub fills: Vec<Fill>,
}

impl InitPlan {
    /// The plan for `train_network.py`'s `load_target_model` on these models.
    pub fn for_sd_scripts(m: &BaseModels) -> Self {
        let mut p = InitPlan::default();
        match m.format {
            CheckpointFormat::SingleFile => {
                // create_unet_diffusers_config(v2, unet_use_linear_projection_in_v2=False):
                // conv projections whatever the version.
                sdscripts_unet(&mut p.fills, &m.unet, false);
                diffusers_autoencoder_kl(&mut p.fills, &m.vae, "vae");
                transformers_clip_text(&mut p.fills, &m.text_encoder);
            }
            CheckpointFormat::Diffusers => {
                sdscripts_unet(&mut p.fills, &m.unet, m.unet.use_linear_projection);
            }
        }
        if m.extra_vae == Some(CheckpointFormat::SingleFile) {
            diffusers_autoencoder_kl(&mut p.fills, &m.vae, "vae(--vae)");
        }
        p
    }

    /// Total number of elements filled.
    pub fn numel(&self) -> i64 {
        self.fills.iter().map(Fill::numel).sum()
    }
}

/// Largest scratch chunk, in elements. Small enough to stay in cache, large enough that the
/// per-call overhead does not matter.
const CHUNK: i64 = 1 << 18;

/// Consumes the global libtorch CPU generator exactly as the plan's fills would, on a scratch
/// buffer (the values are thrown away).
///
/// Fills are split into chunks where that draws identically: `uniform_` takes one draw per
/// element whatever the split; `normal_` takes one per element in blocks of 16 plus a 16-draw
/// redo of a ragged tail, so every chunk but the last is a multiple of 16 and the last keeps the
/// tail with at least 16 elements. Tensors under 16 elements go through ATen's serial normal
/// path and are filled whole.
pub fn replay(plan: &InitPlan) {
    let _guard = tch::no_grad_guard();
    let buf = Tensor::empty([CHUNK], (Kind::Float, Device::Cpu));
    for f in &plan.fills {
        for len in chunk_lengths(f.numel(), &f.op) {
            let mut view = buf.narrow(0, 0, len);
            match f.op {
                FillOp::Uniform { low, high } => {
                    let _ = view.uniform_(low, high);
                }
                FillOp::Normal { mean, std } => {
                    let _ = view.normal_(mean, std);
                }
            }
        }
    }
}

/// The plan's fills issued one whole tensor at a time (the reference for [`replay`]'s chunking).
pub fn replay_unchunked(plan: &InitPlan) {
    let _guard = tch::no_grad_guard();
    for f in &plan.fills {
        let mut t = Tensor::empty(f.shape.as_slice(), (Kind::Float, Device::Cpu));
        match f.op {
            FillOp::Uniform { low, high } => {
                let _ = t.uniform_(low, high);
            }
            FillOp::Normal { mean, std } => {
                let _ = t.normal_(mean, std);
            }
        }
    }
}

/// Chunk sizes for one fill (see [`replay`] for why they consume identically).
pub fn chunk_lengths(numel: i64, op: &FillOp) -> Vec<i64> {
    let mut out = Vec::new();
    if numel <= CHUNK {
        out.push(numel);
        return out;
    }
    match op {
        FillOp::Uniform { .. } => {
            let mut left = numel;
            while left > 0 {
                let n = left.min(CHUNK);
                out.push(n);
                left -= n;
            }
        }
        FillOp::Normal { .. } => {
            // CHUNK is a multiple of 16; stop early enough that the last piece is > CHUNK/2 ≥ 16.
            let mut left = numel;
            while left > CHUNK + CHUNK / 2 {
                out.push(CHUNK);
                left -= CHUNK;
            }
            if left > CHUNK {
                let first = (left / 2) / 16 * 16;
                out.push(first);
                left -= first;
            }
            out.push(left);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// PyTorch default inits (torch.nn.Linear / Conv2d `reset_parameters`, nn.Embedding).

/// `kaiming_uniform_(w, a=√5)`: bound = √3 · gain / √fan_in, gain = √(2 / (1 + a²)), computed in
/// the same f64 steps as `torch.nn.init`.
fn kaiming_uniform_a_sqrt5(fan_in: i64) -> FillOp {
    let a = 5f64.sqrt();
    let gain = (2.0 / (1.0 + a * a)).sqrt();
    let std = gain / (fan_in as f64).sqrt();
    let bound = 3f64.sqrt() * std;
    FillOp::Uniform {
        low: -bound,
        high: bound,
    }
}

fn bias_uniform(fan_in: i64) -> FillOp {
    let bound = 1.0 / (fan_in as f64).sqrt();
    FillOp::Uniform {
        low: -bound,
        high: bound,
    }
}

/// `nn.Linear(in, out, bias)` constructor draws.
fn linear(fills: &mut Vec<Fill>, name: &str, in_f: i64, out_f: i64, bias: bool) {
    fills.push(Fill {
        name: format!("{name}.weight"),
        shape: vec![out_f, in_f],
        op: kaiming_uniform_a_sqrt5(in_f),
    });
    if bias {
        fills.push(Fill {
            name: format!("{name}.bias"),
            shape: vec![out_f],
            op: bias_uniform(in_f),
        });
    }
}

/// `nn.Conv2d(in, out, k)` (bias on) constructor draws.
fn conv2d(fills: &mut Vec<Fill>, name: &str, in_c: i64, out_c: i64, k: i64) {
    let fan_in = in_c * k * k;
    fills.push(Fill {
        name: format!("{name}.weight"),
        shape: vec![out_c, in_c, k, k],
        op: kaiming_uniform_a_sqrt5(fan_in),
    });
    fills.push(Fill {
        name: format!("{name}.bias"),
        shape: vec![out_c],
        op: bias_uniform(fan_in),
    });
}

fn normal(fills: &mut Vec<Fill>, name: &str, shape: Vec<i64>, std: f64) {
    fills.push(Fill {
        name: name.to_string(),
        shape,
        op: FillOp::Normal { mean: 0.0, std },
    });
}

// ---------------------------------------------------------------------------------------------
// sd-scripts' U-Net (library/original_unet.py), in constructor order. GroupNorm/LayerNorm draw
// nothing.

fn sdscripts_resnet(fills: &mut Vec<Fill>, name: &str, cfg: &UNetConfig, in_c: i64, out_c: i64) {
    conv2d(fills, &format!("{name}.conv1"), in_c, out_c, 3);
    linear(fills, &format!("{name}.time_emb_proj"), cfg.time_embed_dim(), out_c, true);
    conv2d(fills, &format!("{name}.conv2"), out_c, out_c, 3);
    if in_c != out_c {
        conv2d(fills, &format!("{name}.conv_shortcut"), in_c, out_c, 1);
    }
}

fn sdscripts_cross_attention(fills: &mut Vec<Fill>, name: &str, dim: i64, context_dim: i64) {
    linear(fills, &format!("{name}.to_q"), dim, dim, false);
    linear(fills, &format!("{name}.to_k"), context_dim, dim, false);
    linear(fills, &format!("{name}.to_v"), context_dim, dim, false);
    linear(fills, &format!("{name}.to_out.0"), dim, dim, true);
}

/// `Transformer2DModel(heads, channels // heads, in_channels=channels, ...)`: inner dim =
/// heads · (channels // heads). BasicTransformerBlock builds attn1, then ff, then attn2.
fn sdscripts_transformer(
    fills: &mut Vec<Fill>,
    name: &str,
    cfg: &UNetConfig,
    channels: i64,
    heads: i64,
    linear_proj: bool,
) {
    let inner = heads * (channels / heads);
    if linear_proj {
        linear(fills, &format!("{name}.proj_in"), channels, inner, true);
    } else {
        conv2d(fills, &format!("{name}.proj_in"), channels, inner, 1);
    }
    let blk = format!("{name}.transformer_blocks.0");
    sdscripts_cross_attention(fills, &format!("{blk}.attn1"), inner, inner);
    let ff_inner = inner * 4;
    linear(fills, &format!("{blk}.ff.net.0.proj"), inner, ff_inner * 2, true);
    linear(fills, &format!("{blk}.ff.net.2"), ff_inner, inner, true);
    sdscripts_cross_attention(fills, &format!("{blk}.attn2"), inner, cfg.cross_attention_dim);
    if linear_proj {
        // original_unet builds it as Linear(in_channels, inner_dim).
        linear(fills, &format!("{name}.proj_out"), channels, inner, true);
    } else {
        conv2d(fills, &format!("{name}.proj_out"), inner, channels, 1);
    }
}

fn sdscripts_unet(fills: &mut Vec<Fill>, cfg: &UNetConfig, linear_proj: bool) {
    let boc = &cfg.block_out_channels;
    let n = boc.len();
    let ted = cfg.time_embed_dim();
    conv2d(fills, "unet.conv_in", cfg.in_channels, boc[0], 3);
    linear(fills, "unet.time_embedding.linear_1", boc[0], ted, true);
    linear(fills, "unet.time_embedding.linear_2", ted, ted, true);

    let mut output = boc[0];
    for (i, kind) in cfg.down_block_types.iter().enumerate() {
        let input = output;
        output = boc[i];
        let b = format!("unet.down_blocks.{i}");
        // Resnet and attention of a layer are constructed back to back.
        for l in 0..cfg.layers_per_block {
            let in_c = if l == 0 { input } else { output };
            sdscripts_resnet(fills, &format!("{b}.resnets.{l}"), cfg, in_c, output);
            if *kind == BlockKind::CrossAttn {
                let name = format!("{b}.attentions.{l}");
                sdscripts_transformer(fills, &name, cfg, output, cfg.num_heads[i], linear_proj);
            }
        }
        if i != n - 1 {
            conv2d(fills, &format!("{b}.downsamplers.0.conv"), output, output, 3);
        }
    }

    // The mid block builds both resnets before its attention.
    let c = boc[n - 1];
    sdscripts_resnet(fills, "unet.mid_block.resnets.0", cfg, c, c);
    sdscripts_resnet(fills, "unet.mid_block.resnets.1", cfg, c, c);
    let heads = cfg.num_heads[n - 1];
    sdscripts_transformer(fills, "unet.mid_block.attentions.0", cfg, c, heads, linear_proj);

    let rev: Vec<i64> = boc.iter().rev().copied().collect();
    let rev_heads: Vec<i64> = cfg.num_heads.iter().rev().copied().collect();
    let layers_up = cfg.layers_per_block + 1;
    let mut output = rev[0];
    for (i, kind) in cfg.up_block_types.iter().enumerate() {
        let prev = output;
        output = rev[i];
        let input = rev[(i + 1).min(n - 1)];
        let b = format!("unet.up_blocks.{i}");
        for l in 0..layers_up {
            let skip = if l == layers_up - 1 { input } else { output };
            let res_in = if l == 0 { prev } else { output };
            sdscripts_resnet(fills, &format!("{b}.resnets.{l}"), cfg, res_in + skip, output);
            if *kind == BlockKind::CrossAttn {
                let name = format!("{b}.attentions.{l}");
                sdscripts_transformer(fills, &name, cfg, output, rev_heads[i], linear_proj);
            }
        }
        if i != n - 1 {
            conv2d(fills, &format!("{b}.upsamplers.0.conv"), output, output, 3);
        }
    }
    conv2d(fills, "unet.conv_out", boc[0], cfg.out_channels, 3);
}

// ---------------------------------------------------------------------------------------------
// diffusers 0.32.1 AutoencoderKL, in constructor order: encoder, decoder, quant convs.

fn diffusers_resnet(fills: &mut Vec<Fill>, name: &str, in_c: i64, out_c: i64) {
    conv2d(fills, &format!("{name}.conv1"), in_c, out_c, 3);
    conv2d(fills, &format!("{name}.conv2"), out_c, out_c, 3);
    if in_c != out_c {
        conv2d(fills, &format!("{name}.conv_shortcut"), in_c, out_c, 1);
    }
}

/// UNetMidBlock2D: first resnet, then (attention, resnet) per layer; the attention is one head
/// group with biased q/k/v/out projections.
fn diffusers_vae_mid(fills: &mut Vec<Fill>, name: &str, c: i64) {
    diffusers_resnet(fills, &format!("{name}.resnets.0"), c, c);
    let a = format!("{name}.attentions.0");
    linear(fills, &format!("{a}.to_q"), c, c, true);
    linear(fills, &format!("{a}.to_k"), c, c, true);
    linear(fills, &format!("{a}.to_v"), c, c, true);
    linear(fills, &format!("{a}.to_out.0"), c, c, true);
    diffusers_resnet(fills, &format!("{name}.resnets.1"), c, c);
}

fn diffusers_autoencoder_kl(fills: &mut Vec<Fill>, cfg: &VaeConfig, prefix: &str) {
    let boc = &cfg.block_out_channels;
    let n = boc.len();
    let e = format!("{prefix}.encoder");
    conv2d(fills, &format!("{e}.conv_in"), cfg.in_channels, boc[0], 3);
    let mut output = boc[0];
    for i in 0..n {
        let input = output;
        output = boc[i];
        for l in 0..cfg.layers_per_block {
            let in_c = if l == 0 { input } else { output };
            diffusers_resnet(fills, &format!("{e}.down_blocks.{i}.resnets.{l}"), in_c, output);
        }
        if i != n - 1 {
            let name = format!("{e}.down_blocks.{i}.downsamplers.0.conv");
            conv2d(fills, &name, output, output, 3);
        }
    }
    diffusers_vae_mid(fills, &format!("{e}.mid_block"), boc[n - 1]);
    // double_z: mean and logvar channels.
    conv2d(fills, &format!("{e}.conv_out"), boc[n - 1], 2 * cfg.latent_channels, 3);

    let d = format!("{prefix}.decoder");
    conv2d(fills, &format!("{d}.conv_in"), cfg.latent_channels, boc[n - 1], 3);
    diffusers_vae_mid(fills, &format!("{d}.mid_block"), boc[n - 1]);
    let rev: Vec<i64> = boc.iter().rev().copied().collect();
    let mut output = rev[0];
    for i in 0..n {
        let prev = output;
        output = rev[i];
        for l in 0..cfg.layers_per_block + 1 {
            let in_c = if l == 0 { prev } else { output };
            diffusers_resnet(fills, &format!("{d}.up_blocks.{i}.resnets.{l}"), in_c, output);
        }
        if i != n - 1 {
            let name = format!("{d}.up_blocks.{i}.upsamplers.0.conv");
            conv2d(fills, &name, output, output, 3);
        }
    }
    conv2d(fills, &format!("{d}.conv_out"), boc[0], cfg.out_channels, 3);

    let l = cfg.latent_channels;
    conv2d(fills, &format!("{prefix}.quant_conv"), 2 * l, 2 * l, 1);
    conv2d(fills, &format!("{prefix}.post_quant_conv"), l, l, 1);
}

// ---------------------------------------------------------------------------------------------
// transformers 4.54.1 CLIPTextModel._from_config: module constructors, then post_init.

/// sd-scripts' single-file CLIPTextConfig sets `initializer_factor=1.0`.
const CLIP_INITIALIZER_FACTOR: f64 = 1.0;
/// `CLIPPreTrainedModel._init_weights` embedding std (before the factor).
const CLIP_EMBEDDING_STD: f64 = 0.02;

fn transformers_clip_text(fills: &mut Vec<Fill>, cfg: &ClipTextConfig) {
    let h = cfg.hidden_size;
    let tm = "text_encoder.text_model";
    // Constructors: nn.Embedding draws N(0, 1); each Linear its kaiming/bias pair.
    let tok = format!("{tm}.embeddings.token_embedding.weight");
    let pos = format!("{tm}.embeddings.position_embedding.weight");
    normal(fills, &tok, vec![cfg.vocab_size, h], 1.0);
    normal(fills, &pos, vec![cfg.max_position_embeddings, h], 1.0);
    for i in 0..cfg.num_hidden_layers {
        let l = format!("{tm}.encoder.layers.{i}");
        // CLIPAttention constructs k, v, q, out in that order.
        for p in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            linear(fills, &format!("{l}.self_attn.{p}"), h, h, true);
        }
        linear(fills, &format!("{l}.mlp.fc1"), h, cfg.intermediate_size, true);
        linear(fills, &format!("{l}.mlp.fc2"), cfg.intermediate_size, h, true);
    }

    // post_init -> initialize_weights: smart_apply visits children before parents, so each
    // CLIPTextEmbeddings / CLIPAttention / CLIPMLP is re-drawn after its own children (which draw
    // nothing: Linear biases are zeroed, LayerNorms filled). Stds as in `_init_weights`.
    let f = CLIP_INITIALIZER_FACTOR;
    normal(fills, &tok, vec![cfg.vocab_size, h], f * CLIP_EMBEDDING_STD);
    normal(fills, &pos, vec![cfg.max_position_embeddings, h], f * CLIP_EMBEDDING_STD);
    let layers = cfg.num_hidden_layers as f64;
    let in_proj_std = (h as f64).powf(-0.5) * (2.0 * layers).powf(-0.5) * f;
    let out_proj_std = (h as f64).powf(-0.5) * f;
    let fc_std = (2.0 * h as f64).powf(-0.5) * f;
    for i in 0..cfg.num_hidden_layers {
        let l = format!("{tm}.encoder.layers.{i}");
        for p in ["q_proj", "k_proj", "v_proj"] {
            normal(fills, &format!("{l}.self_attn.{p}.weight"), vec![h, h], in_proj_std);
        }
        normal(fills, &format!("{l}.self_attn.out_proj.weight"), vec![h, h], out_proj_std);
        let inter = cfg.intermediate_size;
        normal(fills, &format!("{l}.mlp.fc1.weight"), vec![inter, h], fc_std);
        normal(fills, &format!("{l}.mlp.fc2.weight"), vec![h, inter], in_proj_std);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_chunks_keep_blocks_of_16_and_a_long_tail() {
        let op = FillOp::Normal {
            mean: 0.0,
            std: 1.0,
        };
        for n in [
            1,
            15,
            16,
            17,
            CHUNK,
            CHUNK + 1,
            CHUNK + 15,
            CHUNK + CHUNK / 2 + 3,
            3 * CHUNK + 7,
            38_000_000,
        ] {
            let c = chunk_lengths(n, &op);
            assert_eq!(c.iter().sum::<i64>(), n, "n={n}");
            let (last, rest) = c.split_last().unwrap();
            assert!(rest.iter().all(|&x| x % 16 == 0 && x > 0), "n={n}: {c:?}");
            assert!(*last >= 16.min(n), "n={n}: {c:?}");
            assert!(c.iter().all(|&x| x <= CHUNK), "n={n}: {c:?}");
        }
    }
}
