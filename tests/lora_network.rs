//! LoRA network tests: module names/shapes/scales against the sd-scripts-rules oracle
//! (scripts/lora_module_list.py over the diffusers/transformers trees), sd-scripts' RNG order,
//! save/load round trip, dtype rules, parameter groups, and clear errors on foreign files.
mod lora_common;

use lora_common::*;
use sdlora::lora::file::LoraFile;
use sdlora::lora::metadata::{network_args_json, TrainingFacts, VOLATILE_KEYS};
use sdlora::lora::{Alpha, LoraNetwork, LoraOptions};
use sdlora::models::config::{ClipTextConfig, UNetConfig};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

fn opts(conv: bool) -> LoraOptions {
    let args: Vec<String> = if conv {
        vec!["conv_dim=8".into(), "conv_alpha=2".into()]
    } else {
        vec![]
    };
    LoraOptions::from_args(Some("networks.lora"), None, None, None, &args, false, false).unwrap()
}

fn configs(case: &str) -> (ClipTextConfig, UNetConfig) {
    match case {
        "sd1" => (ClipTextConfig::sd1(), UNetConfig::sd1()),
        "sd2" => (ClipTextConfig::sd2(), UNetConfig::sd2()),
        _ => (ClipTextConfig::tiny(), UNetConfig::tiny()),
    }
}

fn network(case: &str, o: &LoraOptions) -> (Skeleton, Skeleton, LoraNetwork) {
    let (cc, uc) = configs(case);
    let mut te = Skeleton::clip(&cc);
    let mut unet = Skeleton::unet(&uc);
    let net = LoraNetwork::create(Some(&mut te), &mut unet, o).unwrap();
    (te, unet, net)
}

#[test]
fn module_lists_match_sd_scripts_rules() {
    let dir = scratch("module_lists");
    let json = dir.join("modules.json");
    let init = dir.join("init.safetensors");
    run_python(&[
        "scripts/lora_module_list.py",
        json.to_str().unwrap(),
        "--init",
        init.to_str().unwrap(),
        "--seed",
        "42",
    ]);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for case in ["sd1", "sd2", "tiny"] {
        for conv in [false, true] {
            let key = if conv {
                format!("{case}_conv")
            } else {
                case.to_string()
            };
            let exp = expected[&key].as_array().unwrap();
            let (te, unet, net) = network(case, &opts(conv));
            compare_with_oracle(&key, &net, exp);
            assert_eq!(
                te.attached() + unet.attached(),
                exp.len(),
                "{key}: attached adapters"
            );
        }
    }
    // sd-scripts' documented counts (spec §3.1): SD1 192 + 72, with conv_dim 278 UNet; SD2 TE 138.
    assert_eq!(expected["sd1"].as_array().unwrap().len(), 264);
    assert_eq!(expected["sd1_conv"].as_array().unwrap().len(), 72 + 278);
    assert_eq!(expected["sd2"].as_array().unwrap().len(), 138 + 192);

    // Initialisation: same seed, same module order → bit-identical lora_down (lora_up zero).
    tch::manual_seed(42);
    let (_, _, net) = network("tiny", &opts(true));
    let init: BTreeMap<String, Tensor> = Tensor::read_safetensors(&init)
        .unwrap()
        .into_iter()
        .collect();
    let mut n = 0;
    for m in net.all_modules() {
        let (d, u) = m.parameters();
        let e = &init[&format!("{}.lora_down.weight", m.name)];
        assert!(
            d.equal(e),
            "{}: lora_down differs from sd-scripts' init",
            m.name
        );
        assert_eq!(u.abs().max().double_value(&[]), 0.0);
        n += 1;
    }
    assert_eq!(n, init.len());
}

#[test]
fn unet_only_consumes_rng_for_text_encoder_and_saves_unet_only() {
    let mut o = opts(false);
    tch::manual_seed(7);
    let (_, _, full) = network("tiny", &o);
    o = LoraOptions::from_args(Some("networks.lora"), None, None, None, &[], true, false).unwrap();
    tch::manual_seed(7);
    let (te, unet, only) = network("tiny", &o);
    assert!(only.text_encoder_loras.is_empty());
    assert_eq!(te.attached(), 0);
    assert_eq!(unet.attached(), only.unet_loras.len());
    for (a, b) in full.unet_loras.iter().zip(only.unet_loras.iter()) {
        assert!(a.parameters().0.equal(&b.parameters().0), "{}", a.name);
    }
    assert!(only
        .state_dict()
        .iter()
        .all(|(k, _)| k.starts_with("lora_unet_")));
    let groups = only.param_groups(None, None, 1e-4);
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].name, "unet");
}

