//! GradScaler and clip_grad_norm_ against torch (fixture from scripts/train_amp_fixture.py).
use sdlora::train::amp::{clip_grad_norm, resolve_precision, GradScaler, Precision, ScalerConfig};
use sdlora::train::optim::common::{Optimizer, ParamGroup};
use sdlora::train::optim::sgd::{Sgd, SgdConfig};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/train/amp.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| match x {
            Value::String(s) => s.parse::<f32>().unwrap(),
            x => x.as_f64().unwrap() as f32,
        })
        .collect()
}

fn shapes(fx: &Value) -> Vec<Vec<i64>> {
    fx["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_i64().unwrap())
                .collect()
        })
        .collect()
}

fn rel(got: &Tensor, want: &[f32]) -> f64 {
    let got: Vec<f32> = Vec::<f32>::try_from(got.detach().flatten(0, -1)).unwrap();
    let scale = want
        .iter()
        .fold(0f64, |m, b| m.max((*b as f64).abs()))
        .max(1e-30);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()))
        / scale
}

/// Sets `.grad` of each param to exactly `g` (d/dp Σ p·g).
fn set_grads(params: &[Tensor], grads: &[Tensor], scale: f64) {
    let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
    for (p, g) in params.iter().zip(grads) {
        loss += (p * g).sum(Kind::Float);
    }
    (loss * scale).backward();
}

#[test]
fn clip_grad_norm_matches_torch() {
    let fx = fixture();
    let shapes = shapes(&fx);
    for case in fx["clip"].as_array().unwrap() {
        let params: Vec<Tensor> = shapes
            .iter()
            .map(|s| {
                Tensor::zeros(s.as_slice(), (Kind::Float, Device::Cpu)).set_requires_grad(true)
            })
            .collect();
        let grads: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| Tensor::from_slice(&floats(&case["grads"][i])).reshape(s.as_slice()))
            .collect();
        set_grads(&params, &grads, 1.0);
        let total = clip_grad_norm(&params, case["max_norm"].as_f64().unwrap());
        let want = case["total_norm"].as_f64().unwrap();
        assert!(
            (total - want).abs() / want <= 1e-6,
            "norm {total} vs {want}"
        );
        for (i, p) in params.iter().enumerate() {
            let e = rel(&p.grad(), &floats(&case["clipped"][i]));
            assert!(e <= 1e-6, "clipped grad {i}: {e:e}");
        }
    }
}

#[test]
fn grad_scaler_matches_torch_with_overflows() {
    let fx = fixture();
    let shapes = shapes(&fx);
    let sc = &fx["scaler"];
    let params: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Tensor::from_slice(&floats(&sc["init"][i]))
                .reshape(s.as_slice())
                .set_requires_grad(true)
        })
        .collect();
    let group = ParamGroup::new(
        "unet",
        params.iter().map(|p| p.shallow_clone()).collect(),
        0.1,
    );
    let cfg = SgdConfig {
        momentum: 0.0,
        nesterov: false,
        ..SgdConfig::default()
    };
    let mut opt = Sgd::new(vec![group], cfg).unwrap();
    let mut scaler = GradScaler::new(
        true,
        ScalerConfig {
            growth_interval: 3,
            ..ScalerConfig::default()
        },
    );
    let mut skipped = 0;
    for (k, step) in sc["steps"].as_array().unwrap().iter().enumerate() {
        let grads: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| Tensor::from_slice(&floats(&step["grads"][i])).reshape(s.as_slice()))
            .collect();
        opt.zero_grad();
        // backward of scale·Σ p·g gives grads g·scale (inf where g is inf)
        let scaled: Vec<Tensor> = grads.iter().map(|g| g * scaler.scale).collect();
        set_grads(&params, &scaled, 1.0);
        scaler.unscale(&params);
        let total = clip_grad_norm(&params, 1.0);
        if let Some(want) = step["total_norm"].as_f64() {
            assert!(
                (total - want).abs() / want <= 1e-6,
                "step {k}: norm {total} vs {want}"
            );
        }
        let stepped = scaler.step(&mut opt, &params).unwrap();
        scaler.update();
        assert_eq!(
            stepped,
            step["stepped"].as_bool().unwrap(),
            "step {k}: stepped"
        );
        assert_eq!(
            scaler.scale,
            step["scale"].as_f64().unwrap(),
            "step {k}: scale"
        );
        skipped += usize::from(!stepped);
        for (i, p) in params.iter().enumerate() {
            let e = rel(p, &floats(&step["params"][i]));
            assert!(e <= 1e-6, "step {k} param {i}: {e:e}");
        }
    }
    assert_eq!(skipped, 3);
    // state round trip
    let st = scaler.state_tensors();
    let mut other = GradScaler::new(true, ScalerConfig::default());
    other.load_state_tensors(&st).unwrap();
    assert_eq!(
        (other.scale, other.growth_tracker),
        (scaler.scale, scaler.growth_tracker)
    );
}

