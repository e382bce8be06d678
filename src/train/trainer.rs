//! The train_network run, assembled from the pieces of this crate in the order sd-scripts'
//! `NetworkTrainer.train` runs them (spec: sdscripts_cli_data.md §4, §5, §6;
//! sdscripts_model_math.md §4, §5, §8): seed → dataset → models → latent cache → LoRA →
//! optimizer / scheduler → epochs of steps → saves.
//!
//! Random numbers are drawn from the same generators in the same order as sd-scripts: the
//! Python `random` stream (dataset order, augmentations, multires noise) is the data module's
//! port; everything torch draws comes from libtorch's global generators (the CPU one for model
//! init replay, LoRA init, DataLoader seeds and timesteps; the device one for noise).
use super::amp::{resolve_precision, GradScaler, Precision, ScalerConfig};
use super::args::TrainArgs;
use super::console::{epoch_line, running_training_lines, LossRecorder, RunSummary, StepsBar};
use super::counting;
use super::lr::{LrScheduler, Schedule};
use super::noise::{DdpmConfig, LossConfig, NoiseScheduler};
use super::optim::build::{build_optimizer, resolve_kind, OptimizerKind};
use super::optim::common::{Optimizer, ParamGroup as OptGroup};
use super::optim::optimizer_args::parse_kwargs;
use super::rng_replay::{self, BaseModels, InitPlan};
use super::save::{output_path, removing_line, saving_line, train_state_json, SavePlan};
use super::step::{finish_optimizer_step, forward_loss, StepModels};
use super::tensorboard::{local_timestamp, run_log_dir, EventWriter};
use crate::data::args::DataArgs;
use crate::data::cache::{cache_latents, LatentEncoder};
use crate::data::dataset::{build_dataset_group_with_log, DatasetGroup};
use crate::data::loader::{GlobalTorchSeeds, Loader};
use crate::data::log::{train_network, train_util, ConsoleHandler, DataLog, Level, Site};
use crate::data::pyrandom::PyRandom;
use crate::lora::metadata::{now_unix, PyValue as MetaValue, TrainingFacts};
use crate::lora::network::{check_save_model_as, LoraNetwork, LoraOptions};
use crate::models::attention::AttentionBackend;
use crate::models::clip::ClipTextModel;
use crate::models::layers::VisitLayers;
use crate::models::loading::{
    checkpoint_format, load_checkpoint, load_vae, CheckpointFormat, LoadOptions,
};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Device, Kind, Tensor};

/// sd-scripts hard-codes the SD latent scale (spec math §1.3).
const VAE_SCALE_FACTOR: f64 = 0.18215;

/// Set by SIGINT/SIGTERM: the loop finishes the current step, saves a state and stops.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

fn info(line: impl AsRef<str>) {
    eprintln!("INFO     {}", line.as_ref());
}

fn warn(line: impl AsRef<str>) {
    eprintln!("WARNING  {}", line.as_ref());
}

/// The VAE as the latent cache consumes it: sample of the posterior, on the CPU, VAE dtype.
struct VaeEncoder<'a> {
    vae: &'a AutoencoderKL,
    device: Device,
    kind: Kind,
}

impl LatentEncoder for VaeEncoder<'_> {
    fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        let x = images.to_device(self.device).to_kind(self.kind);
        Ok(self.vae.encode_sample(&x).to_device(Device::Cpu))
    }
}

fn data_args(a: &TrainArgs, seed: u64) -> Result<DataArgs> {
    Ok(DataArgs {
        dataset_config: a.dataset_config.clone(),
        train_data_dir: a.train_data_dir.as_ref().map(PathBuf::from),
        reg_data_dir: a.reg_data_dir.as_ref().map(PathBuf::from),
        in_json: a.in_json.as_ref().map(PathBuf::from),
        dataset_repeats: a.dataset_repeats,
        resolution: a.resolution_wh()?,
        train_batch_size: a.train_batch_size,
        caption_extension: a.caption_extension.clone(),
        shuffle_caption: a.shuffle_caption,
        caption_separator: a.caption_separator.clone(),
        keep_tokens: a.keep_tokens,
        keep_tokens_separator: a.keep_tokens_separator.clone(),
        secondary_separator: a.secondary_separator.clone(),
        enable_wildcard: a.enable_wildcard,
        caption_prefix: a.caption_prefix.clone(),
        caption_suffix: a.caption_suffix.clone(),
        caption_dropout_rate: a.caption_dropout_rate,
        caption_dropout_every_n_epochs: a.caption_dropout_every_n_epochs,
        caption_tag_dropout_rate: a.caption_tag_dropout_rate,
        token_warmup_min: a.token_warmup_min,
        token_warmup_step: a.token_warmup_step,
        color_aug: a.color_aug,
        flip_aug: a.flip_aug,
        random_crop: a.random_crop,
        face_crop_aug_range: a.face_crop_range(),
        enable_bucket: a.enable_bucket,
        min_bucket_reso: a.min_bucket_reso,
        max_bucket_reso: a.max_bucket_reso,
        bucket_reso_steps: a.bucket_reso_steps,
        bucket_no_upscale: a.bucket_no_upscale,
        resize_interpolation: a.resize_interpolation.clone(),
        cache_latents: a.cache_latents,
        cache_latents_to_disk: a.cache_latents_to_disk,
        vae_batch_size: a.vae_batch_size,
        skip_cache_check: a.skip_cache_check,
        cache_info: a.cache_info,
        alpha_mask: a.alpha_mask,
        masked_loss: a.masked_loss,
        debug_dataset: a.debug_dataset,
        max_data_loader_n_workers: a.max_data_loader_n_workers,
        persistent_data_loader_workers: a.persistent_data_loader_workers,
        prior_loss_weight: a.prior_loss_weight,
        max_token_length: a.max_token_length,
        validation_split: a.validation_split,
        validation_seed: a.validation_seed,
        seed: Some(seed),
        v2: a.v2,
    })
}

