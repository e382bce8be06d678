//! The safetensors metadata sd-scripts writes into a LoRA file: `ss_*` training facts,
//! `modelspec.*` (SAI ModelSpec 1.0.1), and the minimum set for `--no_metadata`
//! (spec: sdscripts_cli_data.md §5.4). Values are what Python's `str()` gives, so the strings
//! match sd-scripts' byte for byte where the inputs are the same.
use super::file::{file_sha256, legacy_file_hash};
use super::module::Alpha;
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::Path;

/// Python `repr(float)` / `str(float)`: shortest round-trip digits, scientific notation below
/// 1e-4 or from 1e16 on (`1e-05`, `1e+16`), `.0` on integral values.
pub fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let a = x.abs();
    if x == 0.0 || (1e-4..1e16).contains(&a) {
        let s = format!("{x}");
        return if s.contains('.') { s } else { format!("{s}.0") };
    }
    let e = format!("{x:e}");
    let (mant, exp) = e.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let sign = if exp < 0 { '-' } else { '+' };
    format!("{mant}e{sign}{:02}", exp.abs())
}

/// Python `str()` of an optional value: `None` when absent.
pub fn py_opt<T>(v: &Option<T>, f: impl Fn(&T) -> String) -> String {
    v.as_ref().map(f).unwrap_or_else(|| "None".into())
}

pub fn py_bool(b: bool) -> String {
    if b { "True" } else { "False" }.into()
}

/// `json.dumps` of a string (ensure_ascii: non-ASCII as \uXXXX escapes, UTF-16 surrogates).
pub fn py_json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            '\u{8}' => o.push_str("\\b"),
            '\u{c}' => o.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    o.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A Python scalar as it appears in sd-scripts' metadata (for args whose type varies, e.g.