#[test]
fn disabled_scaler_is_identity_and_fp16_on_cpu_falls_back() {
    let s = GradScaler::new(false, ScalerConfig::default());
    let l = Tensor::from(2.5f32);
    assert_eq!(s.scale_loss(&l).double_value(&[]), 2.5);
    let (p, notice) = resolve_precision("fp16", Device::Cpu).unwrap();
    assert_eq!(p, Precision::Fp32);
    assert!(notice.unwrap().contains("fp32"));
    let (p, notice) = resolve_precision("fp16", Device::Cuda(0)).unwrap();
    assert_eq!((p, notice), (Precision::Fp16, None));
    assert!(Precision::Fp16.uses_grad_scaler() && !Precision::Bf16.uses_grad_scaler());
    assert_eq!(
        resolve_precision("no", Device::Cpu)
            .unwrap()
            .0
            .weight_kind(),
        Kind::Float
    );
}

#[test]
fn overflowing_step_skips_optimizer_and_scheduler() {
    use sdlora::train::args::IntOrFloat;
    use sdlora::train::lr::{LrScheduler, Schedule};
    use sdlora::train::step::finish_optimizer_step;
    let p = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let params = vec![p.shallow_clone()];
    let mut opt = Sgd::new(
        vec![ParamGroup::new("unet", vec![p.shallow_clone()], 0.1)],
        SgdConfig {
            momentum: 0.0,
            nesterov: false,
            ..SgdConfig::default()
        },
    )
    .unwrap();
    let sched = Schedule::from_args("linear", IntOrFloat::Int(0), 10, 1, 1, 1.0, 0.1).unwrap();
    let mut sched = LrScheduler::new(sched, &mut opt);
    let mut scaler = GradScaler::new(true, ScalerConfig::default());
    // good step: grad 1 → clipped to norm 1 → p −= 0.1·(1/√3)
    set_grads(
        &params,
        &[Tensor::ones([3], (Kind::Float, Device::Cpu))],
        scaler.scale,
    );
    let o = finish_optimizer_step(&mut opt, &mut scaler, &mut sched, &params, 1.0, 1).unwrap();
    assert!(o.stepped);
    assert!((o.grad_norm.unwrap() - 3f64.sqrt()).abs() < 1e-5);
    assert_eq!(sched.steps, 1);
    assert!((opt.lr(0) - 0.09).abs() < 1e-12);
    let after_good: Vec<f32> = Vec::<f32>::try_from(p.detach()).unwrap();
    assert!((after_good[0] as f64 - (1.0 - 0.1 / 3f64.sqrt())).abs() < 1e-6);
    // overflow: nothing moves, scale halves, the scheduler does not step
    let bad = Tensor::from_slice(&[f32::INFINITY, 0.0, 0.0]);
    set_grads(&params, &[bad], scaler.scale);
    let o = finish_optimizer_step(&mut opt, &mut scaler, &mut sched, &params, 1.0, 1).unwrap();
    assert!(!o.stepped);
    assert_eq!(sched.steps, 1);
    assert_eq!(scaler.scale, 32768.0);
    assert_eq!(Vec::<f32>::try_from(p.detach()).unwrap(), after_good);
    // grads cleared for the next step
    assert_eq!(p.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
}