/// The dataset log, set up as sd-scripts' console would be at `set_seed`: its handler (rich by
/// default), rich's link cache filled by the `verify_training_args` warnings logged before the
/// seed, and the tokenizer-loading lines logged after it (sdlora's tokenizer is built in, so it
/// does not print them), whose rich draws come before the dataset seed (see data::log).
fn sd_scripts_console(a: &TrainArgs, verify_warnings: &[String]) -> DataLog {
    let log = DataLog::new(true);
    log.set_console(ConsoleHandler::from_flags(
        a.console_log_simple,
        a.console_log_file.is_some(),
        a.console_log_level.as_deref(),
    ));
    // verify_training_args / prepare_dataset_args (train_util.py) log before the seed: only
    // their link-cache entries outlive the reseed. The config-file notice is logged later, by
    // the dataset builder, as sd-scripts does.
    for (i, w) in verify_warnings.iter().enumerate() {
        if !w.starts_with("ignoring the following options") {
            log.unprinted(Level::Warning, train_util(4400 + i as u32));
        }
    }
    log.discard_owed();
    // strategy_sd.SdTokenizeStrategy: "Using v1/v2 tokenizer", then strategy_base's
    // "load tokenizer from cache" (cache present) or "save Tokenizer to cache" (absent)
    log.unprinted(
        Level::Info,
        Site {
            file: "strategy_sd.py",
            line: 26,
        },
    );
    if let Some(dir) = &a.tokenizer_cache_dir {
        let id = if a.v2 {
            "stabilityai_stable-diffusion-2"
        } else {
            "openai_clip-vit-large-patch14"
        };
        let line = if Path::new(dir).join(id).exists() {
            61
        } else {
            68
        };
        log.unprinted(
            Level::Info,
            Site {
                file: "strategy_base.py",
                line,
            },
        );
    }
    log
}

/// What shapes sd-scripts' log lines between building the dataset and the first batch.
struct SetupFacts {
    single_file: bool,
    /// UNet blocks with a gradient_checkpointing flag: down blocks, the mid block, up blocks.
    unet_blocks: usize,
    conv_lora: bool,
    train_te: bool,
    train_unet: bool,
    optimizer: OptimizerKind,
}

/// sd-scripts' lines (as rich draws, see data::log) from `accelerator` setup to the first batch
/// for the configurations sdlora runs (sd-scripts 48d368f, traced: train_network.py with
/// networks.lora on a single-file SD checkpoint). sdlora prints its own versions of some of them;
/// the dataset's latent-caching lines are logged by data::cache. Saving logs nothing until the
/// final "model saved.", after the last draw. Not modelled: Diffusers-folder and --vae loading
/// lines, --network_weights, optimizer warnings.
fn sd_scripts_setup_records(log: &DataLog, a: &TrainArgs, f: &SetupFacts) {
    let info = |site: Site| log.unprinted(Level::Info, site);
    let file = |file: &'static str, line: u32| Site { file, line };
    info(train_network(593)); // preparing accelerator
    info(train_util(5574)); // loading model for process 0/1
    if f.single_file {
        info(train_util(5530)); // load StableDiffusion checkpoint
        info(file("original_unet.py", 1395)); // UNet2DConditionModel: ...
        info(file("model_util.py", 1011)); // loading u-net
        info(file("model_util.py", 1019)); // loading vae
        info(file("model_util.py", 1076)); // loading text encoder
    } else {
        info(train_util(5536)); // load Diffusers pretrained models
    }
    // replace_unet_modules: mem_eff_attn, else xformers, else sdpa
    if a.mem_eff_attn {
        info(train_util(3364));
    } else if a.xformers {
        info(train_util(3367));
    } else if a.sdpa {
        info(train_util(3375));
    }
    info(file("lora.py", 935)); // create LoRA network. base dim (rank)
    info(file("lora.py", 936)); // neuron dropout
    if f.conv_lora {
        info(file("lora.py", 940)); // apply LoRA to Conv2d with kernel size (3,3)
    }
    info(file("lora.py", 1030)); // create LoRA for Text Encoder:
    info(file("lora.py", 1035)); // ... N modules.
    info(file("lora.py", 1043)); // create LoRA for U-Net: N modules.
    if f.train_te {
        info(file("lora.py", 1084)); // enable LoRA for text encoder
    }
    if f.train_unet {
        info(file("lora.py", 1089)); // enable LoRA for U-Net
    }
    if a.gradient_checkpointing {
        for _ in 0..f.unet_blocks {
            info(file("original_unet.py", 1529)); // <Block> False -> True
        }
    }
    info(train_util(match f.optimizer {
        OptimizerKind::AdamW => 5096,
        OptimizerKind::AdamW8bit => 4897,
        OptimizerKind::Lion => 4886,
        OptimizerKind::SgdNesterov => 4969,
        OptimizerKind::Adafactor => 5056,
    }));
    info(train_network(1347)); // unet dtype
    info(train_network(1353)); // text_encoder [0] dtype
}

fn save_precision(a: &TrainArgs) -> Option<Kind> {
    match a.save_precision.as_deref() {
        Some("fp16") => Some(Kind::Half),
        Some("bf16") => Some(Kind::BFloat16),
        Some("float") => Some(Kind::Float),
        _ => None,
    }
}

/// Everything a save needs besides the step counters.
struct Saver<'a> {
    a: &'a TrainArgs,
    out_dir: PathBuf,
    plan: SavePlan,
    facts: TrainingFacts,
    start_meta: BTreeMap<String, String>,
}

impl Saver<'_> {
    fn save_lora(&self, net: &LoraNetwork, name: &str, steps: i64, epoch: i64) -> Result<()> {
        let path = output_path(&self.out_dir, name);
        println!("{}", saving_line(&path));
        let meta = self
            .facts
            .save_metadata(&self.start_meta, steps, epoch, now_unix());
        net.save(&path, save_precision(self.a), &meta)
            .with_context(|| format!("saving {}", path.display()))?;
        Ok(())
    }

    fn remove(&self, name: &str) {
        let path = output_path(&self.out_dir, name);
        if path.exists() {
            println!("{}", removing_line(&path));
            let r = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = r {
                warn(format!("could not remove {}: {e}", path.display()));
            }
        }
    }
}

