//! AdamW8bit against the CUDA-semantics reference of bitsandbytes' AdamW8bit
//! (../shared/ref/adamw8bit_ref.{py,safetensors}, spec: ../shared/spec/adamw8bit.md), plus a
//! 300-step regression against libtorch's 32-bit AdamW and save/restore continuation.
use sdlora::train::optim::adamw8bit::{
    build, dequantize_blockwise, dynamic_map, quantize_blockwise, AdamW8bit, AdamW8bitConfig,
    CodeMaps,
};
use sdlora::train::optim::common::{Optimizer, ParamGroup};
use sdlora::train::optim::optimizer_args::parse_kwargs;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

fn shared_ref() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/ref");
    assert!(
        p.join("adamw8bit_ref.safetensors").is_file() && p.join("adamw8bit_ref.py").is_file(),
        "AdamW8bit reference missing: expected adamw8bit_ref.safetensors and adamw8bit_ref.py in {} \
         (the shared/ folder beside the repository clone)",
        p.display()
    );
    p
}

fn load(path: &std::path::Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn get<'a>(m: &'a HashMap<String, Tensor>, k: &str) -> &'a Tensor {
    m.get(k)
        .unwrap_or_else(|| panic!("reference tensor '{k}' missing"))
}

fn python() -> String {
    std::env::var("SDLORA_PYTHON")
        .unwrap_or_else(|_| "/root/.cache/sdlora/venv/bin/python".to_string())
}

/// Makes `g` the gradient of leaf `p` (a first backward defines the grad tensor).
fn set_grad(p: &Tensor, g: &Tensor) {
    if !p.grad().defined() {
        p.sum(p.kind()).backward();
    }
    let mut grad = p.grad();
    tch::no_grad(|| grad.copy_(g));
}

fn leaf(t: &Tensor) -> Tensor {
    t.copy().set_requires_grad(true)
}

/// Bit equality, NaN-safe, with a message saying how many elements differ and the worst one.
fn assert_bits_eq(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    assert_eq!(got.kind(), want.kind(), "{what}: kind");
    let g = got.to_kind(Kind::Double).view([-1]);
    let w = want.to_kind(Kind::Double).view([-1]);
    let same = g
        .eq_tensor(&w)
        .logical_or(&g.isnan().logical_and(&w.isnan()));
    let bad = same.logical_not().sum(Kind::Int64).int64_value(&[]);
    if bad > 0 {
        let i = same.logical_not().nonzero().int64_value(&[0, 0]);
        panic!(
            "{what}: {bad} of {} elements differ; first at {i}: got {} want {}",
            g.numel(),
            g.double_value(&[i]),
            w.double_value(&[i])
        );
    }
}

fn max_rel(got: &Tensor, want: &Tensor) -> f64 {
    let g = got.to_kind(Kind::Double);
    let w = want.to_kind(Kind::Double);
    ((&g - &w).abs() / w.abs().clamp_min(1e-30))
        .max()
        .double_value(&[])
}

#[test]
fn code_maps_and_standalone_quantizer_match_reference() {
    let r = load(&shared_ref().join("adamw8bit_ref.safetensors"));
    assert_bits_eq(&dynamic_map(true), get(&r, "code_signed"), "signed map");
    assert_bits_eq(
        &dynamic_map(false),
        get(&r, "code_unsigned"),
        "unsigned map",
    );
    let maps = CodeMaps::new(Device::Cpu);
    let (q, absmax) = quantize_blockwise(get(&r, "quant_input"), &maps, true, 256);
    assert_bits_eq(&q, get(&r, "quant_ref_codes"), "quantize_blockwise codes");
    assert_bits_eq(
        &absmax,
        get(&r, "quant_ref_absmax"),
        "quantize_blockwise absmax",
    );
    let deq = dequantize_blockwise(&q, &absmax, &maps.signed, 256);
    assert_bits_eq(&deq, get(&r, "quant_ref_dequant"), "dequantize_blockwise");
}

