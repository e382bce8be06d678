//! Optimizers against torch.optim.AdamW / SGD(nesterov), lion_pytorch.Lion and transformers'
//! Adafactor: trajectories from scripts/train_optim_fixture.py (tests/fixtures/train/optim.json).
use sdlora::train::optim::build::{build_optimizer, resolve_kind};
use sdlora::train::optim::common::ParamGroup;
use serde_json::Value;
use tch::{Kind, Tensor};

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/train/optim.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("read optim.json")).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn shape(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn make_groups(case: &Value) -> Vec<ParamGroup> {
    let mut groups = Vec::new();
    for (gi, shapes) in case["shapes"].as_array().unwrap().iter().enumerate() {
        let params: Vec<Tensor> = shapes
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(pi, s)| {
                Tensor::from_slice(&floats(&case["init"][gi][pi]))
                    .reshape(shape(s))
                    .set_requires_grad(true)
            })
            .collect();
        let lr = case["lrs"][gi].as_f64().unwrap_or(0.0);
        groups.push(ParamGroup::new(format!("group{gi}"), params, lr));
    }
    groups
}

/// Makes every parameter's `.grad` exactly the fixture's gradient: d/dp Σ p·g = g.
fn set_grads(params: &[Vec<Tensor>], grads: &Value) {
    let mut loss = Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
    for (gi, ps) in params.iter().enumerate() {
        for (pi, p) in ps.iter().enumerate() {
            let g = Tensor::from_slice(&floats(&grads[gi][pi])).reshape(p.size());
            loss += (p * g).sum(Kind::Float);
        }
    }
    loss.backward();
}

/// Worst over tensors of max|got − want| / max|want| (relative to the tensor's scale, so that an
/// element crossing zero does not turn fp32 rounding into a huge ratio).
fn max_rel_err(params: &[Vec<Tensor>], want: &Value) -> f64 {
    let mut worst = 0f64;
    for (gi, ps) in params.iter().enumerate() {
        for (pi, p) in ps.iter().enumerate() {
            let got: Vec<f32> = Vec::<f32>::try_from(p.detach().flatten(0, -1)).unwrap();
            let want = floats(&want[gi][pi]);
            let scale = want.iter().fold(0f64, |m, b| m.max((*b as f64).abs()));
            let diff = got
                .iter()
                .zip(&want)
                .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
            worst = worst.max(diff / scale);
        }
    }
    worst
}

fn run_case(case: &Value, split_at: Option<usize>) -> f64 {
    let name = case["name"].as_str().unwrap();
    let kind = resolve_kind(case["optimizer_type"].as_str().unwrap(), false, false).unwrap();
    let args: Vec<String> = case["optimizer_args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let lr = case["learning_rate"].as_f64().unwrap();
    let groups = make_groups(case);
    let params: Vec<Vec<Tensor>> = groups
        .iter()
        .map(|g| g.params.iter().map(|p| p.shallow_clone()).collect())
        .collect();
    let (mut opt, info) = build_optimizer(kind, &args, groups, lr).unwrap();
    let mut worst = 0f64;
    let steps = case["grads"].as_array().unwrap().len();
    for step in 0..steps {
        if step as i64 == case["set_lr_at"].as_i64().unwrap() {
            if let Some(lrs) = case["set_lr"].as_array() {
                for (gi, lr) in lrs.iter().enumerate() {
                    opt.set_lr(gi, lr.as_f64().unwrap());
                }
            }
        }
        if Some(step) == split_at {
            // save the state, rebuild from scratch, reload: the trajectory must not change
            let state: Vec<(String, Tensor)> = opt
                .state_tensors()
                .into_iter()
                .map(|(k, t)| (k, t.copy()))
                .collect();
            let lrs: Vec<f64> = (0..opt.num_groups()).map(|g| opt.lr(g)).collect();
            let groups: Vec<ParamGroup> = params
                .iter()
                .zip(&lrs)
                .enumerate()
                .map(|(gi, (ps, lr))| {
                    ParamGroup::new(
                        format!("group{gi}"),
                        ps.iter().map(|p| p.shallow_clone()).collect(),
                        *lr,
                    )
                })
                .collect();
            let (o, _) = build_optimizer(kind, &args, groups, lr).unwrap();
            opt = o;
            opt.load_state_tensors(&state).unwrap();
        }
        set_grads(&params, &case["grads"][step]);
        opt.step().unwrap();
        opt.zero_grad();
        let err = max_rel_err(&params, &case["after"][step]);
        assert!(
            err <= 1e-6,
            "{name} ({}) step {}: max relative error {err:e}",
            info.metadata_name,
            step + 1
        );
        worst = worst.max(err);
    }
    // the comparison only means something if the optimizer moved the parameters
    let moved = max_rel_err(&params, &case["init"]);
    assert!(moved > 1e-5, "{name}: parameters barely moved ({moved:e})");
    worst
}

#[test]
fn optimizers_match_reference_trajectories() {
    let fx = fixture();
    for case in fx["cases"].as_array().unwrap() {
        let worst = run_case(case, None);
        println!("{}: max relative error {worst:e}", case["name"]);
    }
}

#[test]
fn optimizer_state_round_trip_keeps_trajectory() {
    let fx = fixture();
    for case in fx["cases"].as_array().unwrap() {
        run_case(case, Some(2));
    }
}

#[test]
fn unknown_optimizer_lists_supported() {
    let err = resolve_kind("Prodigy", false, false)
        .unwrap_err()
        .to_string();
    for name in ["AdamW", "AdamW8bit", "Lion", "SGDNesterov", "AdaFactor"] {
        assert!(err.contains(name), "{err}");
    }
    assert!(err.contains("Prodigy"));
    assert!(resolve_kind("", true, true).is_err());
    assert!(resolve_kind("AdamW", true, false).is_err());
    assert_eq!(
        resolve_kind("", false, true).unwrap(),
        resolve_kind("lion", false, false).unwrap()
    );
}

#[test]
fn optimizer_args_errors_name_the_key() {
    let g = vec![ParamGroup::new(
        "unet",
        vec![Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true)],
        1e-3,
    )];
    let kind = resolve_kind("AdamW", false, false).unwrap();
    let err = build_optimizer(kind, &["betas=0.9".into()], g, 1e-3)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("betas"), "{err}");
}

#[test]
fn adamw8bit_is_built_through_the_factory() {
    let p = Tensor::ones([8, 8], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let g = vec![ParamGroup::new("unet", vec![p.shallow_clone()], 1e-3)];
    let kind = resolve_kind("", true, false).unwrap();
    let (mut opt, info) = build_optimizer(kind, &["weight_decay=0.1".into()], g, 1e-3).unwrap();
    assert_eq!(
        info.metadata_name,
        "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.1)"
    );
    assert!(info
        .log_line
        .starts_with("use 8-bit AdamW optimizer | {'weight_decay': 0.1}"));
    (&p * 2.0).sum(Kind::Float).backward();
    opt.step().unwrap();
    assert!(p.double_value(&[0, 0]) < 1.0);
}
