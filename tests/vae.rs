//! AutoencoderKL parity with diffusers (fp32, CPU): `scripts/make_vae_fixtures.py` builds a seeded
//! random VAE, saves it with `save_pretrained` and records diffusers' encode/sample/decode outputs.
//! The full-size SD VAE at 64×64 runs with SDLORA_FULL=1.
use sdlora::models::config::VaeConfig;
use sdlora::models::vae::AutoencoderKL;
use sdlora::models::weights::WeightMap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

fn python() -> String {
    std::env::var("SDLORA_PYTHON")
        .unwrap_or_else(|_| "/root/.cache/sdlora/venv/bin/python".to_string())
}

fn generate(config: &str, args: &[&str]) -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("vae-{config}"));
    let _ = std::fs::remove_dir_all(&out);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make_vae_fixtures.py");
    let st = Command::new(python())
        .arg(script)
        .args(["--config", config, "--out"])
        .arg(&out)
        .args(args)
        .output()
        .expect("run make_vae_fixtures.py");
    assert!(
        st.status.success(),
        "make_vae_fixtures.py failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    out
}

fn read(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn weights(dir: &Path, replace: &[(&str, &Tensor)]) -> (VaeConfig, WeightMap) {
    let cfg_path = dir.join("vae/config.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let cfg = VaeConfig::from_diffusers_json(&json, &cfg_path.display().to_string()).unwrap();
    let file = dir.join("vae/diffusion_pytorch_model.safetensors");
    let mut w = WeightMap::new(file.display().to_string(), Device::Cpu, Kind::Float);
    for (k, t) in read(&file) {
        w.insert(k, t);
    }
    for (k, t) in replace {
        w.insert(k.to_string(), t.shallow_clone());
    }
    (cfg, w)
}

fn max_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn check(config: &str, args: &[&str], expect_cfg: VaeConfig) {
    let dir = generate(config, args);
    let fx = read(&dir.join("fixture.safetensors"));
    let (cfg, w) = weights(&dir, &[]);
    assert_eq!(cfg, expect_cfg);
    let vae = AutoencoderKL::load(&cfg, w).unwrap();
    let _guard = tch::no_grad_guard();

    let (mean, logvar) = vae.encode(&fx["x"]);
    let e_mean = max_err(&mean, &fx["mean"]);
    let e_logvar = max_err(&logvar, &fx["logvar"]);
    tch::manual_seed(fx["sample_seed"].int64_value(&[]));
    let sample = vae.sample(&mean, &logvar);
    let e_sample = max_err(&sample, &fx["sample"]);
    let decoded = vae.decode(&fx["z"]);
    let e_dec = max_err(&decoded, &fx["decoded"]);
    println!(
        "{config}: max abs err mean {e_mean:.2e}, logvar {e_logvar:.2e}, sample {e_sample:.2e}, \
         decoded {e_dec:.2e} (|decoded| max {:.2})",
        fx["decoded"].abs().max().double_value(&[])
    );
    assert!(e_mean <= TOL, "mean err {e_mean}");
    assert!(e_logvar <= TOL, "logvar err {e_logvar}");
    assert!(e_sample <= TOL, "sample err {e_sample}");
    assert!(e_dec <= TOL, "decoded err {e_dec}");

    // Pushed-out logvar biases: both clamp ends.
    let (cfg, w) = weights(&dir, &[("quant_conv.bias", &fx["clamp.quant_conv.bias"])]);
    let vae = AutoencoderKL::load(&cfg, w).unwrap();
    let (mean, logvar) = vae.encode(&fx["x"]);
    assert_eq!(logvar.max().double_value(&[]), 20.0);
    assert_eq!(logvar.min().double_value(&[]), -30.0);
    assert!(max_err(&mean, &fx["clamp.mean"]) <= TOL);
    assert!(max_err(&logvar, &fx["clamp.logvar"]) <= TOL);
}

#[test]
fn tiny_vae_matches_diffusers() {
    check("tiny", &["--size", "32", "--batch", "2"], VaeConfig::tiny());
}

#[test]
fn missing_and_misshaped_vae_weights_are_named() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vae-shapes");
    let _ = std::fs::remove_dir_all(&dir);
    // Weights of the right names and shapes for the tiny config, made up here: only the loader's
    // bookkeeping is under test.
    let cfg = VaeConfig::tiny();
    let shapes = sdlora::models::loading::vae_shapes(&cfg);
    let full = || {
        let mut w = WeightMap::new("made-up.safetensors", Device::Cpu, Kind::Float);
        for (k, s) in &shapes {
            w.insert(
                k.clone(),
                Tensor::zeros(s.as_slice(), (Kind::Float, Device::Cpu)),
            );
        }
        w
    };
    assert!(AutoencoderKL::load(&cfg, full()).is_ok());

    let mut w = full();
    let _ = w.take("decoder.mid_block.attentions.0.to_k.bias").unwrap();
    let e = format!("{:#}", AutoencoderKL::load(&cfg, w).unwrap_err());
    assert!(
        e.contains("made-up.safetensors") && e.contains("decoder.mid_block.attentions.0.to_k.bias"),
        "{e}"
    );

    let mut w = full();
    w.insert(
        "encoder.conv_in.weight",
        Tensor::zeros([32, 3, 1, 1], (Kind::Float, Device::Cpu)),
    );
    let e = format!("{:#}", AutoencoderKL::load(&cfg, w).unwrap_err());
    assert!(
        e.contains("encoder.conv_in.weight") && e.contains("[32, 3, 1, 1]"),
        "{e}"
    );

    let mut w = full();
    w.insert(
        "encoder.extra.weight",
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    );
    let e = format!("{:#}", AutoencoderKL::load(&cfg, w).unwrap_err());
    assert!(
        e.contains("unexpected") && e.contains("encoder.extra.weight"),
        "{e}"
    );
}

#[test]
fn from_diffusers_json_rejects_unsupported_vaes() {
    let j = serde_json::json!({"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"], "act_fn": "gelu"});
    let e = format!(
        "{:#}",
        VaeConfig::from_diffusers_json(&j, "x/config.json").unwrap_err()
    );
    assert!(e.contains("x/config.json") && e.contains("act_fn"), "{e}");
    let j = serde_json::json!({"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"]});
    let e = format!(
        "{:#}",
        VaeConfig::from_diffusers_json(&j, "x/config.json").unwrap_err()
    );
    assert!(e.contains("down_block_types"), "{e}");
    let j = serde_json::json!({});
    assert_eq!(
        VaeConfig::from_diffusers_json(&j, "x").unwrap(),
        VaeConfig::sd()
    );
}

/// Full-size SD VAE at 64×64 (SDLORA_FULL=1; ~1 GB).
#[test]
fn full_size_vae_matches_diffusers() {
    if std::env::var("SDLORA_FULL").map_or(true, |v| v != "1") {
        eprintln!("skipped: set SDLORA_FULL=1");
        return;
    }
    check("sd", &["--size", "64", "--batch", "1"], VaeConfig::sd());
}