/// `--lr_warmup_steps` int or float ratio).
#[derive(Debug, Clone, PartialEq)]
pub enum PyValue {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl PyValue {
    /// Python `str()`.
    pub fn py_str(&self) -> String {
        match self {
            PyValue::None => "None".into(),
            PyValue::Bool(b) => py_bool(*b),
            PyValue::Int(i) => i.to_string(),
            PyValue::Float(f) => py_float(*f),
            PyValue::Str(s) => s.clone(),
        }
    }
    /// `json.dumps` of the value.
    pub fn py_json(&self) -> String {
        match self {
            PyValue::None => "null".into(),
            PyValue::Bool(b) => if *b { "true" } else { "false" }.into(),
            PyValue::Int(i) => i.to_string(),
            PyValue::Float(f) if f.is_nan() => "NaN".into(),
            PyValue::Float(f) if f.is_infinite() => {
                if *f > 0.0 { "Infinity" } else { "-Infinity" }.into()
            }
            PyValue::Float(f) => py_float(*f),
            PyValue::Str(s) => py_json_str(s),
        }
    }
}

/// `ss_network_args`: `json.dumps(net_kwargs)` where train_network.py adds `"dropout":
/// --network_dropout` when the args lack it (not with `--dim_from_weights`). None when no
/// `--network_args` were given (sd-scripts then writes no key).
pub fn network_args_json(
    network_args: &[(String, String)],
    network_dropout: Option<f64>,
    dim_from_weights: bool,
) -> Option<String> {
    if network_args.is_empty() {
        return None;
    }
    let mut items: Vec<String> = network_args
        .iter()
        .map(|(k, v)| format!("{}: {}", py_json_str(k), py_json_str(v)))
        .collect();
    if !dim_from_weights && !network_args.iter().any(|(k, _)| k == "dropout") {
        let d = network_dropout.map(PyValue::Float).unwrap_or(PyValue::None);
        items.push(format!("\"dropout\": {}", d.py_json()));
    }
    Some(format!("{{{}}}", items.join(", ")))
}

/// The dataset part of the metadata, which differs between `--dataset_config` (TOML) runs and
/// directory (`--train_data_dir`) runs. JSON strings are `json.dumps` output, built by the data
/// side with insertion order preserved.
#[derive(Debug, Clone)]
pub enum DatasetFacts {
    Toml {
        /// `ss_datasets`
        datasets_json: String,
        /// `ss_tag_frequency`
        tag_frequency_json: String,
        /// `ss_dataset_dirs`
        dataset_dirs_json: String,
    },
    Dirs {
        batch_size_per_device: i64,
        total_batch_size: i64,
        /// `--resolution` as parsed (W, H); None → "None"
        resolution: Option<(i64, i64)>,
        color_aug: bool,
        flip_aug: bool,
        random_crop: bool,
        shuffle_caption: bool,
        enable_bucket: bool,
        bucket_no_upscale: bool,
        min_bucket_reso: i64,
        max_bucket_reso: i64,
        keep_tokens: i64,
        dataset_dirs_json: String,
        reg_dataset_dirs_json: String,
        tag_frequency_json: String,
        bucket_info_json: String,
    },
}

/// Everything the trainer knows that sd-scripts writes into a LoRA's metadata. Field names are
/// sd-scripts' argument names; `Option` = the Python value may be None.
#[derive(Debug, Clone)]
pub struct TrainingFacts {
    /// `random.randint(0, 2**32)` drawn before seeding.
    pub session_id: u64,
    /// `time.time()` at training start.
    pub training_started_at: f64,
    pub output_name: Option<String>,
    pub learning_rate: f64,
    /// The resolved TE lr (first element of `--text_encoder_lr`).
    pub text_encoder_lr: Option<f64>,
    pub unet_lr: Option<f64>,
    pub num_train_images: i64,
    pub num_validation_images: i64,
    pub num_reg_images: i64,
    pub num_batches_per_epoch: i64,
    pub num_epochs: i64,
    pub gradient_checkpointing: bool,
    pub gradient_accumulation_steps: i64,
    pub max_train_steps: i64,
    pub lr_warmup_steps: PyValue,
    pub lr_scheduler: String,
    pub network_module: String,
    pub network_dim: Option<i64>,
    /// None when `--network_alpha` was omitted (sd-scripts then writes "1", the int default);
    /// otherwise `str()` of the value as Python holds it ("1.0" from the command line).
    pub network_alpha: Option<Alpha>,
    pub network_dropout: Option<f64>,
    pub mixed_precision: String,
    pub full_fp16: bool,
    pub v2: bool,
    pub v_parameterization: bool,
    pub clip_skip: Option<i64>,
    pub max_token_length: Option<i64>,
    pub cache_latents: bool,
    pub seed: i64,
    pub lowram: bool,
    pub noise_offset: Option<f64>,
    pub multires_noise_iterations: Option<i64>,
    pub multires_noise_discount: f64,
    pub adaptive_noise_scale: Option<f64>,
    pub zero_terminal_snr: bool,
    pub training_comment: Option<String>,
    /// sd-scripts writes its git HEAD; "(unknown)" is what it writes when that fails.
    pub sd_scripts_commit_hash: String,
    /// e.g. "bitsandbytes.optim.adamw.AdamW8bit" + "(k=v,…)" when optimizer_args were given.
    pub optimizer: String,
    pub max_grad_norm: f64,
    pub caption_dropout_rate: f64,
    pub caption_dropout_every_n_epochs: i64,
    pub caption_tag_dropout_rate: f64,
    pub face_crop_aug_range: PyValue,
    pub prior_loss_weight: f64,
    pub min_snr_gamma: Option<f64>,
    pub scale_weight_norms: Option<f64>,
    pub ip_noise_gamma: Option<f64>,
    pub debiased_estimation_loss: bool,
    pub noise_offset_random_strength: bool,
    pub ip_noise_gamma_random_strength: bool,
    pub loss_type: String,
    pub huber_schedule: String,
    pub huber_scale: f64,
    pub huber_c: f64,
    pub fp8_base: bool,
    pub fp8_base_unet: bool,
    pub validation_seed: Option<i64>,
    pub validation_split: f64,
    pub max_validation_steps: Option<i64>,
    pub validate_every_n_epochs: Option<i64>,
    pub validate_every_n_steps: Option<i64>,
    pub resize_interpolation: Option<String>,
    pub dataset: DatasetFacts,
    /// From [`network_args_json`]; None when no `--network_args`.
    pub network_args_json: Option<String>,
    /// `--pretrained_model_name_or_path` as given (hashed if it is an existing file).
    pub pretrained_model_name_or_path: Option<String>,
    /// `--vae` as given.
    pub vae: Option<String>,
    // modelspec inputs
    pub no_metadata: bool,
    /// CLI `--resolution` (W, H) (the TOML resolution is not consulted by sd-scripts).
    pub resolution: Option<(i64, i64)>,
    pub min_timestep: Option<i64>,
    pub max_timestep: Option<i64>,
    pub metadata_title: Option<String>,
    pub metadata_author: Option<String>,
    pub metadata_description: Option<String>,
    pub metadata_license: Option<String>,
    pub metadata_tags: Option<String>,
    /// Other `--metadata_*` args (usage_hint, merged_from, trigger_phrase, …) as (field, value).
    pub metadata_extra: Vec<(String, String)>,
    /// `modelspec.implementation_version`: sd-scripts writes "sd-scripts/<git HEAD>".
    pub implementation_version: String,
}

impl Default for TrainingFacts {
    /// sd-scripts' argparse defaults for a SD1 run (the trainer overwrites what it knows).
    fn default() -> Self {
        TrainingFacts {
            session_id: 0,
            training_started_at: 0.0,
            output_name: None,
            learning_rate: 2e-6,
            text_encoder_lr: None,
            unet_lr: None,
            num_train_images: 0,
            num_validation_images: 0,
            num_reg_images: 0,
            num_batches_per_epoch: 0,
            num_epochs: 1,
            gradient_checkpointing: false,
            gradient_accumulation_steps: 1,
            max_train_steps: 1600,
            lr_warmup_steps: PyValue::Int(0),
            lr_scheduler: "constant".into(),
            network_module: super::network::NETWORK_MODULE.into(),
            network_dim: None,
            network_alpha: None,
            network_dropout: None,
            mixed_precision: "no".into(),
            full_fp16: false,
            v2: false,
            v_parameterization: false,
            clip_skip: None,
            max_token_length: None,
            cache_latents: false,
            seed: 0,
            lowram: false,
            noise_offset: None,
            multires_noise_iterations: None,
            multires_noise_discount: 0.3,
            adaptive_noise_scale: None,
            zero_terminal_snr: false,
            training_comment: None,
            sd_scripts_commit_hash: "(unknown)".into(),
            optimizer: "torch.optim.adamw.AdamW".into(),
            max_grad_norm: 1.0,
            caption_dropout_rate: 0.0,
            caption_dropout_every_n_epochs: 0,
            caption_tag_dropout_rate: 0.0,
            face_crop_aug_range: PyValue::None,
            prior_loss_weight: 1.0,
            min_snr_gamma: None,
            scale_weight_norms: None,
            ip_noise_gamma: None,
            debiased_estimation_loss: false,
            noise_offset_random_strength: false,
            ip_noise_gamma_random_strength: false,
            loss_type: "l2".into(),
            huber_schedule: "snr".into(),
            huber_scale: 1.0,
            huber_c: 0.1,
            fp8_base: false,
            fp8_base_unet: false,
            validation_seed: None,
            validation_split: 0.0,
            max_validation_steps: None,
            validate_every_n_epochs: None,
            validate_every_n_steps: None,
            resize_interpolation: None,
            dataset: DatasetFacts::Toml {
                datasets_json: "[]".into(),
                tag_frequency_json: "{}".into(),
                dataset_dirs_json: "{}".into(),
            },
            network_args_json: None,
            pretrained_model_name_or_path: None,
            vae: None,
            no_metadata: false,
            resolution: None,
            min_timestep: None,
            max_timestep: None,
            metadata_title: None,
            metadata_author: None,
            metadata_description: None,
            metadata_license: None,
            metadata_tags: None,
            metadata_extra: vec![],
            implementation_version: format!("sdlora/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// sd-scripts `SS_METADATA_MINIMUM_KEYS`, kept with `--no_metadata`.
pub const MINIMUM_KEYS: [&str; 6] = [
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
];

/// Keys whose values are random or time-based by design.
pub const VOLATILE_KEYS: [&str; 5] = [
    "ss_session_id",
    "ss_training_started_at",
    "ss_training_finished_at",
    "modelspec.date",
    "modelspec.title",
];

fn opt_f(v: &Option<f64>) -> String {
    py_opt(v, |x| py_float(*x))
}
fn opt_i(v: &Option<i64>) -> String {
    py_opt(v, |x| x.to_string())
}
fn opt_s(v: &Option<String>) -> String {
    py_opt(v, |x| x.clone())
}

/// Local time of a unix timestamp as `datetime.fromtimestamp(int(ts)).isoformat()`.
pub fn local_iso_datetime(ts: f64) -> String {
    let t = ts.floor() as libc::time_t;
    // SAFETY: localtime_r writes only into the tm we pass.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return "1970-01-01T00:00:00".into();
    }
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// Seconds since the epoch as Python's `time.time()`.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl TrainingFacts {
    /// `ss_base_model_version` (`model_util.get_model_version_str_for_sd1_sd2`).
    pub fn base_model_version(&self) -> &'static str {
        match (self.v2, self.v_parameterization) {
            (false, false) => "sd_v1",
            (false, true) => "sd_v1_v",
            (true, false) => "sd_v2",
            (true, true) => "sd_v2_v",
        }
    }

    /// The metadata train_network.py assembles at training start (everything but the per-save
    /// keys). Hashes the base model and VAE files when they exist, as sd-scripts does.
    pub fn start_metadata(&self) -> Result<BTreeMap<String, String>> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        put("ss_session_id", self.session_id.to_string());
        put("ss_training_started_at", py_float(self.training_started_at));
        put("ss_output_name", opt_s(&self.output_name));
        put("ss_learning_rate", py_float(self.learning_rate));
        put("ss_text_encoder_lr", opt_f(&self.text_encoder_lr));
        put("ss_unet_lr", opt_f(&self.unet_lr));
        put("ss_num_train_images", self.num_train_images.to_string());
        put(
            "ss_num_validation_images",
            self.num_validation_images.to_string(),
        );
        put("ss_num_reg_images", self.num_reg_images.to_string());
        put(
            "ss_num_batches_per_epoch",
            self.num_batches_per_epoch.to_string(),
        );
        put("ss_num_epochs", self.num_epochs.to_string());
        put(
            "ss_gradient_checkpointing",
            py_bool(self.gradient_checkpointing),
        );
        put(
            "ss_gradient_accumulation_steps",
            self.gradient_accumulation_steps.to_string(),
        );
        put("ss_max_train_steps", self.max_train_steps.to_string());
        put("ss_lr_warmup_steps", self.lr_warmup_steps.py_str());
        put("ss_lr_scheduler", self.lr_scheduler.clone());
        put("ss_network_module", self.network_module.clone());
        put("ss_network_dim", opt_i(&self.network_dim));
        put(
            "ss_network_alpha",
            self.network_alpha
                .map(|a| a.py_str())
                .unwrap_or_else(|| "1".into()),
        );
        put("ss_network_dropout", opt_f(&self.network_dropout));
        put("ss_mixed_precision", self.mixed_precision.clone());
        put("ss_full_fp16", py_bool(self.full_fp16));
        put("ss_v2", py_bool(self.v2));
        put("ss_base_model_version", self.base_model_version().into());
        put("ss_clip_skip", opt_i(&self.clip_skip));
        put("ss_max_token_length", opt_i(&self.max_token_length));
        put("ss_cache_latents", py_bool(self.cache_latents));
        put("ss_seed", self.seed.to_string());
        put("ss_lowram", py_bool(self.lowram));
        put("ss_noise_offset", opt_f(&self.noise_offset));
        put(
            "ss_multires_noise_iterations",
            opt_i(&self.multires_noise_iterations),
        );
        put(
            "ss_multires_noise_discount",
            py_float(self.multires_noise_discount),
        );
        put("ss_adaptive_noise_scale", opt_f(&self.adaptive_noise_scale));
        put("ss_zero_terminal_snr", py_bool(self.zero_terminal_snr));
        put("ss_training_comment", opt_s(&self.training_comment));
        put(
            "ss_sd_scripts_commit_hash",
            self.sd_scripts_commit_hash.clone(),
        );
        put("ss_optimizer", self.optimizer.clone());
        put("ss_max_grad_norm", py_float(self.max_grad_norm));
        put(
            "ss_caption_dropout_rate",
            py_float(self.caption_dropout_rate),
        );
        put(
            "ss_caption_dropout_every_n_epochs",
            self.caption_dropout_every_n_epochs.to_string(),
        );
        put(
            "ss_caption_tag_dropout_rate",
            py_float(self.caption_tag_dropout_rate),
        );
        put("ss_face_crop_aug_range", self.face_crop_aug_range.py_str());
        put("ss_prior_loss_weight", py_float(self.prior_loss_weight));
        put("ss_min_snr_gamma", opt_f(&self.min_snr_gamma));
        put("ss_scale_weight_norms", opt_f(&self.scale_weight_norms));
        put("ss_ip_noise_gamma", opt_f(&self.ip_noise_gamma));
        put(
            "ss_debiased_estimation",
            py_bool(self.debiased_estimation_loss),
        );
        put(
            "ss_noise_offset_random_strength",
            py_bool(self.noise_offset_random_strength),
        );
        put(
            "ss_ip_noise_gamma_random_strength",
            py_bool(self.ip_noise_gamma_random_strength),
        );
        put("ss_loss_type", self.loss_type.clone());
        put("ss_huber_schedule", self.huber_schedule.clone());
        put("ss_huber_scale", py_float(self.huber_scale));
        put("ss_huber_c", py_float(self.huber_c));
        put("ss_fp8_base", py_bool(self.fp8_base));
        put("ss_fp8_base_unet", py_bool(self.fp8_base_unet));
        put("ss_validation_seed", opt_i(&self.validation_seed));
        put("ss_validation_split", py_float(self.validation_split));
        put("ss_max_validation_steps", opt_i(&self.max_validation_steps));
        put(
            "ss_validate_every_n_epochs",
            opt_i(&self.validate_every_n_epochs),
        );
        put(
            "ss_validate_every_n_steps",
            opt_i(&self.validate_every_n_steps),
        );
        put("ss_resize_interpolation", opt_s(&self.resize_interpolation));
        match &self.dataset {
            DatasetFacts::Toml {
                datasets_json,
                tag_frequency_json,
                dataset_dirs_json,
            } => {
                put("ss_datasets", datasets_json.clone());
                put("ss_tag_frequency", tag_frequency_json.clone());
                put("ss_dataset_dirs", dataset_dirs_json.clone());
            }
            DatasetFacts::Dirs {
                batch_size_per_device,
                total_batch_size,
                resolution,
                color_aug,
                flip_aug,
                random_crop,
                shuffle_caption,
                enable_bucket,
                bucket_no_upscale,
                min_bucket_reso,
                max_bucket_reso,
                keep_tokens,
                dataset_dirs_json,
                reg_dataset_dirs_json,
                tag_frequency_json,
                bucket_info_json,
            } => {
                put(
                    "ss_batch_size_per_device",
                    batch_size_per_device.to_string(),
                );
                put("ss_total_batch_size", total_batch_size.to_string());
                put(
                    "ss_resolution",
                    py_opt(resolution, |(w, h)| format!("({w}, {h})")),
                );
                put("ss_color_aug", py_bool(*color_aug));
                put("ss_flip_aug", py_bool(*flip_aug));
                put("ss_random_crop", py_bool(*random_crop));
                put("ss_shuffle_caption", py_bool(*shuffle_caption));
                put("ss_enable_bucket", py_bool(*enable_bucket));
                put("ss_bucket_no_upscale", py_bool(*bucket_no_upscale));
                put("ss_min_bucket_reso", min_bucket_reso.to_string());
                put("ss_max_bucket_reso", max_bucket_reso.to_string());
                put("ss_keep_tokens", keep_tokens.to_string());
                put("ss_dataset_dirs", dataset_dirs_json.clone());
                put("ss_reg_dataset_dirs", reg_dataset_dirs_json.clone());
                put("ss_tag_frequency", tag_frequency_json.clone());
                put("ss_bucket_info", bucket_info_json.clone());
            }
        }
        if let Some(a) = &self.network_args_json {
            put("ss_network_args", a.clone());
        }
        for (name, hash_key, new_hash_key, name_key) in [
            (
                &self.pretrained_model_name_or_path,
                "ss_sd_model_hash",
                "ss_new_sd_model_hash",
                "ss_sd_model_name",
            ),
            (&self.vae, "ss_vae_hash", "ss_new_vae_hash", "ss_vae_name"),
        ] {
            if let Some(given) = name {
                let p = Path::new(given);
                let mut shown = given.clone();
                if p.exists() {
                    if p.is_file() {
                        put(hash_key, legacy_file_hash(p)?);
                        put(new_hash_key, file_sha256(p)?);
                    } else {
                        put(hash_key, "IsADirectory".into());
                        put(new_hash_key, "IsADirectory".into());
                    }
                    shown = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or(shown);
                }
                put(name_key, shown);
            }
        }
        Ok(m)
    }

    /// The `modelspec.*` keys (`train_util.get_sai_model_spec(None, args, sdxl=False, lora=True,
    /// ti=False)`), stamped with `timestamp`.
    pub fn modelspec(&self, timestamp: f64) -> BTreeMap<String, String> {
        let mut spec =
            crate::modelspec::ModelSpec::new(self.v2, self.v_parameterization, Some("lora"));
        spec.title = self
            .metadata_title
            .clone()
            .or_else(|| self.output_name.clone());
        spec.resolution = self.resolution;
        spec.description = self.metadata_description.clone();
        spec.author = self.metadata_author.clone();
        spec.license = self.metadata_license.clone();
        spec.tags = self.metadata_tags.clone();
        if self.min_timestep.is_some() || self.max_timestep.is_some() {
            spec.timestep_range = Some(format!(
                "{},{}",
                self.min_timestep.unwrap_or(0),
                self.max_timestep.unwrap_or(1000)
            ));
        }
        spec.encoder_layer = self.clip_skip.map(|c| c.to_string());
        spec.extra = self.metadata_extra.clone();
        spec.implementation_version = self.implementation_version.clone();
        spec.keys(timestamp)
    }

    /// The metadata of one save (`save_model` in train_network.py): `start` plus
    /// `ss_training_finished_at`, `ss_steps`, `ss_epoch`, reduced to the minimum keys under
    /// `--no_metadata`, plus modelspec. `sshs_*` are added by [`super::LoraNetwork::save`].
    pub fn save_metadata(
        &self,
        start: &BTreeMap<String, String>,
        steps: i64,
        epoch: i64,
        now: f64,
    ) -> BTreeMap<String, String> {
        let mut m: BTreeMap<String, String> = if self.no_metadata {
            start
                .iter()
                .filter(|(k, _)| MINIMUM_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        } else {
            let mut m = start.clone();
            m.insert("ss_training_finished_at".into(), py_float(now));
            m.insert("ss_steps".into(), steps.to_string());
            m.insert("ss_epoch".into(), epoch.to_string());
            m
        };
        m.extend(self.modelspec(now));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_ascii_escaped() {
        // json.dumps escapes: quote, and non-ASCII as UTF-16 \u escapes
        assert_eq!(py_json_str("a\"b"), "\"a\\\"b\"");
        assert_eq!(py_json_str("é😀"), "\"\\u00e9\\ud83d\\ude00\"");
    }
}
