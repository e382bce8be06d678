//! Architecture configs for the three networks. Forward code reads every size from these structs;
//! the SD1/SD2 values come from sd-scripts' `model_util.py` constants (spec:
//! sdscripts_model_math.md §1.1–§1.4), the tiny ones exist for fast parity tests.
use serde::{Deserialize, Serialize};

/// Which Stable Diffusion family a checkpoint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SdVersion {
    V1,
    V2,
}

/// Down/up block kinds of the UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockKind {
    /// `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`: resnets each followed by a Transformer2DModel.
    CrossAttn,
    /// `DownBlock2D` / `UpBlock2D`: resnets only.
    Plain,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Channels per resolution level (SD: 320, 640, 1280, 1280).
    pub block_out_channels: Vec<i64>,
    /// Resnets per down block; up blocks have one more.
    pub layers_per_block: i64,
    pub down_block_types: Vec<BlockKind>,
    pub up_block_types: Vec<BlockKind>,
    /// Number of attention heads per level (Diffusers' `attention_head_dim` quirk: SD1 passes 8,
    /// meaning 8 heads). The mid block uses the last level's value.
    pub num_heads: Vec<i64>,
    pub cross_attention_dim: i64,
    /// Linear (true) or 1×1 conv (false) `proj_in` / `proj_out` in Transformer2DModel.
    pub use_linear_projection: bool,
    /// Compute attention scores in fp32 (SD2.1 Diffusers config); never in the mid block.
    pub upcast_attention: bool,
    pub norm_num_groups: i64,
    /// GroupNorm eps in resnets and `conv_norm_out`.
    pub norm_eps: f64,
    /// GroupNorm eps of Transformer2DModel.norm.
    pub transformer_norm_eps: f64,
    /// LayerNorm eps inside BasicTransformerBlock.
    pub layer_norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl UNetConfig {
    pub fn sd1() -> Self {
        UNetConfig {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            down_block_types: vec![
                BlockKind::CrossAttn,
                BlockKind::CrossAttn,
                BlockKind::CrossAttn,
                BlockKind::Plain,
            ],
            up_block_types: vec![
                BlockKind::Plain,
                BlockKind::CrossAttn,
                BlockKind::CrossAttn,
                BlockKind::CrossAttn,
            ],
            num_heads: vec![8, 8, 8, 8],
            cross_attention_dim: 768,
            use_linear_projection: false,
            upcast_attention: false,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            transformer_norm_eps: 1e-6,
            layer_norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
        }
    }

    /// SD2.x: 64-dim heads, 1024-dim context, linear projections (Diffusers layout).
    pub fn sd2() -> Self {
        UNetConfig {
            num_heads: vec![5, 10, 20, 20],
            cross_attention_dim: 1024,
            use_linear_projection: true,
            ..Self::sd1()
        }
    }

    /// A small SD-shaped UNet for fast tests: three levels, two with attention.
    pub fn tiny() -> Self {
        UNetConfig {
            block_out_channels: vec![32, 64, 64],
            down_block_types: vec![BlockKind::CrossAttn, BlockKind::CrossAttn, BlockKind::Plain],
            up_block_types: vec![BlockKind::Plain, BlockKind::CrossAttn, BlockKind::CrossAttn],
            num_heads: vec![2, 4, 4],
            cross_attention_dim: 32,
            ..Self::sd1()
        }
    }

    /// Time-embedding width (4 × the first level's channels).
    pub fn time_embed_dim(&self) -> i64 {
        self.block_out_channels[0] * 4
    }
}

/// Activation of the CLIP MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClipActivation {
    /// x·sigmoid(1.702·x) (OpenAI CLIP, SD1)
    QuickGelu,
    /// exact erf GELU (OpenCLIP ViT-H, SD2)
    Gelu,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
}

impl ClipTextConfig {
    /// OpenAI CLIP ViT-L/14 text tower.
    pub fn sd1() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }

    /// OpenCLIP ViT-H/14 text tower as SD2 uses it (23 of 24 layers).
    pub fn sd2() -> Self {
        ClipTextConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: ClipActivation::Gelu,
            ..Self::sd1()
        }
    }

    /// From a transformers `text_encoder/config.json` (`CLIPTextConfig`). Fields the file leaves
    /// out take transformers' `CLIPTextConfig` defaults, as `from_pretrained` does.
    pub fn from_diffusers_json(v: &serde_json::Value) -> anyhow::Result<Self> {
        use anyhow::{anyhow, bail};
        let int = |k: &str, default: i64| -> anyhow::Result<i64> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(x) => x.as_i64().ok_or_else(|| {
                    anyhow!("text encoder config: `{k}` must be an integer, got {x}")
                }),
            }
        };
        let hidden_act = match v.get("hidden_act").and_then(|x| x.as_str()).unwrap_or("quick_gelu") {
            "quick_gelu" => ClipActivation::QuickGelu,
            "gelu" => ClipActivation::Gelu,
            other => bail!(
                "text encoder config: hidden_act `{other}` is not supported (expected quick_gelu or gelu)"
            ),
        };
        let layer_norm_eps = match v.get("layer_norm_eps") {
            None | Some(serde_json::Value::Null) => 1e-5,
            Some(x) => x
                .as_f64()
                .ok_or_else(|| anyhow!("text encoder config: `layer_norm_eps` must be a number"))?,
        };
        let cfg = ClipTextConfig {
            vocab_size: int("vocab_size", 49408)?,
            hidden_size: int("hidden_size", 512)?,
            intermediate_size: int("intermediate_size", 2048)?,
            num_hidden_layers: int("num_hidden_layers", 12)?,
            num_attention_heads: int("num_attention_heads", 8)?,
            max_position_embeddings: int("max_position_embeddings", 77)?,
            hidden_act,
            layer_norm_eps,
        };
        if cfg.num_attention_heads <= 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            bail!(
                "text encoder config: hidden_size {} is not divisible by num_attention_heads {}",
                cfg.hidden_size,
                cfg.num_attention_heads
            );
        }
        Ok(cfg)
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    /// Small encoder with the real vocabulary (so real token ids work) for fast tests.
    pub fn tiny() -> Self {
        ClipTextConfig {
            hidden_size: 32,
            intermediate_size: 37,
            num_hidden_layers: 5,
            num_attention_heads: 4,
            ..Self::sd1()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub latent_channels: i64,
    pub norm_num_groups: i64,
    /// sd-scripts hard-codes 0.18215 whatever the config says (spec §1.3).
    pub scaling_factor: f64,
}

impl VaeConfig {
    pub fn sd() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
        }
    }

    /// Two levels (latents at 1/2 resolution) for fast tests.
    pub fn tiny() -> Self {
        VaeConfig {
            block_out_channels: vec![32, 64],
            layers_per_block: 1,
            ..Self::sd()
        }
    }

    /// Pixel-to-latent downscale factor.
    pub fn downscale(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }
}