/// Runs `steps` updates of one parameter and checks every step against `expect(t, field)`.
#[allow(clippy::too_many_arguments)]
fn run_case(
    name: &str,
    p0: &Tensor,
    grads: &Tensor,
    lrs: &[f64],
    cfg: AdamW8bitConfig,
    expect: &dyn Fn(usize, &str) -> Option<Tensor>,
    p_bit_exact: bool,
    report: &mut Vec<String>,
) {
    // CPU fast paths and the general path (the one CUDA runs) on the same data
    for general in [false, true] {
        let name = &format!("{name}{}", if general { " (general path)" } else { "" });
        let p = leaf(p0);
        let mut opt = AdamW8bit::from_tensors(vec![p.shallow_clone()], cfg.clone()).unwrap();
        opt.force_general_path(general);
        for (t, &lr) in lrs.iter().enumerate() {
            opt.set_lr(0, lr);
            set_grad(&p, &grads.get(t as i64));
            opt.step().unwrap();
            let st: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
            let step = t + 1;
            let want_p = expect(step, "p").unwrap();
            let rel = max_rel(&p.detach(), &want_p);
            assert!(
                rel <= 1e-6,
                "{name} step {step}: parameter max relative error {rel:e} > 1e-6"
            );
            let ulps = p
                .detach()
                .ne_tensor(&want_p)
                .sum(Kind::Int64)
                .int64_value(&[]);
            if p_bit_exact {
                assert_bits_eq(&p.detach(), &want_p, &format!("{name} step {step} p"));
            }
            for f in ["state1", "state2", "absmax1", "absmax2"] {
                match expect(step, f) {
                    Some(w) => assert_bits_eq(
                        get(&st, &format!("state.0.{f}")),
                        &w,
                        &format!("{name} step {step} {f}"),
                    ),
                    None => assert!(
                        !st.contains_key(&format!("state.0.{f}")),
                        "{name}: unexpected {f}"
                    ),
                }
            }
            assert_eq!(get(&st, "state.0.step").int64_value(&[0]), step as i64);
            report.push(format!(
                "{name} step {step}: p max rel err {rel:.3e}, {ulps} of {} elements differ; \
             codes and absmax bit-exact",
                p.numel()
            ));
        }
    }
}

#[test]
fn matches_reference_vectors() {
    let r = load(&shared_ref().join("adamw8bit_ref.safetensors"));
    let p0 = get(&r, "adam_p0");
    let grads = get(&r, "adam_grads");
    let mut report = Vec::new();
    for (tag, kind, n) in [
        ("float32", Kind::Float, 5000i64),
        ("bfloat16", Kind::BFloat16, 5000),
        ("float32", Kind::Float, 1000),
    ] {
        let name = format!("ref_{tag}_n{n}");
        let expect = |t: usize, f: &str| r.get(&format!("{name}_step{t}_{f}")).map(|x| x.copy());
        run_case(
            &name,
            &p0.narrow(0, 0, n).to_kind(kind),
            &grads.narrow(1, 0, n).to_kind(kind),
            &[1e-3; 3],
            AdamW8bitConfig::default(),
            &expect,
            false,
            &mut report,
        );
    }
    // The spec's spot values (§6) as a readable anchor of the same data.
    let s1 = get(&r, "ref_float32_n5000_step1_state1").narrow(0, 0, 8);
    assert_eq!(
        Vec::<u8>::try_from(&s1).unwrap(),
        vec![75, 209, 44, 60, 208, 53, 204, 200]
    );
    println!("{}", report.join("\n"));
}

