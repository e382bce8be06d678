//! The LoRA network on the real models: module list from the UNet/CLIP visitors (full SD1/SD2
//! trees, uninitialised tensors, no RSS) against the sd-scripts-rules oracle, and the forward
//! with the LoRA applied against diffusers' forward with the same file loaded (tiny config).
mod lora_common;

use lora_common::*;
use sdlora::lora::{LoraNetwork, LoraOptions};
use sdlora::models::clip::ClipTextModel;
use sdlora::models::config::{ClipTextConfig, UNetConfig};
use sdlora::models::unet::UNet2DConditionModel;
use sdlora::models::weights::WeightMap;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn weight_map(source: &str, tensors: HashMap<String, Tensor>) -> WeightMap {
    let mut w = WeightMap::new(source, Device::Cpu, Kind::Float);
    for (k, t) in tensors {
        w.insert(k, t);
    }
    w
}

/// Uninitialised tensors with diffusers' keys and shapes (never touched, so no memory).
fn empty(dir: &Path, file: &str) -> WeightMap {
    let shapes: HashMap<String, Vec<i64>> =
        serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
    weight_map(
        file,
        shapes
            .into_iter()
            .map(|(k, s)| (k, Tensor::empty(s.as_slice(), (Kind::Float, Device::Cpu))))
            .collect(),
    )
}

fn unet_config(dir: &Path, case: &str) -> UNetConfig {
    let text = std::fs::read_to_string(dir.join(format!("{case}.unet_config.json"))).unwrap();
    UNetConfig::from_diffusers_json(&serde_json::from_str(&text).unwrap()).unwrap()
}

fn opts(args: &[&str]) -> LoraOptions {
    let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    LoraOptions::from_args(Some("networks.lora"), None, None, None, &a, false, false).unwrap()
}

#[test]
fn real_models_give_sd_scripts_module_lists() {
    let dir = scratch("real_module_lists");
    let json = dir.join("modules.json");
    run_python(&[
        "scripts/lora_module_list.py",
        json.to_str().unwrap(),
        "--shapes",
        dir.to_str().unwrap(),
    ]);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for (case, clip_cfg) in [
        ("sd1", ClipTextConfig::sd1()),
        ("sd2", ClipTextConfig::sd2()),
        ("tiny", ClipTextConfig::tiny()),
    ] {
        for conv in [false, true] {
            let key = if conv {
                format!("{case}_conv")
            } else {
                case.to_string()
            };
            let mut w = empty(&dir, &format!("{case}.unet.json"));
            let mut unet = UNet2DConditionModel::load(&unet_config(&dir, case), &mut w).unwrap();
            let mut w = empty(&dir, &format!("{case}.te.json"));
            let mut te = ClipTextModel::load(&mut w, &clip_cfg).unwrap();
            let o = if conv {
                opts(&["conv_dim=8", "conv_alpha=2"])
            } else {
                opts(&[])
            };
            let net = LoraNetwork::create(Some(&mut te), &mut unet, &o).unwrap();
            compare_with_oracle(&key, &net, expected[&key].as_array().unwrap());
        }
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn forward_with_lora_matches_diffusers() {
    let dir = scratch("lora_forward");
    // Our LoRA: tiny, conv targets included (uniform rank, see the diffusers mixed-rank quirk),
    // random lora_up so the deltas are not zero.
    let clip_cfg = ClipTextConfig::tiny();
    let o = opts(&["conv_dim=4", "conv_alpha=2"]);
    let lora = dir.join("lora.safetensors");
    {
        let mut te = Skeleton::clip(&clip_cfg);
        let mut unet = Skeleton::unet(&UNetConfig::tiny());
        tch::manual_seed(5);
        let net = LoraNetwork::create(Some(&mut te), &mut unet, &o).unwrap();
        randomize_up(&net);
        net.save(&lora, None, &Default::default()).unwrap();
    }
    run_python(&[
        "scripts/lora_forward_fixture.py",
        dir.to_str().unwrap(),
        lora.to_str().unwrap(),
    ]);
    let io = read(&dir.join("io.safetensors"));
    let ucfg = UNetConfig::from_diffusers_json(
        &serde_json::from_str(&std::fs::read_to_string(dir.join("unet_config.json")).unwrap())
            .unwrap(),
    )
    .unwrap();
    let mut w = weight_map("unet.safetensors", read(&dir.join("unet.safetensors")));
    let mut unet = UNet2DConditionModel::load(&ucfg, &mut w).unwrap();
    w.finish().unwrap();
    let mut w = weight_map("te.safetensors", read(&dir.join("te.safetensors")));
    let mut te = ClipTextModel::load(&mut w, &clip_cfg).unwrap();
    w.finish().unwrap();

    let run = |unet: &UNet2DConditionModel, te: &ClipTextModel| {
        tch::no_grad(|| {
            (
                unet.forward(&io["sample"], &io["timesteps"], &io["context"]),
                te.forward(&io["input_ids"], None),
            )
        })
    };
    let (u0, t0) = run(&unet, &te);
    let base = (max_abs(&u0, &io["unet_base"]), max_abs(&t0, &io["te_base"]));

    let net = LoraNetwork::create(Some(&mut te), &mut unet, &o).unwrap();
    let info = net.load_weights(&lora).unwrap();
    assert!(
        info.missing_keys.is_empty() && info.unexpected_keys.is_empty(),
        "{info}"
    );
    net.set_training(false);
    let (u1, t1) = run(&unet, &te);
    let lora_err = (max_abs(&u1, &io["unet_lora"]), max_abs(&t1, &io["te_lora"]));
    let effect = (
        max_abs(&io["unet_lora"], &io["unet_base"]),
        max_abs(&io["te_lora"], &io["te_base"]),
    );
    eprintln!(
        "max |ours - diffusers|: base UNet {:.2e} TE {:.2e}; with LoRA UNet {:.2e} TE {:.2e} (LoRA effect UNet {:.3} TE {:.3})",
        base.0, base.1, lora_err.0, lora_err.1, effect.0, effect.1
    );
    assert!(
        effect.0 > 1e-2 && effect.1 > 1e-2,
        "the LoRA must change the outputs: {effect:?}"
    );
    assert!(
        lora_err.0 <= 1e-4,
        "UNet with LoRA: max abs error {}",
        lora_err.0
    );
    assert!(
        lora_err.1 <= 1e-4,
        "text encoder with LoRA: max abs error {}",
        lora_err.1
    );
}
