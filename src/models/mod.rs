//! The Stable Diffusion networks (UNet, CLIP text encoder, VAE), their configs, attention
//! backends and checkpoint loading. Parameter paths mirror the Diffusers module tree, so loading
//! and LoRA naming are rename tables.
pub mod attention;
pub mod ckpt;
pub mod clip;
pub mod config;
pub mod layers;
pub mod loading;
pub mod nn;
pub mod recompute;
pub mod saving;
pub mod text;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