#[test]
fn matches_reference_on_edge_cases() {
    // NaN/Inf grads, all-zero blocks, sign fix, tail padding, lr schedule, dtypes: generated by
    // scripts/adamw8bit_vectors.py with the shared reference implementation.
    let dir = std::env::temp_dir().join(format!("sdlora-adamw8bit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("vectors.safetensors");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/adamw8bit_vectors.py");
    let st = std::process::Command::new(python())
        .arg(&script)
        .arg(&out)
        .arg("--ref-dir")
        .arg(shared_ref())
        .status()
        .unwrap_or_else(|e| panic!("running {} with {}: {e}", script.display(), python()));
    assert!(st.success(), "{} failed", script.display());
    let r = load(&out);
    let _ = std::fs::remove_dir_all(&dir);
    let mut cases: Vec<&str> = r.keys().filter_map(|k| k.strip_suffix(".p0")).collect();
    cases.sort();
    assert!(cases.len() >= 13, "cases: {cases:?}");
    let mut report = Vec::new();
    for name in cases {
        let hp = Vec::<f64>::try_from(get(&r, &format!("{name}.hp"))).unwrap();
        let lrs = Vec::<f64>::try_from(get(&r, &format!("{name}.lr"))).unwrap();
        let cfg = AdamW8bitConfig {
            lr: lrs[0],
            betas: (hp[0], hp[1]),
            eps: hp[2],
            weight_decay: hp[3],
            min_8bit_size: hp[4] as i64,
        };
        let expect = |t: usize, f: &str| r.get(&format!("{name}.step{t}.{f}")).map(|x| x.copy());
        run_case(
            name,
            get(&r, &format!("{name}.p0")),
            get(&r, &format!("{name}.grads")),
            &lrs,
            cfg,
            &expect,
            true,
            &mut report,
        );
    }
    println!("{}", report.join("\n"));
}

/// Linear least squares y = X W* + b* + noise with a 8192-element weight (8-bit states) and a
/// 64-element bias (32-bit fallback); 300 full-batch steps.
fn regression_run(use_8bit: bool) -> Vec<f64> {
    tch::manual_seed(7);
    let x = Tensor::randn([512, 128], (Kind::Float, Device::Cpu));
    let w_true = Tensor::randn([128, 64], (Kind::Float, Device::Cpu)) * 0.3;
    let b_true = Tensor::randn([64], (Kind::Float, Device::Cpu));
    let y =
        x.matmul(&w_true) + &b_true + Tensor::randn([512, 64], (Kind::Float, Device::Cpu)) * 0.1;
    let w = leaf(&(Tensor::randn([128, 64], (Kind::Float, Device::Cpu)) * 0.05));
    let b = leaf(&Tensor::zeros([64], (Kind::Float, Device::Cpu)));
    let lr = 1e-2;
    let cfg = AdamW8bitConfig {
        lr,
        ..Default::default()
    };
    let mut opt8 =
        AdamW8bit::from_tensors(vec![w.shallow_clone(), b.shallow_clone()], cfg).unwrap();
    // torch.optim.AdamW (libtorch's C++ implementation) with the same hyper-parameters.
    let mut opt32 = tch::COptimizer::adamw(lr, 0.9, 0.999, 1e-2, 1e-8, false).unwrap();
    opt32.add_parameters(&w, 0).unwrap();
    opt32.add_parameters(&b, 0).unwrap();
    let mut losses = Vec::new();
    for _ in 0..300 {
        let loss = (x.matmul(&w) + &b - &y).square().mean(Kind::Float);
        losses.push(loss.double_value(&[]));
        if use_8bit {
            opt8.zero_grad();
            loss.backward();
            opt8.step().unwrap();
        } else {
            opt32.zero_grad().unwrap();
            loss.backward();
            opt32.step().unwrap();
        }
    }
    let loss = (x.matmul(&w) + &b - &y).square().mean(Kind::Float);
    losses.push(loss.double_value(&[]));
    if use_8bit {
        let (bytes, params) = opt8.state_bytes();
        println!(
            "state bytes {bytes} for {params} parameters: {:.4} B/param (w: 8-bit, b: 32-bit)",
            bytes as f64 / params as f64
        );
    }
    losses
}

#[test]
fn regression_300_steps_tracks_32bit_adamw() {
    let l8 = regression_run(true);
    let l32 = regression_run(false);
    for i in [0usize, 10, 50, 100, 200, 300] {
        println!("step {i:3}: loss 8-bit {:.6}  32-bit {:.6}", l8[i], l32[i]);
    }
    let (f8, f32_) = (l8[300], l32[300]);
    let rel = (f8 - f32_).abs() / f32_;
    println!("final loss 8-bit {f8:.6} 32-bit {f32_:.6} relative difference {rel:.4}");
    assert!(
        f8 < 0.05 * l8[0],
        "8-bit AdamW did not train: {} -> {f8}",
        l8[0]
    );
    assert!(
        rel < 0.02,
        "final loss differs by {:.2}% (> 2%)",
        rel * 100.0
    );
}

#[test]
fn save_and_resume_continue_identically() {
    tch::manual_seed(3);
    let shapes: [&[i64]; 3] = [&[40, 130], &[700], &[5000]];
    let p0: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)))
        .collect();
    let grads: Vec<Vec<Tensor>> = (0..6)
        .map(|_| {
            shapes
                .iter()
                .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)) * 0.01)
                .collect()
        })
        .collect();
    let make = |ps: &[Tensor]| {
        let groups = vec![
            ParamGroup::new("textencoder", vec![ps[0].shallow_clone()], 5e-4),
            ParamGroup::new(
                "unet",
                vec![ps[1].shallow_clone(), ps[2].shallow_clone()],
                1e-3,
            ),
        ];
        AdamW8bit::new(groups, AdamW8bitConfig::default()).unwrap()
    };
    let run = |opt: &mut AdamW8bit, ps: &[Tensor], steps: std::ops::Range<usize>| {
        for t in steps {
            opt.set_lr(1, 1e-3 * (1.0 + t as f64));
            for (p, g) in ps.iter().zip(&grads[t]) {
                set_grad(p, g);
            }
            opt.step().unwrap();
        }
    };
    // uninterrupted
    let ps: Vec<Tensor> = p0.iter().map(leaf).collect();
    let mut opt = make(&ps);
    run(&mut opt, &ps, 0..6);
    // interrupted after 3 steps, state through a safetensors file
    let ps2: Vec<Tensor> = p0.iter().map(leaf).collect();
    let mut opt2 = make(&ps2);
    run(&mut opt2, &ps2, 0..3);
    let path = std::env::temp_dir().join(format!(
        "sdlora-adamw8bit-state-{}.safetensors",
        std::process::id()
    ));
    Tensor::write_safetensors(&opt2.state_tensors(), &path).unwrap();
    let saved_p: Vec<Tensor> = ps2.iter().map(|p| p.detach().copy()).collect();
    drop(opt2);
    let ps3: Vec<Tensor> = saved_p.iter().map(leaf).collect();
    let mut opt3 = make(&ps3);
    opt3.load_state_tensors(&Tensor::read_safetensors(&path).unwrap())
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(opt3.step_count(), 3);
    run(&mut opt3, &ps3, 3..6);
    assert_eq!(opt3.step_count(), 6);
    for (a, b) in ps.iter().zip(&ps3) {
        assert_bits_eq(&b.detach(), &a.detach(), "resumed parameter");
    }
    let sa: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    let sb: HashMap<String, Tensor> = opt3.state_tensors().into_iter().collect();
    assert_eq!(sa.len(), sb.len());
    for (k, v) in &sa {
        assert_bits_eq(get(&sb, k), v, k);
    }
    // bnb layout: 8-bit codes with the parameter's shape, absmax per 256 elements.
    assert_eq!(get(&sa, "state.0.state1").size(), vec![40, 130]);
    assert_eq!(get(&sa, "state.0.state1").kind(), Kind::Uint8);
    assert_eq!(get(&sa, "state.0.absmax2").size(), vec![21]);
    assert_eq!(get(&sa, "state.1.state1").kind(), Kind::Float);

    // A state from another network is refused with the key named.
    let mut bad = opt.state_tensors();
    bad.push(("state.3.step".into(), Tensor::from_slice(&[1i64])));
    let e = make(&ps).load_state_tensors(&bad).unwrap_err();
    assert!(format!("{e:#}").contains("state.3.step"), "{e:#}");
    let mut bad = opt.state_tensors();
    for (k, t) in bad.iter_mut() {
        if k == "state.2.absmax1" {
            *t = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        }
    }
    let e = make(&ps).load_state_tensors(&bad).unwrap_err();
    assert!(format!("{e:#}").contains("state.2.absmax1"), "{e:#}");
}

