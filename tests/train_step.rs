//! One training step with a LoRA against a PyTorch reference step (scripts/train_step_reference.py:
//! diffusers UNet + transformers CLIP with the same weights, sd-scripts' LoRAModule forward and
//! process_batch math, same seeds): the loss and the gradient of every lora_down / lora_up,
//! ≤ 1e-5 relative, for epsilon and v-prediction, with and without --min_snr_gamma and
//! --noise_offset, with and without --gradient_checkpointing. The step runs through
//! `sdlora::train::step::forward_loss`, the function the training loop calls.
mod lora_common;

use lora_common::*;
use sdlora::lora::{LoraNetwork, LoraOptions};
use sdlora::models::clip::ClipTextModel;
use sdlora::models::config::{ClipTextConfig, UNetConfig};
use sdlora::models::unet::UNet2DConditionModel;
use sdlora::models::weights::WeightMap;
use sdlora::train::args::{parse_train_args, ArgsOutcome};
use sdlora::train::noise::{DdpmConfig, LossConfig, NoiseScheduler};
use sdlora::train::step::{forward_loss, StepModels};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn weights(dir: &Path, file: &str) -> WeightMap {
    let mut w = WeightMap::new(file, Device::Cpu, Kind::Float);
    for (k, t) in read(&dir.join(file)) {
        w.insert(k, t);
    }
    w
}

/// The case's flags as a user would type them, through the real argument parser.
fn loss_config(case: &Value) -> LossConfig {
    let mut argv = vec![
        "--pretrained_model_name_or_path=x".to_string(),
        "--network_module=networks.lora".to_string(),
    ];
    for (flag, key) in [
        ("--min_snr_gamma", "min_snr_gamma"),
        ("--noise_offset", "noise_offset"),
        ("--min_timestep", "min_timestep"),
        ("--max_timestep", "max_timestep"),
    ] {
        if let Some(v) = case.get(key) {
            argv.push(format!("{flag}={v}"));
        }
    }
    if case.get("v_parameterization").is_some() {
        argv.push("--v2".into());
        argv.push("--v_parameterization".into());
    }
    match parse_train_args(&argv).unwrap() {
        ArgsOutcome::Run(a, _) => LossConfig::from_args(&a).unwrap(),
        _ => panic!("not a training run: {argv:?}"),
    }
}

/// ‖a − b‖ / ‖b‖
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-30)
}

#[test]
fn lora_step_matches_pytorch_reference() {
    let dir = scratch("train_step_reference");
    let o =
        LoraOptions::from_args(Some("networks.lora"), None, None, None, &[], false, false).unwrap();
    let lora = dir.join("lora.safetensors");
    {
        // random lora_up so every lora_down gets a gradient
        let mut te = Skeleton::clip(&ClipTextConfig::tiny());
        let mut unet = Skeleton::unet(&UNetConfig::tiny());
        tch::manual_seed(7);
        let net = LoraNetwork::create(Some(&mut te), &mut unet, &o).unwrap();
        randomize_up(&net);
        net.save(&lora, None, &Default::default()).unwrap();
    }
    run_python(&[
        "scripts/train_step_reference.py",
        dir.to_str().unwrap(),
        lora.to_str().unwrap(),
    ]);
    let ucfg = UNetConfig::from_diffusers_json(
        &serde_json::from_str(&std::fs::read_to_string(dir.join("unet_config.json")).unwrap())
            .unwrap(),
    )
    .unwrap();
    let mut w = weights(&dir, "unet.safetensors");
    let mut unet = UNet2DConditionModel::load(&ucfg, &mut w).unwrap();
    w.finish().unwrap();
    let mut w = weights(&dir, "te.safetensors");
    let mut te = ClipTextModel::load(&mut w, &ClipTextConfig::tiny()).unwrap();
    w.finish().unwrap();
    let net = LoraNetwork::create(Some(&mut te), &mut unet, &o).unwrap();
    let info = net.load_weights(&lora).unwrap();
    assert!(info.missing_keys.is_empty() && info.unexpected_keys.is_empty());
    net.set_training(true);

    let inputs = read(&dir.join("inputs.safetensors"));
    let grads = read(&dir.join("grads.safetensors"));
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let sched = NoiseScheduler::new(DdpmConfig::default(), false);
    let params = net.state_dict();
    let mut worst = (0f64, 0f64);
    for checkpointing in [false, true] {
        let models = StepModels {
            text_encoder: &te,
            unet: &unet,
            train_text_encoder: true,
            train_unet: true,
            clip_skip: None,
            context_kind: None,
            gradient_checkpointing: checkpointing,
            autocast: false,
        };
        for case in &cases {
            let name = case["name"].as_str().unwrap();
            let cfg = loss_config(case);
            let lw: Vec<f32> = case
                .get("loss_weights")
                .map(|v| {
                    v.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                        .collect()
                })
                .unwrap_or(vec![1.0, 1.0]);
            for (_, p) in &params {
                let mut p = p.shallow_clone();
                p.zero_grad();
            }
            tch::manual_seed(case["seed"].as_i64().unwrap());
            let mut py = || -> f64 { panic!("{name}: no Python random draw expected") };
            let fwd = forward_loss(
                &models,
                &cfg,
                &sched,
                &inputs["latents"],
                &inputs["input_ids"],
                &Tensor::from_slice(&lw),
                &mut py,
            )
            .unwrap();
            let loss = fwd.loss.double_value(&[]);
            let want = case["loss"].as_f64().unwrap();
            let e_loss = (loss - want).abs() / want.abs();
            let loss_t = fwd.loss.shallow_clone();
            fwd.backward(&loss_t).unwrap();
            let (mut num, mut den, mut e_max, mut worst_key) = (0f64, 0f64, 0f64, String::new());
            for (k, p) in &params {
                if k.ends_with(".alpha") {
                    continue;
                }
                let want = &grads[&format!("{name}/{k}")];
                let got = p.grad();
                assert!(got.defined(), "{name}: {k} has no gradient");
                let d = (&got - want).norm().double_value(&[]);
                num += d * d;
                den += want.norm().double_value(&[]).powi(2);
                let e = rel(&got, want);
                if e > e_max {
                    (e_max, worst_key) = (e, k.clone());
                }
            }
            let e_all = num.sqrt() / den.sqrt();
            println!(
                "{name} (checkpointing {checkpointing}): loss {loss:.7} vs {want:.7} (rel {e_loss:.1e}); \
                 LoRA gradients rel {e_all:.1e} overall, worst tensor {e_max:.1e} ({worst_key})"
            );
            assert!(e_loss <= 1e-5, "{name}: loss {loss} vs {want}");
            assert!(
                e_all <= 1e-5,
                "{name}: LoRA gradients differ by {e_all:e} overall (worst {worst_key}: {e_max:e})"
            );
            worst = (worst.0.max(e_loss), worst.1.max(e_all));
        }
    }
    println!(
        "worst: loss {:.1e}, LoRA gradients {:.1e} (relative)",
        worst.0, worst.1
    );
}