/// What a state directory holds (sdlora's layout; see README): the LoRA, the optimizer and
/// scaler tensors, the LR-scheduler step, the counters and every RNG state.
struct TrainState<'s> {
    net: &'s LoraNetwork,
    opt: &'s dyn Optimizer,
    scaler: &'s GradScaler,
    sched_steps: i64,
    epoch: i64,
    global_step: i64,
    py_rng: &'s PyRandom,
    cuda: Option<Device>,
}

fn save_state(dir: &Path, st: &TrainState<'_>) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (k, t) in st.net.state_dict() {
        tensors.push((format!("network.{k}"), t.detach().to_device(Device::Cpu)));
    }
    for (k, t) in st.opt.state_tensors() {
        tensors.push((format!("optimizer.{k}"), t.detach().to_device(Device::Cpu)));
    }
    for (k, t) in st.scaler.state_tensors() {
        tensors.push((format!("scaler.{k}"), t.to_device(Device::Cpu)));
    }
    tensors.push((
        "rng.torch_cpu".into(),
        super::rng_state::get_state(Device::Cpu)?,
    ));
    if let Some(d) = st.cuda {
        tensors.push(("rng.torch_cuda".into(), super::rng_state::get_state(d)?));
    }
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let tmp = crate::io::temp_path(&dir.join("state.safetensors"));
    Tensor::write_safetensors(&refs, &tmp).context("writing state tensors")?;
    std::fs::rename(&tmp, dir.join("state.safetensors"))?;
    let json = serde_json::json!({
        "current_epoch": st.epoch,
        "current_step": st.global_step,
        "scheduler_steps": st.sched_steps,
        "python_random": { "state": st.py_rng.getstate().0, "index": st.py_rng.getstate().1 },
    });
    crate::io::write_bytes_atomic(&dir.join("sdlora_state.json"), json.to_string().as_bytes())?;
    crate::io::write_bytes_atomic(
        &dir.join("train_state.json"),
        train_state_json(st.epoch, st.global_step).as_bytes(),
    )?;
    Ok(())
}

/// What `--resume` restored besides the tensors it loaded in place.
struct ResumedState {
    epoch: i64,
    global_step: i64,
    scheduler_steps: i64,
    python_random: (Vec<u32>, usize),
}

/// `--resume DIR`: restores the LoRA, optimizer, scaler and RNG states written by `save_state`.
fn load_state(
    dir: &Path,
    net: &LoraNetwork,
    opt: &mut dyn Optimizer,
    scaler: &mut GradScaler,
    cuda: Option<Device>,
) -> Result<ResumedState> {
    let file = dir.join("state.safetensors");
    let json_path = dir.join("sdlora_state.json");
    if !file.is_file() || !json_path.is_file() {
        bail!(
            "--resume {}: not an sdlora state directory (expected state.safetensors and sdlora_state.json, written by --save_state)",
            dir.display()
        );
    }
    let tensors =
        Tensor::read_safetensors(&file).with_context(|| format!("reading {}", file.display()))?;
    let pick = |prefix: &str| -> Vec<(String, Tensor)> {
        tensors
            .iter()
            .filter_map(|(k, t)| {
                k.strip_prefix(prefix)
                    .map(|k| (k.to_string(), t.shallow_clone()))
            })
            .collect()
    };
    let lora = crate::lora::file::LoraFile::from_tensors(
        file.display().to_string(),
        pick("network.").into_iter().collect(),
        BTreeMap::new(),
    )?;
    net.load_file(&lora)?;
    opt.load_state_tensors(&pick("optimizer."))
        .with_context(|| format!("optimizer state in {}", file.display()))?;
    scaler.load_state_tensors(&pick("scaler."))?;
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path)?)
        .with_context(|| format!("parsing {}", json_path.display()))?;
    let int = |k: &str| -> Result<i64> {
        json[k]
            .as_i64()
            .with_context(|| format!("{}: missing integer `{k}`", json_path.display()))
    };
    let words: Vec<u32> = json["python_random"]["state"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64().map(|x| x as u32))
                .collect()
        })
        .unwrap_or_default();
    let index = json["python_random"]["index"].as_u64().unwrap_or(0) as usize;
    let rng = tensors
        .iter()
        .find(|(k, _)| k == "rng.torch_cpu")
        .map(|(_, t)| t.shallow_clone());
    let Some(rng) = rng else {
        bail!("{}: no rng.torch_cpu state", file.display())
    };
    super::rng_state::set_state(Device::Cpu, &rng)?;
    if let (Some(d), Some((_, t))) = (cuda, tensors.iter().find(|(k, _)| k == "rng.torch_cuda")) {
        super::rng_state::set_state(d, t)?;
    }
    Ok(ResumedState {
        epoch: int("current_epoch")?,
        global_step: int("current_step")?,
        scheduler_steps: int("scheduler_steps")?,
        python_random: (words, index),
    })
}

/// An unpredictable seed, like the one Python's `random` starts from (os.urandom).
fn entropy() -> i128 {
    let mut buf = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        buf[..16]
            .copy_from_slice(&(t.as_nanos() ^ ((std::process::id() as u128) << 64)).to_le_bytes());
    }
    (u128::from_le_bytes(buf) >> 1) as i128
}

fn torch_dtype(k: Kind) -> &'static str {
    match k {
        Kind::Half => "torch.float16",
        Kind::BFloat16 => "torch.bfloat16",
        _ => "torch.float32",
    }
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

/// sd-scripts' tracker names for the lr of each group (`generate_step_logs`).
fn lr_tags(groups: &[String]) -> Vec<String> {
    groups
        .iter()
        .map(|g| match g.as_str() {
            "textencoder" => "lr/textencoder".to_string(),
            "unet" => "lr/unet".to_string(),
            other => format!("lr/{}", other.replace(' ', "_")),
        })
        .collect()
}