#[test]
fn state_memory_is_about_2_03_bytes_per_parameter() {
    let p = leaf(&Tensor::randn([1 << 20], (Kind::Float, Device::Cpu)));
    let mut opt =
        AdamW8bit::from_tensors(vec![p.shallow_clone()], AdamW8bitConfig::default()).unwrap();
    set_grad(&p, &Tensor::randn([1 << 20], (Kind::Float, Device::Cpu)));
    opt.step().unwrap();
    let (bytes, params) = opt.state_bytes();
    let per = bytes as f64 / params as f64;
    println!("1M-parameter tensor: {bytes} state bytes, {per:.5} B/param");
    assert_eq!(per, 2.0 + 8.0 / 256.0);
}

#[test]
fn builds_from_optimizer_args_through_the_trainer_contract() {
    let p = leaf(&Tensor::randn([64, 80], (Kind::Float, Device::Cpu)));
    let kw = parse_kwargs(
        &[
            "betas=(0.8,0.95)".to_string(),
            "weight_decay=0.1".to_string(),
        ],
        "--optimizer_args",
    )
    .unwrap();
    let groups = vec![ParamGroup::new("unet", vec![p.shallow_clone()], 1e-4)];
    let (mut opt, line): (Box<dyn Optimizer>, String) = build(&kw, groups, 1e-4).unwrap();
    assert_eq!(
        line,
        "use 8-bit AdamW optimizer | {'betas': (0.8, 0.95), 'weight_decay': 0.1}"
    );
    assert_eq!(opt.class_name(), "bitsandbytes.optim.adamw.AdamW8bit");
    assert_eq!((opt.num_groups(), opt.lr(0)), (1, 1e-4));
    set_grad(&p, &Tensor::ones([64, 80], (Kind::Float, Device::Cpu)));
    let before = p.detach().copy();
    opt.set_lr(0, 1e-2);
    opt.step().unwrap();
    // first Adam step moves every weight by ~lr against the gradient's sign, then decays
    let delta = (p.detach() - &before).mean(Kind::Float).double_value(&[]);
    assert!((delta + 1e-2).abs() < 1e-4, "mean update {delta}");
    let keys: Vec<String> = opt.state_tensors().into_iter().map(|(k, _)| k).collect();
    assert!(keys.contains(&"state.0.absmax1".to_string()), "{keys:?}");
    let e = build(
        &parse_kwargs(&["momentum=0.9".to_string()], "--optimizer_args").unwrap(),
        vec![],
        1e-4,
    )
    .err()
    .unwrap();
    assert!(format!("{e:#}").contains("momentum"), "{e:#}");
}
