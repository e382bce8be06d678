//! End to end: a seeded tiny Stable Diffusion (SD1 and SD2 layouts) written by
//! `scripts/make_sd_checkpoint.py` in both forms is loaded by `load_checkpoint` into sdlora's UNet,
//! CLIP text encoder and VAE; their outputs must equal diffusers/transformers on the Diffusers
//! folder (`scripts/make_checkpoint_outputs.py`), fp32 on CPU.
use sdlora::models::clip::ClipTextModel;
use sdlora::models::loading::{load_checkpoint, LoadOptions};
use sdlora::models::unet::UNet2DConditionModel;
use sdlora::models::vae::AutoencoderKL;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Tensor;

const TOL: f64 = 1e-4;

fn python() -> String {
    std::env::var("SDLORA_PYTHON")
        .unwrap_or_else(|_| "/root/.cache/sdlora/venv/bin/python".to_string())
}

fn run(script: &str, args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes the checkpoint (both forms) and diffusers' reference outputs for `config`.
fn fixture(config: &str) -> (PathBuf, BTreeMap<String, Tensor>) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("e2e-{config}"));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    run(
        "make_sd_checkpoint.py",
        &["--config", config, "--seed", "3", "--out", d],
    );
    let outputs = dir.join("outputs.safetensors");
    run(
        "make_checkpoint_outputs.py",
        &[
            "--model",
            &format!("{d}/diffusers"),
            "--out",
            outputs.to_str().unwrap(),
        ],
    );
    let r = Tensor::read_safetensors(&outputs)
        .unwrap()
        .into_iter()
        .collect();
    (dir, r)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn check(config: &str) {
    let (dir, r) = fixture(config);
    let _guard = tch::no_grad_guard();
    for path in [dir.join("model.safetensors"), dir.join("diffusers")] {
        let what = format!("{config} {}", path.file_name().unwrap().to_string_lossy());
        let mut ck = load_checkpoint(&path, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));

        let te = ClipTextModel::load(&mut ck.text_encoder, &ck.clip_config).unwrap();
        let unet = UNet2DConditionModel::load(&ck.unet_config, &mut ck.unet).unwrap();
        let vae = AutoencoderKL::load(&ck.vae_config, ck.vae).unwrap();
        ck.text_encoder.finish().unwrap();
        ck.unet.finish().unwrap();

        let ids = &r["input_ids"];
        let e_clip = max_abs(&te.forward(ids, None), &r["clip_last"]);
        let e_skip = max_abs(&te.forward(ids, Some(2)), &r["clip_skip2"]);
        let out = unet.forward(&r["sample"], &r["timesteps"], &r["clip_last"]);
        let e_unet = max_abs(&out, &r["unet_out"]);
        let (mean, logvar) = vae.encode(&r["image"]);
        let e_mean = max_abs(&mean, &r["vae_mean"]);
        let e_logvar = max_abs(&logvar, &r["vae_logvar"]);
        let e_dec = max_abs(&vae.decode(&r["vae_mean"]), &r["vae_decoded"]);
        println!(
            "{what}: max abs err CLIP {e_clip:.2e}, CLIP skip2 {e_skip:.2e}, UNet {e_unet:.2e}, \
             VAE mean {e_mean:.2e}, logvar {e_logvar:.2e}, decoded {e_dec:.2e}"
        );
        for (name, e) in [
            ("CLIP", e_clip),
            ("CLIP skip2", e_skip),
            ("UNet", e_unet),
            ("VAE mean", e_mean),
            ("VAE logvar", e_logvar),
            ("VAE decoded", e_dec),
        ] {
            assert!(e <= TOL, "{what}: {name} max abs err {e} > {TOL}");
        }
    }
}

#[test]
fn tiny_sd1_checkpoint_runs_like_diffusers() {
    check("tiny");
}

/// The single file goes through sd-scripts' SD2 rule (1×1-conv projections, no upcast); the
/// outputs must still equal diffusers' Linear-projection model.
#[test]
fn tiny_sd2_checkpoint_runs_like_diffusers() {
    check("tiny-v2");
}
