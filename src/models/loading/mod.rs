//! Stable Diffusion checkpoints as users have them, loaded into three [`WeightMap`]s under
//! Diffusers/transformers parameter names plus the configs of the three networks.
//!
//! Sources (spec: sdscripts_model_math.md §2, §2.5):
//! - an LDM single file `.safetensors` (`model.diffusion_model.*`, `first_stage_model.*`,
//!   `cond_stage_model.transformer.*` for SD1 / `cond_stage_model.model.*` for SD2), fp32, fp16
//!   or bf16, with or without `model_ema.*` (ignored, as sd-scripts does);
//! - a Diffusers folder (`unet/`, `text_encoder/`, `vae/`, each `config.json` + safetensors,
//!   plain or `fp16` variant, single or sharded).
//!
//! PyTorch pickles (`.ckpt`, `.pt`, `.pth`, `.bin` written by `torch.save`) are read by
//! [`super::ckpt`] without running any of their code: the tensors of `state_dict` (or of the
//! top-level dict), strided views of storages in the same memory-mapped file.
//!
//! Single files are memory-mapped and each tensor is created from the mapped bytes, converted to
//! the requested dtype and device, after which its pages are dropped from the mapping: peak
//! memory is the loaded weights plus about one tensor, not two copies of the file.
use super::config::{BlockKind, ClipActivation, ClipTextConfig, SdVersion, UNetConfig, VaeConfig};
use super::weights::WeightMap;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Metadata keys with the attention head counts, which LDM single files do not record.
/// `scripts/make_sd_checkpoint.py` writes them for configs that break the SD1/SD2 rule (tiny).
pub const META_UNET_HEADS: &str = "sdlora.unet_num_heads";
pub const META_CLIP_HEADS: &str = "sdlora.clip_num_heads";

/// SD1 UNets have 8 heads at every level (Diffusers' `attention_head_dim=8`), SD2 UNets and both
/// CLIP towers use 64-wide heads (spec §1.1, §1.2, §1.4).
const SD1_UNET_HEADS: i64 = 8;
const HEAD_DIM: i64 = 64;
/// Not recorded in a single file; every SD checkpoint uses these (sd-scripts hard-codes them).
const NORM_GROUPS: i64 = 32;

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const CLIP_V1_PREFIX: &str = "cond_stage_model.transformer.";
pub const CLIP_V2_PREFIX: &str = "cond_stage_model.model.";

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where every tensor is put.
    pub device: Device,
    pub unet_dtype: Kind,
    pub text_encoder_dtype: Kind,
    pub vae_dtype: Kind,
    /// sd-scripts' `--v2`: `Some(true)`/`Some(false)` demand an SD2/SD1 checkpoint (a mismatch is
    /// an error naming the flag); `None` accepts what the keys say.
    pub v2: Option<bool>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            unet_dtype: Kind::Float,
            text_encoder_dtype: Kind::Float,
            vae_dtype: Kind::Float,
            v2: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// LDM single file.
    SingleFile,
    /// Diffusers folder.
    Diffusers,
}

pub struct LoadedCheckpoint {
    pub version: SdVersion,
    pub unet_config: UNetConfig,
    pub clip_config: ClipTextConfig,
    pub vae_config: VaeConfig,
    pub unet: WeightMap,
    pub text_encoder: WeightMap,
    pub vae: WeightMap,
}

/// Loads a Stable Diffusion 1.x/2.x checkpoint: an LDM single `.safetensors` file or a Diffusers
/// folder. SD2 single files get 1×1-conv `proj_in`/`proj_out` (`use_linear_projection = false`,
/// weights unsqueezed) exactly as sd-scripts' single-file loader builds them; Diffusers folders
/// keep what their `config.json` says (spec §1.4).
pub fn load_checkpoint(path: &Path, opts: &LoadOptions) -> Result<LoadedCheckpoint> {
    let ck = if path.is_dir() {
        load_diffusers_folder(path, opts)?
    } else if path.is_file() {
        load_single_file(path, opts)?
    } else {
        bail!(
            "{}: no such file or folder (expected a Stable Diffusion .safetensors file or a \
             Diffusers folder with unet/, text_encoder/ and vae/)",
            path.display()
        )
    };
    check_v2_flag(path, ck.version, opts.v2)?;
    Ok(ck)
}

/// Tells whether `path` is a folder (Diffusers) or a single file, without loading anything.
pub fn checkpoint_format(path: &Path) -> CheckpointFormat {
    if path.is_dir() {
        CheckpointFormat::Diffusers
    } else {
        CheckpointFormat::SingleFile
    }
}

fn check_v2_flag(path: &Path, version: SdVersion, v2: Option<bool>) -> Result<()> {
    match (v2, version) {
        (Some(true), SdVersion::V1) => bail!(
            "{}: --v2 was given but this is a Stable Diffusion 1.x checkpoint (CLIP ViT-L text \
             encoder); remove --v2",
            path.display()
        ),
        (Some(false), SdVersion::V2) => bail!(
            "{}: this is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder); pass --v2 \
             (and --v_parameterization for 768-v models)",
            path.display()
        ),
        _ => Ok(()),
    }
}

mod detect;
mod diffusers;
mod ldm_keys;
mod mapped;
mod shapes;
mod single_file;

use detect::*;
use diffusers::*;
pub use ldm_keys::Target;
use ldm_keys::*;
pub use mapped::{dtype_of_kind, kind_of_dtype, Entry, MappedSafetensors};
use shapes::*;
pub use shapes::{clip_shapes, unet_shapes, vae_shapes};
use single_file::*;
pub use single_file::{ldm_key_map, load_vae, LdmKeyMap};