/// Seeds for replaying the data order of epochs a resumed run skips: the real draws are
/// restored from the state, so these must not touch the global generator.
struct ThrowawaySeeds;

impl crate::data::loader::SeedSource for ThrowawaySeeds {
    fn draw_i64(&mut self) -> i64 {
        0
    }
}

/// Learning rates sd-scripts' run would stop on, refused before the dataset and the models load.
/// torch's AdamW/SGD and bitsandbytes refuse a negative `lr` ("Invalid learning rate"),
/// lion-pytorch asserts `lr > 0`; Adafactor takes any (with relative_step it ignores them). When
/// every trained part gets 0, sd-scripts drops all groups ("NO LR skipping!") and the optimizer
/// stops on an empty parameter list. A negative `--unet_lr`/`--text_encoder_lr` would train
/// backwards in sd-scripts (torch checks only the default lr); sdlora refuses it as well.
fn check_learning_rates(a: &TrainArgs, kind: OptimizerKind, o: &LoraOptions) -> Result<()> {
    let show = crate::train::args::py_float_repr;
    let named = std::iter::once(("--learning_rate", a.learning_rate))
        .chain(a.unet_lr.map(|v| ("--unet_lr", v)))
        .chain(
            a.text_encoder_lr
                .iter()
                .flatten()
                .map(|&v| ("--text_encoder_lr", v)),
        );
    for (flag, v) in named {
        if !v.is_finite() {
            bail!(
                "{flag}={}: a learning rate must be a finite number",
                show(v)
            );
        }
        if v < 0.0 && kind != OptimizerKind::Adafactor {
            bail!(
                "{flag}={}: a learning rate must not be negative (sd-scripts' optimizer refuses it: \
                 \"Invalid learning rate\"); e.g. {flag}=1e-4",
                show(v)
            );
        }
    }
    if kind == OptimizerKind::Lion && a.learning_rate <= 0.0 {
        bail!(
            "--learning_rate={}: Lion needs a learning rate > 0 (lion-pytorch asserts it), also when \
             --unet_lr/--text_encoder_lr are given",
            show(a.learning_rate)
        );
    }
    let te_lr = a.text_encoder_lr_single().unwrap_or(a.learning_rate);
    let unet_lr = a.unet_lr.unwrap_or(a.learning_rate);
    let trains_te = o.apply_text_encoder && te_lr != 0.0;
    let trains_unet = o.apply_unet && unet_lr != 0.0;
    if !trains_te && !trains_unet {
        bail!(
            "nothing to train: the learning rate of every LoRA part is 0 (--learning_rate={}{}{}); \
             sd-scripts skips such groups and then stops on an empty parameter list. Give \
             --learning_rate (e.g. 1e-4) or --unet_lr/--text_encoder_lr > 0",
            show(a.learning_rate),
            a.unet_lr
                .map(|v| format!(", --unet_lr={}", show(v)))
                .unwrap_or_default(),
            a.text_encoder_lr_single()
                .map(|v| format!(", --text_encoder_lr={}", show(v)))
                .unwrap_or_default(),
        );
    }
    Ok(())
}

