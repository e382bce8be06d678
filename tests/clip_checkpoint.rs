//! End to end: a random SD checkpoint (scripts/make_sd_checkpoint.py, LDM single file and
//! Diffusers folder) → sdlora's checkpoint loader → ClipTextModel → sd-scripts' long-prompt
//! conditioning, against transformers' CLIPTextModel loaded from the same Diffusers folder
//! (scripts/clip_checkpoint_reference.py). SD1 (`tiny`) and SD2 layout (`tiny-v2`, OpenCLIP keys
//! with fused qkv in the single file).
use sdlora::models::clip::ClipTextModel;
use sdlora::models::loading::{load_checkpoint, LoadOptions};
use sdlora::models::text::{encode_tokens, tokenize_captions};
use sdlora::models::tokenizer::ClipTokenizer;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Tensor};

fn python() -> String {
    std::env::var("SDLORA_PYTHON")
        .unwrap_or_else(|_| "/root/.cache/sdlora/venv/bin/python".to_string())
}

fn run(args: &[&str]) {
    let out = Command::new(python())
        .args(args)
        .output()
        .expect("run python (set SDLORA_PYTHON)");
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn generate(config: &str, v2: bool) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("clip-ckpt-{config}"));
    let root = env!("CARGO_MANIFEST_DIR");
    let dir_s = dir.to_str().unwrap();
    run(&[
        &format!("{root}/scripts/make_sd_checkpoint.py"),
        "--config",
        config,
        "--seed",
        "3",
        "--out",
        dir_s,
    ]);
    let mut args = vec![
        format!("{root}/scripts/clip_checkpoint_reference.py"),
        dir_s.to_string(),
    ];
    if v2 {
        args.push("--v2".into());
    }
    run(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    dir
}

fn check(config: &str, v2: bool) {
    let _guard = tch::no_grad_guard();
    let dir = generate(config, v2);
    let r: HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("clip_ref.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("clip_ref.json")).unwrap()).unwrap();
    let caps: Vec<&str> = meta["captions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let tok = ClipTokenizer::for_v2(v2);
    let ids = tokenize_captions(&tok, &caps, Some(150), Device::Cpu).unwrap();
    assert!(ids.equal(&r["ids"]), "{config}: token windows differ");
    for source in [dir.join("model.safetensors"), dir.join("diffusers")] {
        let opts = LoadOptions {
            v2: Some(v2),
            ..Default::default()
        };
        let mut ck = load_checkpoint(&source, &opts).unwrap();
        let te = ClipTextModel::load(&mut ck.text_encoder, &ck.clip_config).unwrap();
        ck.text_encoder.finish().unwrap();
        for skip in [None, Some(2)] {
            let got = encode_tokens(&te, &ids, skip);
            let e = (&got - &r[&format!("skip{}", skip.unwrap_or(0))])
                .abs()
                .max()
                .double_value(&[]);
            println!(
                "{config} {}: clip_skip {skip:?} shape {:?} max abs err {e:.3e}",
                source.file_name().unwrap().to_string_lossy(),
                got.size()
            );
            assert!(e <= 1e-4, "{config} {source:?} clip_skip {skip:?}: {e}");
        }
    }
}

#[test]
fn sd1_layout_checkpoint_text_encoder() {
    check("tiny", false);
}

#[test]
fn sd2_layout_checkpoint_text_encoder() {
    check("tiny-v2", true);
}