fn facts() -> TrainingFacts {
    let o = opts(true);
    TrainingFacts {
        session_id: 12345,
        training_started_at: 1_700_000_000.25,
        output_name: Some("roundtrip".into()),
        learning_rate: 1e-4,
        network_dim: None,
        seed: 42,
        network_args_json: network_args_json(&o.network_args, None, false),
        ..Default::default()
    }
}

fn read_file(p: &Path) -> LoraFile {
    LoraFile::load(p).unwrap()
}

#[test]
fn save_load_save_round_trip_is_identical() {
    let dir = scratch("roundtrip");
    tch::manual_seed(3);
    let (_, _, net) = network("tiny", &opts(true));
    randomize_up(&net);
    let f = facts();
    let start = f.start_metadata().unwrap();
    let md = f.save_metadata(&start, 10, 1, 1_700_000_100.5);
    let p1 = dir.join("a.safetensors");
    let written = net.save(&p1, None, &md).unwrap();
    assert!(written.contains_key("sshs_model_hash"));

    // --network_weights: fresh network (different init), load, save again.
    tch::manual_seed(99);
    let (_, _, net2) = network("tiny", &opts(true));
    let info = net2.load_weights(&p1).unwrap();
    assert_eq!(info.loaded_modules, net.all_modules().count());
    assert!(
        info.missing_keys.is_empty() && info.unexpected_keys.is_empty(),
        "{info}"
    );
    let md2 = f.save_metadata(&start, 10, 1, 1_700_000_200.5);
    let p2 = dir.join("b.safetensors");
    net2.save(&p2, None, &md2).unwrap();

    let (a, b) = (read_file(&p1), read_file(&p2));
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (k, t) in &a.tensors {
        let u = &b.tensors[k];
        assert_eq!(t.kind(), u.kind(), "{k}");
        assert!(t.equal(u), "{k} differs after save → load → save");
    }
    let strip = |m: &BTreeMap<String, String>| -> BTreeMap<String, String> {
        m.iter()
            .filter(|(k, _)| !VOLATILE_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    assert_eq!(strip(&a.metadata), strip(&b.metadata));
    assert_eq!(a.metadata["sshs_model_hash"], b.metadata["sshs_model_hash"]);
    // The raw data sections are byte-identical too.
    let (ra, rb) = (std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap());
    let data = |r: &[u8]| r[8 + u64::from_le_bytes(r[..8].try_into().unwrap()) as usize..].to_vec();
    assert_eq!(data(&ra), data(&rb));
    // No temp file left behind.
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(left.len(), 2);
}

#[test]
fn dtype_rules_for_weights_and_alpha() {
    let dir = scratch("dtypes");
    // --network_alpha omitted: int64 alpha; given: float32; conv_alpha: float32.
    let (_, _, net) = network("tiny", &opts(true));
    let p = dir.join("none.safetensors");
    net.save(&p, None, &BTreeMap::new()).unwrap();
    let f = read_file(&p);
    for (k, t) in &f.tensors {
        let want = if k.ends_with(".alpha") {
            if k.contains("conv1") || k.contains("conv2") || k.contains("samplers_0_conv") {
                "F32"
            } else {
                "I64"
            }
        } else {
            "F32"
        };
        assert_eq!(dtype_of(t), want, "{k}");
        if k.ends_with(".alpha") {
            assert_eq!(t.dim(), 0, "{k}: alpha must be 0-dim");
        }
    }
    let o = LoraOptions::from_args(
        Some("networks.lora"),
        Some(8),
        Some(Alpha::float(16.0)),
        None,
        &[],
        false,
        false,
    )
    .unwrap();
    let (_, _, net) = network("tiny", &o);
    assert_eq!(net.unet_loras[0].scale, 2.0);
    for (prec, want) in [
        (Kind::Half, "F16"),
        (Kind::BFloat16, "BF16"),
        (Kind::Float, "F32"),
    ] {
        let p = dir.join(format!("{want}.safetensors"));
        net.save(&p, Some(prec), &BTreeMap::new()).unwrap();
        let f = read_file(&p);
        for (k, t) in &f.tensors {
            assert_eq!(dtype_of(t), want, "{k}");
        }
        let a = &f.tensors[&format!("{}.alpha", net.unet_loras[0].name)];
        assert_eq!(a.to_kind(Kind::Double).double_value(&[]), 16.0);
    }
    // 1×1 convs (SD1 proj_in) are 4-D in the file.
    let f = read_file(&dir.join("F32.safetensors"));
    let k = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight";
    assert_eq!(f.tensors[k].size(), vec![8, 32, 1, 1]);
}

#[test]
fn dim_from_weights_takes_ranks_and_alphas_from_the_file() {
    let dir = scratch("dim_from_weights");
    let o = LoraOptions::from_args(
        Some("networks.lora"),
        Some(6),
        Some(Alpha::float(3.0)),
        None,
        &["conv_dim=2".into(), "conv_alpha=0.5".into()],
        false,
        false,
    )
    .unwrap();
    let (_, _, net) = network("tiny", &o);
    randomize_up(&net);
    let p = dir.join("w.safetensors");
    net.save(&p, None, &BTreeMap::new()).unwrap();
    let file = read_file(&p);
    let (cc, uc) = configs("tiny");
    let (mut te, mut unet) = (Skeleton::clip(&cc), Skeleton::unet(&uc));
    let net2 =
        LoraNetwork::create_from_weights(Some(&mut te), &mut unet, &file, &opts(false)).unwrap();
    let a: Vec<_> = net
        .all_modules()
        .map(|m| (m.name.clone(), m.rank, m.scale))
        .collect();
    let b: Vec<_> = net2
        .all_modules()
        .map(|m| (m.name.clone(), m.rank, m.scale))
        .collect();
    assert_eq!(a, b);
    for (x, y) in net.state_dict().iter().zip(net2.state_dict().iter()) {
        assert!(
            x.1.to_kind(Kind::Double).equal(&y.1.to_kind(Kind::Double)),
            "{}",
            x.0
        );
    }
}

#[test]
fn parameter_groups_follow_sd_scripts() {
    let (_, _, net) = network("tiny", &opts(false));
    let n_te = net.text_encoder_loras.len();
    let n_unet = net.unet_loras.len();
    let g = net.param_groups(Some(5e-5), None, 1e-4);
    assert_eq!(
        g.iter()
            .map(|g| (g.name.as_str(), g.lr))
            .collect::<Vec<_>>(),
        vec![("textencoder", 5e-5), ("unet", 1e-4)]
    );
    assert_eq!(g[0].params.len(), 2 * n_te);
    assert_eq!(g[1].params.len(), 2 * n_unet);
    // Order: per module down then up.
    let (d, u) = net.text_encoder_loras[0].parameters();
    assert_eq!(g[0].params[0].data_ptr(), d.data_ptr());
    assert_eq!(g[0].params[1].data_ptr(), u.data_ptr());
    // lr 0 drops the group ("NO LR skipping!").
    let g = net.param_groups(Some(0.0), Some(2e-4), 1e-4);
    assert_eq!(g.len(), 1);
    assert_eq!((g[0].name.as_str(), g[0].lr), ("unet", 2e-4));
    // LoRA+: ups in a "plus" group with lr × ratio.
    let o = LoraOptions::from_args(
        Some("networks.lora"),
        None,
        None,
        None,
        &["loraplus_unet_lr_ratio=16".into()],
        false,
        false,
    )
    .unwrap();
    let (_, _, net) = network("tiny", &o);
    let g = net.param_groups(None, None, 1e-4);
    let names: Vec<_> = g
        .iter()
        .map(|g| (g.name.as_str(), g.lr, g.params.len()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("textencoder", 1e-4, 2 * n_te),
            ("unet", 1e-4, n_unet),
            ("unet plus", 1e-4 * 16.0, n_unet)
        ]
    );
}

fn write_raw(p: &Path, tensors: Vec<(&str, Tensor)>) {
    let t: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(k, t)| (k.to_string(), t))
        .collect();
    let buf = sdlora::lora::file::serialize(&t, &BTreeMap::new()).unwrap();
    std::fs::write(p, buf).unwrap();
}

#[test]
fn foreign_files_and_bad_flags_give_clear_errors() {
    let dir = scratch("errors");
    let z = || Tensor::zeros([4, 8], (Kind::Float, tch::Device::Cpu));
    let base = "lora_unet_down_blocks_0_attentions_0_proj_in";
    for (role, word) in [
        ("hada_w1_a", "LoHa"),
        ("lokr_w1", "LoKr"),
        ("dora_scale", "DoRA"),
        ("foo", "unknown key"),
    ] {
        let p = dir.join(format!("{role}.safetensors"));
        write_raw(
            &p,
            vec![
                (&format!("{base}.{role}"), z()),
                (&format!("{base}.lora_down.weight"), z()),
            ],
        );
        let e = format!("{:#}", LoraFile::load(&p).unwrap_err());
        assert!(e.contains(word) && e.contains(role), "{e}");
        let e = format!("{:#}", sdlora::lora::inspect::run(&p).unwrap_err());
        assert!(e.contains(word), "{e}");
    }
    let p = dir.join("ckpt.safetensors");
    write_raw(
        &p,
        vec![("model.diffusion_model.input_blocks.0.0.weight", z())],
    );
    let e = format!("{:#}", LoraFile::load(&p).unwrap_err());
    assert!(
        e.contains("not a kohya-layout LoRA") && e.contains("checkpoint"),
        "{e}"
    );
    let p = dir.join("peft.safetensors");
    write_raw(
        &p,
        vec![("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", z())],
    );
    let e = format!("{:#}", LoraFile::load(&p).unwrap_err());
    assert!(e.contains("diffusers/PEFT"), "{e}");
    let p = dir.join("junk.safetensors");
    std::fs::write(&p, b"not a safetensors file").unwrap();
    assert!(format!("{:#}", LoraFile::load(&p).unwrap_err()).contains("not a valid safetensors"));

    let e = LoraOptions::from_args(Some("lycoris.kohya"), None, None, None, &[], false, false)
        .unwrap_err();
    assert!(e.to_string().contains("networks.lora"), "{e}");
    let e = LoraOptions::from_args(
        Some("networks.lora"),
        None,
        None,
        None,
        &["block_dims=1,2".into()],
        false,
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("block_dims"), "{e}");
    let e = LoraOptions::from_args(
        Some("networks.lora"),
        None,
        None,
        None,
        &["conv_dim".into()],
        false,
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("key=value"), "{e}");
    // A rank mismatch on --network_weights names the key.
    let (_, _, net) = network("tiny", &opts(false));
    let p = dir.join("r4.safetensors");
    net.save(&p, None, &BTreeMap::new()).unwrap();
    let o = LoraOptions::from_args(
        Some("networks.lora"),
        Some(8),
        None,
        None,
        &[],
        false,
        false,
    )
    .unwrap();
    let (_, _, net8) = network("tiny", &o);
    let e = format!("{:#}", net8.load_weights(&p).unwrap_err());
    assert!(
        e.contains("size mismatch") && e.contains("lora_down.weight"),
        "{e}"
    );
    // ckpt/pt are written as torch.save does (no metadata) and read back; other names refused.
    for ext in ["ckpt", "pt"] {
        let p = dir.join(format!("x.{ext}"));
        let meta = net.save(&p, None, &BTreeMap::new()).unwrap();
        assert!(
            meta.is_empty(),
            "sd-scripts writes no metadata or hashes into {ext}"
        );
        let back = LoraFile::load(&p).unwrap();
        let sd = net.state_dict();
        assert_eq!(back.tensors.len(), sd.len());
        for (k, t) in &sd {
            let b = &back.tensors[k];
            assert_eq!(b.kind(), t.kind(), "{k}");
            assert!(b.equal(&t.to_device(tch::Device::Cpu)), "{k}");
        }
    }
    let e = net
        .save(&dir.join("x.txt"), None, &BTreeMap::new())
        .unwrap_err();
    assert!(e.to_string().contains("safetensors"), "{e}");
}

#[test]
fn forward_adds_up_down_scale_multiplier() {
    // One Linear layer and one 3×3 conv, LoRA applied through the layer's adapter slot.
    let (_, _, net) = network("tiny", &opts(true));
    randomize_up(&net);
    net.set_training(false);
    for m in [
        &net.unet_loras[1],
        net.unet_loras
            .iter()
            .find(|m| m.name.ends_with("resnets_0_conv1"))
            .unwrap(),
    ] {
        let (d, u) = m.parameters();
        let x = if d.dim() == 2 {
            Tensor::randn([2, 3, m.in_dim], (Kind::Float, tch::Device::Cpu))
        } else {
            Tensor::randn([2, m.in_dim, 8, 8], (Kind::Float, tch::Device::Cpu))
        };
        use sdlora::models::layers::Adapter;
        net.set_multiplier(0.5);
        let got = m.delta(&x);
        // Independent formulation: merged weight delta ΔW = up·down·scale applied as one layer.
        let dw = u
            .reshape([m.out_dim, m.rank])
            .matmul(&d.reshape([m.rank, -1]))
            * m.scale
            * 0.5;
        let want = if d.dim() == 2 {
            x.linear::<&Tensor>(&dw, None)
        } else {
            x.conv2d::<&Tensor>(
                &dw.reshape([m.out_dim, m.in_dim, 3, 3]),
                None,
                [1, 1],
                [1, 1],
                [1, 1],
                1,
            )
        };
        let err = (&got - &want).abs().max().double_value(&[]);
        assert!(err < 1e-5, "{}: max |Δ| {err}", m.name);
    }
}

/// Writes LoRA files for the Python oracle test (tests/python/test_lora_diffusers.py), which runs
/// this with SDLORA_LORA_OUT set.
#[test]
#[ignore]
fn export_for_python() {
    let Ok(out) = std::env::var("SDLORA_LORA_OUT") else {
        panic!("set SDLORA_LORA_OUT");
    };
    let out = Path::new(&out);
    let args = |a: &[&str]| -> LoraOptions {
        let a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        LoraOptions::from_args(Some("networks.lora"), None, None, None, &a, false, false).unwrap()
    };
    for (name, o, prec) in [
        ("tiny", opts(false), None),
        // same rank everywhere, different alphas (diffusers' alpha_pattern path)
        ("tiny_conv", args(&["conv_dim=4", "conv_alpha=2"]), None),
        // conv rank ≠ linear rank (sd-scripts' usual C3Lier setting)
        ("tiny_conv_mixed", opts(true), None),
        ("tiny_fp16", opts(false), Some(Kind::Half)),
    ] {
        tch::manual_seed(11);
        let (_, _, net) = network("tiny", &o);
        randomize_up(&net);
        let f = facts();
        let md = f.save_metadata(&f.start_metadata().unwrap(), 10, 1, 1_700_000_100.5);
        net.save(&out.join(format!("{name}.safetensors")), prec, &md)
            .unwrap();
    }
    // A >1 MiB file so sshs_legacy_hash covers real data: SD1 at rank 4, float32.
    tch::manual_seed(12);
    let (_, _, net) = network("sd1", &opts(false));
    randomize_up(&net);
    let f = facts();
    let md = f.save_metadata(&f.start_metadata().unwrap(), 10, 1, 1_700_000_100.5);
    net.save(&out.join("sd1.safetensors"), None, &md).unwrap();
    // and with no metadata at all: the hashes then see an empty "__metadata__" map, as in Python
    net.save(&out.join("sd1_nometa.safetensors"), None, &BTreeMap::new())
        .unwrap();
    // --scale_weight_norms: a network with large ups, before and after the regularization.
    tch::manual_seed(13);
    let (_, _, net) = network("tiny", &opts(true));
    for m in net.all_modules() {
        let (_, mut u) = m.parameters();
        tch::no_grad(|| {
            let r = Tensor::randn_like(&u) * 3.0;
            u.copy_(&r);
        });
    }
    net.save(
        &out.join("maxnorm_before.safetensors"),
        None,
        &BTreeMap::new(),
    )
    .unwrap();
    let (scaled, mean, max) = net.apply_max_norm_regularization(1.0);
    net.save(
        &out.join("maxnorm_after.safetensors"),
        None,
        &BTreeMap::new(),
    )
    .unwrap();
    std::fs::write(
        out.join("maxnorm.json"),
        serde_json::to_string(&(scaled, mean, max)).unwrap(),
    )
    .unwrap();
    // Dropout RNG: one Linear module in training mode, 4 forwards after manual_seed(21).
    let o = LoraOptions::from_args(
        Some("networks.lora"),
        None,
        None,
        Some(0.1),
        &["rank_dropout=0.25".into(), "module_dropout=0.3".into()],
        false,
        false,
    )
    .unwrap();
    let (_, _, net) = network("tiny", &o);
    randomize_up(&net);
    let m = &net.unet_loras[1];
    let x = Tensor::randn([2, 5, m.in_dim], (Kind::Float, tch::Device::Cpu));
    let (d, u) = m.parameters();
    let mut t: Vec<(String, Tensor)> = vec![
        ("x".into(), x.shallow_clone()),
        ("down".into(), d.detach()),
        ("up".into(), u.detach()),
        ("scale".into(), Tensor::from(m.scale)),
    ];
    tch::manual_seed(21);
    use sdlora::models::layers::Adapter;
    for i in 0..4 {
        t.push((format!("out{i}"), tch::no_grad(|| m.delta(&x))));
    }
    let buf = sdlora::lora::file::serialize(&t, &BTreeMap::new()).unwrap();
    std::fs::write(out.join("dropout.safetensors"), buf).unwrap();
    // Python float repr check: values of every magnitude, the Python side compares str(x).
    let mut floats = vec![
        0.0,
        1.0,
        16.0,
        1e-4,
        1e-5,
        2e-6,
        1e16,
        1.5e16,
        1e-300,
        0.3,
        1_700_000_000.25,
    ];
    let r = Tensor::randn([200], (Kind::Double, tch::Device::Cpu));
    for i in 0..200 {
        let e = (i as f64 / 10.0) - 10.0;
        floats.push(r.double_value(&[i]) * 10f64.powf(e));
    }
    let pairs: Vec<(u64, String)> = floats
        .iter()
        .map(|x| (x.to_bits(), sdlora::lora::metadata::py_float(*x)))
        .collect();
    std::fs::write(
        out.join("floats.json"),
        serde_json::to_string(&pairs).unwrap(),
    )
    .unwrap();
    std::fs::write(
        out.join("inspect.txt"),
        sdlora::lora::inspect::report(&LoraFile::load(&out.join("tiny_conv.safetensors")).unwrap()),
    )
    .unwrap();
}

#[test]
fn gradients_reach_the_parameter_handles() {
    // The optimizer holds the handles from parameters()/param_groups(); backward through the
    // adapter must fill exactly their .grad().
    let (_, _, net) = network("tiny", &opts(true));
    randomize_up(&net);
    use sdlora::models::layers::Adapter;
    for m in [
        &net.unet_loras[0],
        net.unet_loras
            .iter()
            .find(|m| m.name.ends_with("resnets_0_conv1"))
            .unwrap(),
    ] {
        let (d, u) = m.parameters();
        let x = if d.dim() == 2 {
            Tensor::randn([2, 3, m.in_dim], (Kind::Float, tch::Device::Cpu))
        } else {
            Tensor::randn([2, m.in_dim, 8, 8], (Kind::Float, tch::Device::Cpu))
        };
        m.delta(&x).square().sum(Kind::Float).backward();
        // Same loss through detached copies of the weights.
        let d2 = d.detach().copy().set_requires_grad(true);
        let u2 = u.detach().copy().set_requires_grad(true);
        let y = if d.dim() == 2 {
            x.linear::<&Tensor>(&d2, None).linear::<&Tensor>(&u2, None)
        } else {
            x.conv2d::<&Tensor>(&d2, None, [1, 1], [1, 1], [1, 1], 1)
                .conv2d::<&Tensor>(&u2, None, [1, 1], [0, 0], [1, 1], 1)
        };
        (y * m.scale).square().sum(Kind::Float).backward();
        for (a, b) in [(&d, &d2), (&u, &u2)] {
            let (ga, gb) = (a.grad(), b.grad());
            let err = ((&ga - &gb).abs().max() / gb.abs().max()).double_value(&[]);
            assert!(err < 1e-5, "{}: grad rel err {err}", m.name);
        }
    }
}