/// Entry point: a parsed and verified argument set → a trained LoRA. Returns the exit code.
/// Runs `sdlora train`. `verify_warnings`: what [`TrainArgs::verify`] printed (sd-scripts logs
/// those before seeding; they matter to the Python RNG through rich's link cache, see data::log).
pub fn train(a: &TrainArgs, verify_warnings: &[String]) -> Result<i32> {
    install_signal_handlers();
    let t_start = now_unix();
    // §6.1: session id and (without --seed) the seed come from an unseeded Python RNG.
    let mut os_rng = PyRandom::new(entropy());
    let session_id = os_rng.randint(0, 1 << 32) as u64;
    let seed = match a.seed {
        Some(s) => s as u64,
        None => os_rng.randint(0, 1 << 32) as u64,
    };
    tch::manual_seed(seed as i64);

    let Some(model_path) = a.pretrained_model_name_or_path.as_deref() else {
        bail!("--pretrained_model_name_or_path is required: a Stable Diffusion .safetensors file or a Diffusers folder");
    };
    let Some(out_dir) = a.output_dir.as_deref() else {
        bail!("--output_dir is required: the folder the LoRA files are written to");
    };
    check_save_model_as(&a.save_model_as)?;
    let lora_opts = LoraOptions::from_args(
        a.network_module.as_deref(),
        a.network_dim,
        a.network_alpha_given(),
        a.network_dropout,
        a.network_args.as_deref().unwrap_or(&[]),
        a.network_train_unet_only,
        a.network_train_text_encoder_only,
    )?;
    let opt_kind = resolve_kind(&a.optimizer_type, a.use_8bit_adam, a.use_lion_optimizer)?;
    check_learning_rates(a, opt_kind, &lora_opts)?;

    let device = if tch::Cuda::is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let (precision, notice) = resolve_precision(&a.mixed_precision, device)?;
    if let Some(n) = notice {
        println!("{n}");
    }
    let weight_kind = precision.weight_kind();
    let vae_kind = if a.no_half_vae {
        Kind::Float
    } else {
        weight_kind
    };
    let autocast = precision != Precision::Fp32 && device.is_cuda();
    if autocast {
        super::amp::set_autocast_dtype(weight_kind);
    }

    // --- dataset (sd-scripts builds it right after seeding)
    let data_log = sd_scripts_console(a, verify_warnings);
    info(if a.v2 {
        "Using v2 tokenizer"
    } else {
        "Using v1 tokenizer"
    });
    let dargs = data_args(a, seed)?;
    // (an empty group is refused inside, naming the subsets that were left out)
    let mut group: DatasetGroup = build_dataset_group_with_log(&dargs, data_log, true)?;
    let tokenizer = ClipTokenizer::for_v2(a.v2);

    // --- models (§2.5): frozen weights in the weight dtype, built on the target device
    println!(
        "accelerator device: {}",
        if device.is_cuda() { "cuda" } else { "cpu" }
    );
    info("loading model for process 0/1");
    info(format!("load StableDiffusion checkpoint: {model_path}"));
    let t_load = std::time::Instant::now();
    let path = Path::new(model_path);
    let format = checkpoint_format(path);
    let mut ck = load_checkpoint(
        path,
        &LoadOptions {
            device,
            unet_dtype: weight_kind,
            text_encoder_dtype: weight_kind,
            vae_dtype: vae_kind,
            v2: Some(a.v2),
        },
    )?;
    let extra_vae = a.vae.as_deref().map(|v| checkpoint_format(Path::new(v)));
    // sd-scripts' model construction draws from the CPU generator before any weight is loaded;
    // replay those draws so LoRA init and timesteps match its runs (rng_replay.rs).
    rng_replay::replay(&InitPlan::for_sd_scripts(&BaseModels::from_checkpoint(
        &ck, format, extra_vae,
    )));
    if let Some(v) = a.vae.as_deref() {
        info(format!("load VAE: {v}"));
        let (cfg, w) = load_vae(Path::new(v), device, vae_kind)?;
        ck.vae_config = cfg;
        ck.vae = w;
    }
    let unet_blocks =
        ck.unet_config.down_block_types.len() + 1 + ck.unet_config.up_block_types.len();
    let mut unet = UNet2DConditionModel::load(&ck.unet_config, &mut ck.unet)?;
    std::mem::replace(
        &mut ck.unet,
        crate::models::weights::WeightMap::new("", device, weight_kind),
    )
    .finish()?;
    let mut text_encoder = ClipTextModel::load(&mut ck.text_encoder, &ck.clip_config)?;
    std::mem::replace(
        &mut ck.text_encoder,
        crate::models::weights::WeightMap::new("", device, weight_kind),
    )
    .finish()?;
    let vae = AutoencoderKL::load(
        &ck.vae_config,
        std::mem::replace(
            &mut ck.vae,
            crate::models::weights::WeightMap::new("", device, vae_kind),
        ),
    )?;
    info(format!(
        "models loaded in {:.1}s",
        t_load.elapsed().as_secs_f64()
    ));
    let backend = AttentionBackend::from_flags(a.mem_eff_attn, a.xformers, a.sdpa);
    unet.set_attention_backend(backend);
    if a.xformers || a.sdpa || a.mem_eff_attn {
        info(format!("Enable {backend:?} attention for U-Net"));
    }
    if a.clip_skip.is_some() {
        text_encoder.check_clip_skip(a.clip_skip)?;
    }

    // --- latent cache (§3.11), VAE posterior samples from the device generator
    if a.cache_latents {
        let enc = VaeEncoder {
            vae: &vae,
            device,
            kind: vae_kind,
        };
        cache_latents(&mut group, &enc, true)?;
    }

    // --- LoRA (§3): TE modules first, then UNet, init from the CPU generator
    println!(
        "import network module: {}",
        a.network_module.as_deref().unwrap_or("")
    );
    let network = if a.dim_from_weights {
        let Some(w) = a.network_weights.as_deref() else {
            bail!(
                "--dim_from_weights needs --network_weights (the LoRA file to take the ranks from)"
            );
        };
        let file = crate::lora::file::LoraFile::load(Path::new(w))?;
        LoraNetwork::create_from_weights(
            Some(&mut text_encoder as &mut dyn VisitLayers),
            &mut unet,
            &file,
            &lora_opts,
        )?
    } else {
        LoraNetwork::create(
            Some(&mut text_encoder as &mut dyn VisitLayers),
            &mut unet,
            &lora_opts,
        )?
    };
    for l in network.log_lines() {
        info(l);
    }
    network.to_device(device);
    if a.full_fp16 || a.full_bf16 {
        network.to_kind(weight_kind);
    }
    if let (Some(w), false) = (a.network_weights.as_deref(), a.dim_from_weights) {
        let r = network.load_weights(Path::new(w))?;
        info(format!("load network weights from {w}: {r}"));
    }
    let train_unet = !a.network_train_text_encoder_only;
    let train_te = !a.network_train_unet_only;

    // --- optimizer and scheduler (§1.5, §1.6, §8)
    println!("prepare optimizer, data loader etc.");
    let te_lr = a.text_encoder_lr_single();
    let groups: Vec<OptGroup> = network
        .param_groups(te_lr, a.unet_lr, a.learning_rate)
        .into_iter()
        .map(|g| OptGroup::new(g.name, g.params, g.lr))
        .collect();
    if groups.is_empty() {
        bail!("no parameters to train: every parameter group has learning rate 0 (check --unet_lr / --text_encoder_lr / --learning_rate)");
    }
    let all_params = network.parameters();
    let (mut opt, opt_log, opt_meta, forced_sched) = if opt_kind == OptimizerKind::AdamW8bit {
        let kw = parse_kwargs(
            a.optimizer_args.as_deref().unwrap_or(&[]),
            "--optimizer_args",
        )?;
        let (o, line) = super::optim::adamw8bit::build(&kw, groups, a.learning_rate)?;
        let args_str: Vec<String> = kw
            .iter()
            .map(|(k, v)| format!("{k}={}", v.py_str()))
            .collect();
        let meta = if args_str.is_empty() {
            o.class_name()
        } else {
            format!("{}({})", o.class_name(), args_str.join(","))
        };
        (o, line, meta, None)
    } else {
        let (o, i) = build_optimizer(
            opt_kind,
            a.optimizer_args.as_deref().unwrap_or(&[]),
            groups,
            a.learning_rate,
        )?;
        (o, i.log_line, i.metadata_name, i.forced_scheduler)
    };
    info(opt_log);

    let batches = group.len() as i64;
    let ga = a.gradient_accumulation_steps;
    let max_train_steps =
        counting::max_train_steps(a.max_train_epochs, a.max_train_steps, batches, 1, ga);
    if let Some(e) = a.max_train_epochs {
        println!("{}", counting::override_steps_line(e, max_train_steps));
    }
    let scheduler_name = forced_sched.unwrap_or_else(|| a.lr_scheduler.clone());
    let schedule = Schedule::from_args(
        &scheduler_name,
        a.lr_warmup_steps,
        max_train_steps,
        1,
        a.lr_scheduler_num_cycles,
        a.lr_scheduler_power,
        a.learning_rate,
    )?;
    let mut lr_sched = LrScheduler::new(schedule, opt.as_mut());
    let mut scaler = GradScaler::new(
        precision.uses_grad_scaler() && device.is_cuda(),
        ScalerConfig::default(),
    );

    let update_steps_per_epoch = counting::num_update_steps_per_epoch(batches, ga);
    let num_epochs = counting::num_train_epochs(max_train_steps, update_steps_per_epoch);
    let save_every_n_epochs = match a.save_n_epoch_ratio {
        Some(r) => Some(counting::save_every_n_epochs_from_ratio(num_epochs, r)),
        None => a.save_every_n_epochs,
    };

    // --- resume (§5.3)
    let cuda = if device.is_cuda() { Some(device) } else { None };
    let mut resumed = None;
    if let Some(dir) = a.resume.as_deref() {
        info(format!("resume training from local state: {dir}"));
        let st = load_state(Path::new(dir), &network, opt.as_mut(), &mut scaler, cuda)?;
        info(format!(
            "saved state: epoch {}, step {}",
            st.epoch, st.global_step
        ));
        lr_sched.set_steps(st.scheduler_steps, opt.as_mut());
        resumed = Some(st);
    }
    let steps_from_state = resumed.as_ref().map(|s| s.global_step);
    let start = counting::start_point(
        a.initial_epoch,
        a.initial_step,
        steps_from_state,
        a.skip_until_initial_step,
        a.resume.is_some(),
        max_train_steps,
        batches,
        1,
        ga,
    )?;
    for l in &start.logs {
        info(l);
    }

    // --- metadata (§5.4)
    let facts = training_facts(
        a,
        &group,
        seed,
        session_id,
        t_start,
        batches,
        num_epochs,
        max_train_steps,
        &opt_meta,
        &scheduler_name,
    )?;
    let start_meta = facts.start_metadata()?;
    let saver = Saver {
        a,
        out_dir: PathBuf::from(out_dir),
        plan: SavePlan {
            output_name: a.output_name.clone(),
            save_model_as: a.save_model_as.clone(),
            save_every_n_epochs,
            save_every_n_steps: a.save_every_n_steps,
            save_last_n_epochs: a.save_last_n_epochs,
            save_last_n_epochs_state: a.save_last_n_epochs_state,
            save_last_n_steps: a.save_last_n_steps,
            save_last_n_steps_state: a.save_last_n_steps_state,
            save_state: a.save_state,
            save_state_on_train_end: a.save_state_on_train_end,
        },
        facts,
        start_meta,
    };
    std::fs::create_dir_all(&saver.out_dir)
        .with_context(|| format!("creating --output_dir {out_dir}"))?;

    let summary = RunSummary {
        num_train_images: group.num_train_images as i64,
        num_validation_images: 0,
        num_reg_images: group.num_reg_images as i64,
        batches_per_epoch: batches,
        num_epochs,
        batch_sizes: group.datasets.iter().map(|d| d.batch_size as i64).collect(),
        gradient_accumulation_steps: ga,
        max_train_steps,
    };
    for l in running_training_lines(&summary) {
        println!("{l}");
    }
    info(format!(
        "unet dtype: {}, device: {}",
        torch_dtype(weight_kind),
        device_name(device)
    ));
    info(format!(
        "text_encoder [0] dtype: {}, device: {}",
        torch_dtype(weight_kind),
        device_name(device)
    ));

    let mut tb = match a.logging_dir.as_deref() {
        Some(dir)
            if a.log_with
                .as_deref()
                .is_none_or(|w| w == "tensorboard" || w == "all") =>
        {
            let d = run_log_dir(
                dir,
                a.log_prefix.as_deref(),
                &local_timestamp(),
                a.log_tracker_name.as_deref(),
            );
            Some(EventWriter::create(&d)?)
        }
        _ => None,
    };

    // --- the loop (§4)
    let noise_sched = NoiseScheduler::new(DdpmConfig::default(), a.zero_terminal_snr);
    let loss_cfg = LossConfig::from_args(a)?;
    sd_scripts_setup_records(
        &group.log,
        a,
        &SetupFacts {
            single_file: format == CheckpointFormat::SingleFile,
            unet_blocks,
            conv_lora: lora_opts.conv_dim.is_some(),
            train_te,
            train_unet,
            optimizer: opt_kind,
        },
    );
    let mut loader = Loader::from_args(&group);
    loader.max_train_steps = max_train_steps;
    if let Some(st) = &resumed {
        // Bring the data order to where the saved run was (its reshuffles depend only on the
        // dataset seed and the epoch), then take the Python RNG from the state.
        for e in 0..start.epoch_to_start {
            loader.plan_epoch(&group, e + 1, &mut ThrowawaySeeds)?;
        }
        loader
            .main_rng()
            .setstate(&st.python_random.0, st.python_random.1)?;
    }
    let group_names: Vec<String> = network
        .param_groups(te_lr, a.unet_lr, a.learning_rate)
        .into_iter()
        .map(|g| g.name)
        .collect();
    let tags = lr_tags(&group_names);
    let bar = StepsBar::new(start.progress_total.max(0) as u64);
    let mut recorder = LossRecorder::default();
    let mut global_step = start.global_step;
    let mut skip = start.skip_batches;
    network.set_training(true);
    let max_grad_norm = a.max_grad_norm;
    let mut interrupted = false;
    let step_models = StepModels {
        text_encoder: &text_encoder,
        unet: &unet,
        train_text_encoder: train_te,
        train_unet,
        clip_skip: a.clip_skip,
        context_kind: (a.full_fp16 || a.full_bf16).then_some(weight_kind),
        gradient_checkpointing: a.gradient_checkpointing,
        autocast,
    };
    let mut last_epoch = start.epoch_to_start;
    'epochs: for epoch in start.epoch_to_start..num_epochs {
        last_epoch = epoch;
        bar.println(&epoch_line(epoch + 1, num_epochs));
        let mut it = loader.epoch(&group, epoch + 1, &mut GlobalTorchSeeds, Some(&tokenizer))?;
        let mut step_in_epoch = 0usize;
        while let Some(batch) = it.next() {
            let batch = batch?;
            if skip > 0 {
                skip -= 1;
                step_in_epoch += 1;
                continue;
            }
            // latents (math §4.1): cached, or encoded now with a posterior sample
            let latents = match &batch.latents {
                Some(l) => l.to_device(device),
                None => {
                    let _g = tch::no_grad_guard();
                    let images = batch
                        .images
                        .as_ref()
                        .context("batch without images or latents")?;
                    let l = vae.encode_sample(&images.to_device(device).to_kind(vae_kind));
                    l.nan_to_num(0.0, None::<f64>, None::<f64>)
                }
            };
            let latents = (latents * VAE_SCALE_FACTOR).detach();
            let ids = batch
                .input_ids
                .as_ref()
                .context("batch without token ids")?
                .to_device(device);

            let mut py = || it.main_rng().random();
            let fwd = forward_loss(
                &step_models,
                &loss_cfg,
                &noise_sched,
                &latents,
                &ids,
                &batch.loss_weights,
                &mut py,
            )?;
            let loss = fwd.loss.shallow_clone();
            let loss_value = loss.double_value(&[]);
            if !loss_value.is_finite() && !scaler.enabled {
                drop(it);
                let dir = saver.out_dir.join(format!(
                    "{}-nan-state",
                    a.output_name.as_deref().unwrap_or("last")
                ));
                save_state(
                    &dir,
                    &TrainState {
                        net: &network,
                        opt: opt.as_ref(),
                        scaler: &scaler,
                        sched_steps: lr_sched.steps,
                        epoch,
                        global_step,
                        py_rng: loader.main_rng(),
                        cuda,
                    },
                )?;
                bail!(
                    "loss is {loss_value} at step {global_step}: training diverged (try a lower --learning_rate or --mixed_precision=bf16); the state before this step was saved to {}",
                    dir.display()
                );
            }
            let scaled = scaler.scale_loss(&(loss / ga as f64));
            fwd.backward(&scaled)?;
            step_in_epoch += 1;
            let sync =
                step_in_epoch.is_multiple_of(ga as usize) || step_in_epoch == batches as usize;
            if sync {
                finish_optimizer_step(
                    opt.as_mut(),
                    &mut scaler,
                    &mut lr_sched,
                    &all_params,
                    max_grad_norm,
                    1,
                )?;
                if let Some(m) = a.scale_weight_norms {
                    network.apply_max_norm_regularization(m);
                }
                bar.inc();
                global_step += 1;
                let actions = saver.plan.on_step(global_step);
                if let Some(name) = &actions.save {
                    saver.save_lora(&network, name, global_step, epoch)?;
                    if let Some(r) = &actions.remove {
                        saver.remove(r);
                    }
                }
                if let Some(dir) = &actions.save_state {
                    let py = it.main_rng().clone();
                    save_state(
                        &saver.out_dir.join(dir),
                        &TrainState {
                            net: &network,
                            opt: opt.as_ref(),
                            scaler: &scaler,
                            sched_steps: lr_sched.steps,
                            epoch,
                            global_step,
                            py_rng: &py,
                            cuda,
                        },
                    )?;
                    if let Some(r) = &actions.remove_state {
                        saver.remove(r);
                    }
                }
            }
            recorder.add(epoch, step_in_epoch - 1, loss_value);
            let avr = recorder.moving_average();
            bar.set_avr_loss(avr);
            if let Some(w) = tb.as_mut() {
                let mut logs = vec![
                    ("loss/current".to_string(), loss_value),
                    ("loss/average".to_string(), avr),
                ];
                for (g, lr) in lr_sched.lrs().iter().enumerate() {
                    logs.push((
                        tags.get(g)
                            .cloned()
                            .unwrap_or_else(|| format!("lr/group{g}")),
                        *lr,
                    ));
                }
                w.log(&logs, global_step)?;
            }
            if STOP.load(Ordering::SeqCst) {
                interrupted = true;
                break 'epochs;
            }
            if global_step >= max_train_steps {
                break;
            }
        }
        drop(it);
        if let Some(w) = tb.as_mut() {
            w.log(
                &[("loss/epoch_average".to_string(), recorder.moving_average())],
                epoch + 1,
            )?;
        }
        let actions = saver.plan.on_epoch_end(epoch + 1, num_epochs);
        if let Some(name) = &actions.save {
            saver.save_lora(&network, name, global_step, epoch + 1)?;
            if let Some(r) = &actions.remove {
                saver.remove(r);
            }
        }
        if let Some(dir) = &actions.save_state {
            save_state(
                &saver.out_dir.join(dir),
                &TrainState {
                    net: &network,
                    opt: opt.as_ref(),
                    scaler: &scaler,
                    sched_steps: lr_sched.steps,
                    epoch: epoch + 1,
                    global_step,
                    py_rng: loader.main_rng(),
                    cuda,
                },
            )?;
            if let Some(r) = &actions.remove_state {
                saver.remove(r);
            }
        }
        if global_step >= max_train_steps {
            break;
        }
    }
    bar.finish();
    if interrupted {
        let name = format!(
            "{}-interrupted-state",
            a.output_name.as_deref().unwrap_or("last")
        );
        let dir = saver.out_dir.join(&name);
        save_state(
            &dir,
            &TrainState {
                net: &network,
                opt: opt.as_ref(),
                scaler: &scaler,
                sched_steps: lr_sched.steps,
                epoch: last_epoch,
                global_step,
                py_rng: loader.main_rng(),
                cuda,
            },
        )?;
        eprintln!(
            "interrupted at step {global_step}: the training state was saved to {}; continue with the same command plus --resume={}",
            dir.display(),
            dir.display()
        );
        return Ok(130);
    }
    let final_name = saver.plan.last_ckpt_name();
    saver.save_lora(&network, &final_name, global_step, num_epochs)?;
    let end = saver.plan.on_train_end();
    if let Some(dir) = &end.save_state {
        save_state(
            &saver.out_dir.join(dir),
            &TrainState {
                net: &network,
                opt: opt.as_ref(),
                scaler: &scaler,
                sched_steps: lr_sched.steps,
                epoch: num_epochs,
                global_step,
                py_rng: loader.main_rng(),
                cuda,
            },
        )?;
    }
    info("model saved.");
    Ok(0)
}

