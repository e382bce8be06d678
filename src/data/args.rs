//! Every dataset-related command-line flag of sd-scripts' `train_network.py`, with argparse's
//! defaults. The training CLI parser fills this struct; the data pipeline reads nothing else.
//! spec: sdscripts_cli_data.md §1.2 ("Dataset options on the CLI").
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct DataArgs {
    pub dataset_config: Option<PathBuf>,
    pub train_data_dir: Option<PathBuf>,
    pub reg_data_dir: Option<PathBuf>,
    pub in_json: Option<PathBuf>,
    /// `--dataset_repeats` (fallback for `num_repeats`).
    pub dataset_repeats: i64,
    /// `--resolution` already parsed to (W, H); see [`parse_resolution`].
    pub resolution: Option<(i64, i64)>,
    /// `--train_batch_size` (fallback for `batch_size`).
    pub train_batch_size: i64,
    /// `--caption_extension` (sd-scripts' default is ".caption", not ".txt").
    pub caption_extension: String,
    pub shuffle_caption: bool,
    pub caption_separator: String,
    pub keep_tokens: i64,
    pub keep_tokens_separator: String,
    pub secondary_separator: Option<String>,
    pub enable_wildcard: bool,
    pub caption_prefix: Option<String>,
    pub caption_suffix: Option<String>,
    pub caption_dropout_rate: f64,
    pub caption_dropout_every_n_epochs: i64,
    pub caption_tag_dropout_rate: f64,
    pub token_warmup_min: i64,
    /// argparse default is the int 0 (printed "0"); a value given on the CLI is a float.
    pub token_warmup_step: f64,
    pub color_aug: bool,
    pub flip_aug: bool,
    pub random_crop: bool,
    /// `--face_crop_aug_range "lo,hi"`, parsed; see [`parse_face_crop_aug_range`].
    pub face_crop_aug_range: Option<(f64, f64)>,
    pub enable_bucket: bool,
    pub min_bucket_reso: i64,
    pub max_bucket_reso: i64,
    pub bucket_reso_steps: i64,
    pub bucket_no_upscale: bool,
    pub resize_interpolation: Option<String>,
    pub cache_latents: bool,
    pub cache_latents_to_disk: bool,
    pub vae_batch_size: i64,
    pub skip_cache_check: bool,
    pub cache_info: bool,
    pub alpha_mask: bool,
    pub masked_loss: bool,
    pub debug_dataset: bool,
    pub max_data_loader_n_workers: i64,
    pub persistent_data_loader_workers: bool,
    pub prior_loss_weight: f64,
    /// None = 75 tokens; 150 or 225 extend to 2 or 3 windows of 77.
    pub max_token_length: Option<i64>,
    pub validation_split: f64,
    pub validation_seed: Option<i64>,
    /// `--seed`; the trainer resolves None to a random seed before building the dataset.
    pub seed: Option<u64>,
    /// SD2 tokenizer pads with id 0 instead of EOS.
    pub v2: bool,
}

impl Default for DataArgs {
    fn default() -> Self {
        DataArgs {
            dataset_config: None,
            train_data_dir: None,
            reg_data_dir: None,
            in_json: None,
            dataset_repeats: 1,
            resolution: None,
            train_batch_size: 1,
            caption_extension: ".caption".into(),
            shuffle_caption: false,
            caption_separator: ",".into(),
            keep_tokens: 0,
            keep_tokens_separator: String::new(),
            secondary_separator: None,
            enable_wildcard: false,
            caption_prefix: None,
            caption_suffix: None,
            caption_dropout_rate: 0.0,
            caption_dropout_every_n_epochs: 0,
            caption_tag_dropout_rate: 0.0,
            token_warmup_min: 1,
            token_warmup_step: 0.0,
            color_aug: false,
            flip_aug: false,
            random_crop: false,
            face_crop_aug_range: None,
            enable_bucket: false,
            min_bucket_reso: 256,
            max_bucket_reso: 1024,
            bucket_reso_steps: 64,
            bucket_no_upscale: false,
            resize_interpolation: None,
            cache_latents: false,
            cache_latents_to_disk: false,
            vae_batch_size: 1,
            skip_cache_check: false,
            cache_info: false,
            alpha_mask: false,
            masked_loss: false,
            debug_dataset: false,
            max_data_loader_n_workers: 8,
            persistent_data_loader_workers: false,
            prior_loss_weight: 1.0,
            max_token_length: None,
            validation_split: 0.0,
            validation_seed: None,
            seed: None,
            v2: false,
        }
    }
}

/// `--resolution`: "S" or "W,H" (as `TU:prepare_dataset_args`).
pub fn parse_resolution(s: &str) -> Result<(i64, i64)> {
    let parts: Vec<&str> = s.split(',').collect();
    let mut v = Vec::new();
    for p in &parts {
        match p.trim().parse::<i64>() {
            Ok(x) if x > 0 => v.push(x),
            _ => bail!(
                "--resolution: `{s}` is not 'size' or 'width,height' with positive integers \
                 (e.g. --resolution=512,512) / resolution（解像度）は'サイズ'または'幅','高さ'で指定してください"
            ),
        }
    }
    match v.as_slice() {
        [s1] => Ok((*s1, *s1)),
        [w, h] => Ok((*w, *h)),
        _ => bail!(
            "--resolution: `{s}` must be 'size' or 'width,height' / resolution（解像度）は'サイズ'または'幅','高さ'で指定してください"
        ),
    }
}

/// `--face_crop_aug_range "lo,hi"`.
pub fn parse_face_crop_aug_range(s: &str) -> Result<(f64, f64)> {
    let v: Vec<f64> = s
        .split(',')
        .map(|p| p.trim().parse::<f64>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| {
            anyhow::anyhow!(
                "--face_crop_aug_range: `{s}` must be two floats 'lo,hi' / face_crop_aug_rangeは'下限,上限'で指定してください"
            )
        })?;
    if v.len() != 2 || v[0] > v[1] {
        bail!("--face_crop_aug_range: `{s}` must be two floats 'lo,hi' with lo <= hi / face_crop_aug_rangeは'下限,上限'で指定してください");
    }
    Ok((v[0], v[1]))
}
