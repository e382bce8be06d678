//! Checkpoint loading against the Diffusers state dicts: `scripts/make_sd_checkpoint.py` writes a
//! seeded random model both as a Diffusers folder (diffusers/transformers `save_pretrained`) and
//! as an LDM single file; both must load to exactly the Diffusers tensors and configs.
//! Full-size SD1.5/SD2.1 cases run with SDLORA_FULL=1 (under `flock /tmp/sdlora-bigmem.lock`).
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use sdlora::models::config::{ClipActivation, ClipTextConfig, SdVersion, UNetConfig, VaeConfig};
use sdlora::models::loading::{load_checkpoint, load_vae, LoadOptions, LoadedCheckpoint};
use sdlora::models::weights::WeightMap;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use tch::{Kind, Tensor};

/// The tiny fixture: base fp32 forms, a pickle, and the fp16+EMA / old-CLIP-key variants.
const TINY_ARGS: &[&str] = &["--ckpt", "--verify", "--test-variants"];

fn python() -> String {
    std::env::var("SDLORA_PYTHON")
        .unwrap_or_else(|_| "/root/.cache/sdlora/venv/bin/python".to_string())
}

fn full() -> bool {
    std::env::var("SDLORA_FULL").is_ok_and(|v| v == "1")
}

fn fixtures_root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("loading")
}