/// The run's facts for sd-scripts' metadata (§5.4).
#[allow(clippy::too_many_arguments)]
fn training_facts(
    a: &TrainArgs,
    group: &DatasetGroup,
    seed: u64,
    session_id: u64,
    started: f64,
    batches: i64,
    num_epochs: i64,
    max_train_steps: i64,
    optimizer: &str,
    lr_scheduler: &str,
) -> Result<TrainingFacts> {
    let dataset = crate::data::metadata::dataset_facts(
        group,
        a.train_batch_size * a.gradient_accumulation_steps,
    );
    let warmup = match &a.lr_warmup_steps {
        super::args::IntOrFloat::Int(i) => MetaValue::Int(*i),
        super::args::IntOrFloat::Float(f) => MetaValue::Float(*f),
    };
    let lora_args =
        crate::lora::network::parse_network_args(a.network_args.as_deref().unwrap_or(&[]))?;
    let network_args_json = if a.network_args.is_some() {
        crate::lora::metadata::network_args_json(&lora_args, a.network_dropout, a.dim_from_weights)
    } else {
        None
    };
    let metadata_extra = [
        ("usage_hint", &a.metadata_usage_hint),
        ("thumbnail", &a.metadata_thumbnail),
        ("merged_from", &a.metadata_merged_from),
        ("trigger_phrase", &a.metadata_trigger_phrase),
        ("preprocessor", &a.metadata_preprocessor),
        ("is_negative_embedding", &a.metadata_is_negative_embedding),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.clone())))
    .collect();
    Ok(TrainingFacts {
        session_id,
        training_started_at: started,
        output_name: a.output_name.clone(),
        learning_rate: a.learning_rate,
        text_encoder_lr: a.text_encoder_lr_single(),
        unet_lr: a.unet_lr,
        num_train_images: group.num_train_images as i64,
        num_validation_images: 0,
        num_reg_images: group.num_reg_images as i64,
        num_batches_per_epoch: batches,
        num_epochs,
        gradient_checkpointing: a.gradient_checkpointing,
        gradient_accumulation_steps: a.gradient_accumulation_steps,
        max_train_steps,
        lr_warmup_steps: warmup,
        lr_scheduler: lr_scheduler.to_string(),
        network_module: a.network_module.clone().unwrap_or_default(),
        network_dim: a.network_dim,
        network_alpha: a.network_alpha_given(),
        network_dropout: a.network_dropout,
        mixed_precision: a.mixed_precision.clone(),
        full_fp16: a.full_fp16,
        v2: a.v2,
        v_parameterization: a.v_parameterization,
        clip_skip: a.clip_skip,
        max_token_length: a.max_token_length,
        cache_latents: a.cache_latents,
        seed: seed as i64,
        lowram: a.lowram,
        noise_offset: a.noise_offset,
        multires_noise_iterations: a.multires_noise_iterations,
        multires_noise_discount: a.multires_noise_discount,
        adaptive_noise_scale: a.adaptive_noise_scale,
        zero_terminal_snr: a.zero_terminal_snr,
        training_comment: a.training_comment.clone(),
        optimizer: optimizer.to_string(),
        max_grad_norm: a.max_grad_norm,
        caption_dropout_rate: a.caption_dropout_rate,
        caption_dropout_every_n_epochs: a.caption_dropout_every_n_epochs,
        caption_tag_dropout_rate: a.caption_tag_dropout_rate,
        face_crop_aug_range: a
            .face_crop_aug_range
            .clone()
            .map(MetaValue::Str)
            .unwrap_or(MetaValue::None),
        prior_loss_weight: a.prior_loss_weight,
        min_snr_gamma: a.min_snr_gamma,
        scale_weight_norms: a.scale_weight_norms,
        ip_noise_gamma: a.ip_noise_gamma,
        debiased_estimation_loss: a.debiased_estimation_loss,
        noise_offset_random_strength: a.noise_offset_random_strength,
        ip_noise_gamma_random_strength: a.ip_noise_gamma_random_strength,
        loss_type: a.loss_type.clone(),
        huber_schedule: a.huber_schedule.clone(),
        huber_scale: a.huber_scale,
        huber_c: a.huber_c,
        fp8_base: a.fp8_base,
        fp8_base_unet: a.fp8_base_unet,
        validation_seed: a.validation_seed,
        validation_split: a.validation_split,
        max_validation_steps: a.max_validation_steps,
        validate_every_n_epochs: a.validate_every_n_epochs,
        validate_every_n_steps: a.validate_every_n_steps,
        resize_interpolation: a.resize_interpolation.clone(),
        dataset,
        network_args_json,
        pretrained_model_name_or_path: a.pretrained_model_name_or_path.clone(),
        vae: a.vae.clone(),
        no_metadata: a.no_metadata,
        resolution: a.resolution_wh()?,
        min_timestep: a.min_timestep,
        max_timestep: a.max_timestep,
        metadata_title: a.metadata_title.clone(),
        metadata_author: a.metadata_author.clone(),
        metadata_description: a.metadata_description.clone(),
        metadata_license: a.metadata_license.clone(),
        metadata_tags: a.metadata_tags.clone(),
        metadata_extra,
        ..TrainingFacts::default()
    })
}