/// Generates (once per test process) `make_sd_checkpoint.py --config CONFIG ARGS` into a folder.
fn generated(name: &str, config: &str, args: &[&str]) -> PathBuf {
    static DONE: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let done = DONE.get_or_init(|| Mutex::new(HashMap::new()));
    // One generator at a time: the full-size ones need several GB.
    let mut done = done.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = done.get(name) {
        return p.clone();
    }
    let out = fixtures_root().join(name);
    let _ = std::fs::remove_dir_all(&out);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make_sd_checkpoint.py");
    let st = Command::new(python())
        .arg(script)
        .args(["--config", config, "--seed", "0", "--out"])
        .arg(&out)
        .args(args)
        .output()
        .expect("run make_sd_checkpoint.py");
    assert!(
        st.status.success(),
        "make_sd_checkpoint.py failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    done.insert(name.to_string(), out.clone());
    out
}

/// The Diffusers state dict of one component, read with tch's own safetensors reader.
fn reference(dir: &Path, stem: &str) -> BTreeMap<String, Tensor> {
    let mut p = dir.join(format!("{stem}.safetensors"));
    if !p.exists() {
        p = dir.join(format!("{stem}.fp16.safetensors"));
    }
    Tensor::read_safetensors(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .into_iter()
        .filter(|(k, _)| !k.ends_with("position_ids"))
        .collect()
}

/// Every tensor of `map` equals the Diffusers tensor of the same name (same key set); `conv_proj`
/// expects 2-D `proj_in`/`proj_out` weights as 1×1 convs.
fn assert_same(what: &str, map: &WeightMap, want: &BTreeMap<String, Tensor>, conv_proj: bool) {
    let got: Vec<&String> = map.keys().collect();
    let want_keys: Vec<&String> = want.keys().collect();
    assert_eq!(got, want_keys, "{what}: key sets differ");
    for (k, w) in want {
        let g = map.get(k).unwrap();
        let w = if conv_proj && (k.contains(".proj_in.weight") || k.contains(".proj_out.weight")) {
            w.unsqueeze(-1).unsqueeze(-1)
        } else {
            w.shallow_clone()
        };
        assert_eq!(g.size(), w.size(), "{what}: shape of {k}");
        assert_eq!(g.kind(), map.kind, "{what}: dtype of {k}");
        assert!(
            g.equal(&w.to_kind(g.kind())),
            "{what}: values of {k} differ"
        );
    }
}

fn assert_matches_diffusers(ck: &LoadedCheckpoint, dir: &Path, conv_proj: bool) {
    let d = dir.join("diffusers");
    assert_same(
        "unet",
        &ck.unet,
        &reference(&d.join("unet"), "diffusion_pytorch_model"),
        conv_proj,
    );
    assert_same(
        "text_encoder",
        &ck.text_encoder,
        &reference(&d.join("text_encoder"), "model"),
        false,
    );
    assert_same(
        "vae",
        &ck.vae,
        &reference(&d.join("vae"), "diffusion_pytorch_model"),
        false,
    );
}

fn load(path: &Path) -> LoadedCheckpoint {
    load_checkpoint(path, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("loading {}: {e:#}", path.display()))
}

fn load_err(path: &Path, opts: &LoadOptions) -> String {
    match load_checkpoint(path, opts) {
        Ok(_) => panic!("{} loaded but should not have", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn tiny_v2_clip() -> ClipTextConfig {
    ClipTextConfig {
        hidden_act: ClipActivation::Gelu,
        ..ClipTextConfig::tiny()
    }
}

#[test]
fn tiny_single_file_equals_diffusers() {
    let dir = generated("tiny", "tiny", TINY_ARGS);
    let ck = load(&dir.join("model.safetensors"));
    assert_eq!(ck.version, SdVersion::V1);
    assert_eq!(ck.unet_config, UNetConfig::tiny());
    assert_eq!(ck.clip_config, ClipTextConfig::tiny());
    assert_eq!(ck.vae_config, VaeConfig::tiny());
    assert_matches_diffusers(&ck, &dir, false);
}

#[test]
fn tiny_diffusers_folder_equals_diffusers() {
    let dir = generated("tiny", "tiny", TINY_ARGS);
    let ck = load(&dir.join("diffusers"));
    assert_eq!(ck.version, SdVersion::V1);
    assert_eq!(ck.unet_config, UNetConfig::tiny());
    assert_eq!(ck.clip_config, ClipTextConfig::tiny());
    assert_eq!(ck.vae_config, VaeConfig::tiny());
    assert_matches_diffusers(&ck, &dir, false);
}

#[test]
fn tiny_fp16_with_ema_and_dtypes() {
    let dir = generated("tiny", "tiny", TINY_ARGS).join("fp16_ema");
    // fp16 file, kept fp16 for the UNet, converted to fp32 / bf16 for the others.
    let opts = LoadOptions {
        unet_dtype: Kind::Half,
        text_encoder_dtype: Kind::Float,
        vae_dtype: Kind::BFloat16,
        ..LoadOptions::default()
    };
    let ck = load_checkpoint(&dir.join("model.safetensors"), &opts).unwrap();
    assert_eq!(ck.unet_config, UNetConfig::tiny());
    assert_eq!(ck.unet.kind, Kind::Half);
    // EMA weights differ from the model's: equality proves the non-EMA ones were used.
    assert_matches_diffusers(&ck, &dir, false);
    // Diffusers fp16 variant folder.
    let ck = load_checkpoint(&dir.join("diffusers"), &opts).unwrap();
    assert_matches_diffusers(&ck, &dir, false);
}

#[test]
fn tiny_old_clip_keys_without_text_model_level() {
    let reference_dir = generated("tiny", "tiny", TINY_ARGS);
    let dir = reference_dir.join("old_clip_keys");
    let ck = load(&dir.join("model.safetensors"));
    assert_eq!(ck.clip_config, ClipTextConfig::tiny());
    assert_matches_diffusers(&ck, &reference_dir, false);
}

#[test]
fn tiny_v2_single_file_builds_conv_projections() {
    let dir = generated("tiny-v2", "tiny-v2", &["--verify"]);
    let ck = load(&dir.join("model.safetensors"));
    assert_eq!(ck.version, SdVersion::V2);
    // sd-scripts' single-file SD2 path: 1×1-conv proj_in/out, no upcast (spec §1.4).
    assert_eq!(
        ck.unet_config,
        UNetConfig {
            use_linear_projection: false,
            upcast_attention: false,
            ..UNetConfig::tiny()
        }
    );
    assert_eq!(ck.clip_config, tiny_v2_clip());
    assert_eq!(ck.vae_config, VaeConfig::tiny());
    assert_matches_diffusers(&ck, &dir, true);
    let w = ck
        .unet
        .get("down_blocks.0.attentions.0.proj_in.weight")
        .unwrap();
    assert_eq!(w.size(), [32, 32, 1, 1]);
}

#[test]
fn tiny_v2_diffusers_folder_keeps_linear_projections() {
    let dir = generated("tiny-v2", "tiny-v2", &["--verify"]);
    let ck = load(&dir.join("diffusers"));
    assert_eq!(ck.version, SdVersion::V2);
    assert_eq!(
        ck.unet_config,
        UNetConfig {
            use_linear_projection: true,
            upcast_attention: true,
            ..UNetConfig::tiny()
        }
    );
    assert_eq!(ck.clip_config, tiny_v2_clip());
    assert_matches_diffusers(&ck, &dir, false);
}

#[test]
fn v2_flag_must_match_the_checkpoint() {
    let dir = generated("tiny", "tiny", TINY_ARGS);
    let opts = LoadOptions {
        v2: Some(true),
        ..LoadOptions::default()
    };
    let e = load_err(&dir.join("model.safetensors"), &opts);
    assert!(e.contains("--v2 was given") && e.contains("1.x"), "{e}");
    let dir2 = generated("tiny-v2", "tiny-v2", &["--verify"]);
    let opts = LoadOptions {
        v2: Some(false),
        ..LoadOptions::default()
    };
    let e = load_err(&dir2.join("model.safetensors"), &opts);
    assert!(e.contains("pass --v2"), "{e}");
}

#[test]
fn ckpt_pickle_loads_like_the_safetensors_file() {
    let dir = generated("tiny", "tiny", TINY_ARGS);
    let a = load_checkpoint(&dir.join("model.safetensors"), &LoadOptions::default()).unwrap();
    let b = load_checkpoint(&dir.join("model.ckpt"), &LoadOptions::default()).unwrap();
    for (x, y) in [
        (&a.unet, &b.unet),
        (&a.text_encoder, &b.text_encoder),
        (&a.vae, &b.vae),
    ] {
        assert_eq!(x.len(), y.len());
        for k in x.keys() {
            assert!(x.get(k).unwrap().equal(y.get(k).unwrap()), "{k}");
        }
    }
    // Same file under a .safetensors name: recognised by its content.
    let renamed = fixtures_root().join("pickle-named.safetensors");
    std::fs::copy(dir.join("model.ckpt"), &renamed).unwrap();
    assert!(load_checkpoint(&renamed, &LoadOptions::default()).is_ok());
}

/// Rewrites the tiny single file with `edit` applied to its (name, tensor bytes) list, keeping
/// the header metadata.
fn rewrite(
    name: &str,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> PathBuf {
    let dir = generated("tiny", "tiny", TINY_ARGS);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut items: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut items);
    let views: Vec<(String, TensorView)> = items
        .iter()
        .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let out = fixtures_root().join(name);
    safetensors::serialize_to_file(views, meta.metadata(), &out).unwrap();
    out
}

#[test]
fn misshaped_missing_and_unknown_keys_are_named() {
    let key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight";
    let p = rewrite("misshaped.safetensors", |items| {
        let it = items.iter_mut().find(|(k, ..)| k == key).unwrap();
        it.2 = vec![64, 32];
        it.3.truncate(64 * 32 * 4);
    });
    let e = load_err(&p, &LoadOptions::default());
    assert!(e.contains("misshaped.safetensors"), "{e}");
    assert!(
        e.contains("mis-shaped: `mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight` is [64, 32], expected [64, 64]"),
        "{e}"
    );

    let p = rewrite("missing.safetensors", |items| {
        items.retain(|(k, ..)| k != "first_stage_model.decoder.up.0.block.1.conv2.bias")
    });
    let e = load_err(&p, &LoadOptions::default());
    assert!(
        e.contains("VAE")
            && e.contains("1 missing key(s): `decoder.up_blocks.1.resnets.1.conv2.bias`"),
        "{e}"
    );

    let p = rewrite("unknown.safetensors", |items| {
        let extra = items[0].clone();
        items.push((
            "model.diffusion_model.input_blocks.1.0.bogus.weight".into(),
            extra.1,
            extra.2,
            extra.3,
        ));
    });
    let e = load_err(&p, &LoadOptions::default());
    assert!(
        e.contains("not part of")
            && e.contains("`model.diffusion_model.input_blocks.1.0.bogus.weight`"),
        "{e}"
    );

    // Without the head-count metadata a tiny file cannot be interpreted (CLIP width 32 < 64).
    let dir = generated("tiny", "tiny", TINY_ARGS);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let out = fixtures_root().join("nometa.safetensors");
    safetensors::serialize_to_file(st.tensors(), &None, &out).unwrap();
    let e = load_err(&out, &LoadOptions::default());
    assert!(
        e.contains("cannot infer the text encoder attention head count"),
        "{e}"
    );
}

#[test]
fn truncated_sdxl_and_lora_files_are_refused() {
    let dir = generated("tiny", "tiny", TINY_ARGS);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let p = fixtures_root().join("truncated.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&p, &LoadOptions::default());
    assert!(
        e.contains("truncated.safetensors") && e.contains("not a valid .safetensors"),
        "{e}"
    );

    let z = Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu));
    let p = fixtures_root().join("sdxl.safetensors");
    Tensor::write_safetensors(
        &[
            ("model.diffusion_model.label_emb.0.0.weight", &z),
            ("model.diffusion_model.input_blocks.0.0.weight", &z),
            (
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                &z,
            ),
        ],
        &p,
    )
    .unwrap();
    let e = load_err(&p, &LoadOptions::default());
    assert!(e.contains("SDXL") && e.contains("sdxl.safetensors"), "{e}");

    let p = fixtures_root().join("lora.safetensors");
    Tensor::write_safetensors(
        &[(
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
            &z,
        )],
        &p,
    )
    .unwrap();
    let e = load_err(&p, &LoadOptions::default());
    assert!(
        e.contains("not a Stable Diffusion checkpoint") && e.contains("LoRA"),
        "{e}"
    );

    let e = load_err(
        &fixtures_root().join("does-not-exist"),
        &LoadOptions::default(),
    );
    assert!(
        e.contains("does-not-exist") && e.contains("no such file"),
        "{e}"
    );
}

#[test]
fn vae_override_sources() {
    let dir = generated("tiny", "tiny", TINY_ARGS);
    let want = reference(&dir.join("diffusers/vae"), "diffusion_pytorch_model");
    let cpu = tch::Device::Cpu;
    // VAE-only LDM file (like vae-ft-mse-840000): no prefix, plus keys that are not the model.
    let vae_only = rewrite("vae-only.safetensors", |items| {
        items.retain(|(k, ..)| k.starts_with("first_stage_model."));
        for it in items.iter_mut() {
            it.0 = it.0["first_stage_model.".len()..].to_string();
        }
        let extra = items[0].clone();
        items.push((
            "loss.logvar".into(),
            extra.1,
            extra.2.clone(),
            extra.3.clone(),
        ));
        items.push(("model_ema.decay".into(), extra.1, extra.2, extra.3));
    });
    for p in [
        dir.join("model.safetensors"),
        dir.join("diffusers"),
        dir.join("diffusers/vae"),
        dir.join("diffusers/vae/diffusion_pytorch_model.safetensors"),
        vae_only,
    ] {
        let (cfg, map) =
            load_vae(&p, cpu, Kind::Float).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
        assert_eq!(cfg, VaeConfig::tiny(), "{}", p.display());
        assert_same(&p.display().to_string(), &map, &want, false);
    }
    let unet_file = dir.join("diffusers/unet/diffusion_pytorch_model.safetensors");
    let e = match load_vae(&unet_file, cpu, Kind::Float) {
        Ok(_) => panic!("a UNet file loaded as a VAE"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("no VAE weights"), "{e}");
}

/// (user, system) CPU seconds of this process so far.
fn cpu_secs() -> (f64, f64) {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    (s(ru.ru_utime), s(ru.ru_stime))
}

fn vm_hwm_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Full-size SD1.5 / SD2.1: both forms equal the Diffusers tensors, configs are exactly
/// `sd1()` / `sd2()` (with the single-file SD2 rule).
#[test]
fn full_size_sd15_and_sd21() {
    if !full() {
        eprintln!("skipped: set SDLORA_FULL=1 (and run under flock /tmp/sdlora-bigmem.lock)");
        return;
    }
    let dir = generated("sd15", "sd15", &["--fp16", "--ema"]);
    let half = LoadOptions {
        unet_dtype: Kind::Half,
        text_encoder_dtype: Kind::Half,
        vae_dtype: Kind::Half,
        ..LoadOptions::default()
    };
    for p in [dir.join("model.safetensors"), dir.join("diffusers")] {
        let ck = load_checkpoint(&p, &half).unwrap();
        assert_eq!(ck.version, SdVersion::V1);
        assert_eq!(ck.unet_config, UNetConfig::sd1());
        assert_eq!(ck.clip_config, ClipTextConfig::sd1());
        assert_eq!(ck.vae_config, VaeConfig::sd());
        assert_eq!(ck.unet.len(), 686);
        assert_eq!(ck.text_encoder.len(), 196);
        assert_matches_diffusers(&ck, &dir, false);
    }
    let dir = generated("sd21", "sd21", &["--fp16"]);
    let ck = load_checkpoint(&dir.join("model.safetensors"), &half).unwrap();
    assert_eq!(ck.version, SdVersion::V2);
    assert_eq!(
        ck.unet_config,
        UNetConfig {
            use_linear_projection: false,
            ..UNetConfig::sd2()
        }
    );
    assert_eq!(ck.clip_config, ClipTextConfig::sd2());
    assert_matches_diffusers(&ck, &dir, true);
    let ck = load_checkpoint(&dir.join("diffusers"), &half).unwrap();
    assert_eq!(
        ck.unet_config,
        UNetConfig {
            upcast_attention: true,
            ..UNetConfig::sd2()
        }
    );
    assert_eq!(ck.clip_config, ClipTextConfig::sd2());
    assert_matches_diffusers(&ck, &dir, false);
}

/// Load time and peak RSS for a full-size fp16 SD1.5 single file, in a fresh process so VmHWM is
/// this load's alone: `SDLORA_FULL=1 cargo test --release --test loading -- --ignored
/// --nocapture load_time_and_peak_rss` (after the sd15 fixture exists, or with
/// SDLORA_SD15_FILE=path).
#[test]
#[ignore]
fn load_time_and_peak_rss() {
    let path = match std::env::var("SDLORA_SD15_FILE") {
        Ok(p) => PathBuf::from(p),
        Err(_) => fixtures_root().join("sd15/model.safetensors"),
    };
    let size = std::fs::metadata(&path).unwrap().len();
    let before = vm_hwm_kib();
    let cpu0 = cpu_secs();
    let t = std::time::Instant::now();
    let half = LoadOptions {
        unet_dtype: Kind::Half,
        text_encoder_dtype: Kind::Half,
        vae_dtype: Kind::Half,
        ..LoadOptions::default()
    };
    let ck = load_checkpoint(&path, &half).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let cpu1 = cpu_secs();
    let hwm = vm_hwm_kib();
    println!(
        "loaded {} ({:.2} GB) in {secs:.2} s wall, {:.2} s user + {:.2} s sys CPU; VmHWM {:.2} GB (before load {:.2} GB) = {:.2}× file size; {} + {} + {} tensors",
        path.display(),
        size as f64 / 1e9,
        cpu1.0 - cpu0.0,
        cpu1.1 - cpu0.1,
        hwm as f64 * 1024.0 / 1e9,
        before as f64 * 1024.0 / 1e9,
        hwm as f64 * 1024.0 / size as f64,
        ck.unet.len(),
        ck.text_encoder.len(),
        ck.vae.len()
    );
}
