//! One training step's noising and loss against diffusers' DDPMScheduler + sd-scripts' formulas
//! (fixture written by scripts/train_noise_fixture.py: same seeds, same CPU generator stream).
use sdlora::train::noise::{
    step_loss, DdpmConfig, HuberSchedule, LossConfig, LossType, NoiseScheduler,
};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/train/noise.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// max|a − b| / max|b|
fn rel(got: &Tensor, want: &[f32]) -> f64 {
    let got: Vec<f32> =
        Vec::<f32>::try_from(got.detach().to_kind(Kind::Float).flatten(0, -1)).unwrap();
    assert_eq!(got.len(), want.len());
    let scale = want
        .iter()
        .fold(0f64, |m, b| m.max((*b as f64).abs()))
        .max(1e-30);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()))
        / scale
}

fn config(c: &Value) -> LossConfig {
    let f = |k: &str| c.get(k).and_then(|v| v.as_f64());
    let b = |k: &str| c.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    let i = |k: &str| c.get(k).and_then(|v| v.as_i64());
    LossConfig {
        v_parameterization: b("v_parameterization"),
        noise_offset: f("noise_offset"),
        noise_offset_random_strength: b("noise_offset_random_strength"),
        adaptive_noise_scale: f("adaptive_noise_scale"),
        multires_noise_iterations: i("multires_noise_iterations"),
        multires_noise_discount: f("multires_noise_discount").unwrap_or(0.3),
        ip_noise_gamma: f("ip_noise_gamma"),
        ip_noise_gamma_random_strength: b("ip_noise_gamma_random_strength"),
        min_timestep: i("min_timestep"),
        max_timestep: i("max_timestep"),
        loss_type: match c.get("loss_type").and_then(|v| v.as_str()).unwrap_or("l2") {
            "l2" => LossType::L2,
            "l1" => LossType::L1,
            "huber" => LossType::Huber,
            _ => LossType::SmoothL1,
        },
        huber_schedule: match c
            .get("huber_schedule")
            .and_then(|v| v.as_str())
            .unwrap_or("snr")
        {
            "snr" => HuberSchedule::Snr,
            "exponential" => HuberSchedule::Exponential,
            _ => HuberSchedule::Constant,
        },
        huber_c: f("huber_c").unwrap_or(0.1),
        huber_scale: f("huber_scale").unwrap_or(1.0),
        min_snr_gamma: f("min_snr_gamma"),
        scale_v_pred_loss_like_noise_pred: b("scale_v_pred_loss_like_noise_pred"),
        v_pred_like_loss: f("v_pred_like_loss"),
        debiased_estimation_loss: b("debiased_estimation_loss"),
    }
}

#[test]
fn scheduler_tables_match_diffusers() {
    let fx = fixture();
    let s = NoiseScheduler::new(DdpmConfig::default(), false);
    let e1 = rel(&s.alphas_cumprod, &floats(&fx["alphas_cumprod"]));
    let e2 = rel(
        &s.all_snr.clamp_max(1e6),
        &floats(&fx["all_snr"])
            .iter()
            .map(|x| x.min(1e6))
            .collect::<Vec<_>>(),
    );
    let z = NoiseScheduler::new(DdpmConfig::default(), true);
    let e3 = rel(
        &z.alphas_cumprod,
        &floats(&fx["alphas_cumprod_zero_terminal"]),
    );
    println!("alphas_cumprod {e1:e}, all_snr {e2:e}, zero-terminal alphas_cumprod {e3:e}");
    assert!(e1 <= 1e-6 && e2 <= 1e-5 && e3 <= 1e-5);
    // all_snr keeps the original table under zero_terminal_snr (sd-scripts does not refresh it)
    assert!(
        rel(
            &z.all_snr.clamp_max(1e6),
            &floats(&fx["all_snr"])
                .iter()
                .map(|x| x.min(1e6))
                .collect::<Vec<_>>()
        ) <= 1e-5
    );
}

#[test]
fn step_loss_matches_sd_scripts_and_diffusers() {
    let fx = fixture();
    let mut worst = 0f64;
    for case in fx["cases"].as_array().unwrap() {
        let c = &case["config"];
        let name = c["name"].as_str().unwrap();
        let cfg = config(c);
        let sched = NoiseScheduler::new(
            DdpmConfig::default(),
            c.get("zero_terminal_snr")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        );
        let latents = Tensor::from_slice(&floats(&case["latents"])).reshape([2, 4, 6, 4]);
        let weights = Tensor::from_slice(&floats(&case["loss_weights"]));
        let py: Vec<f64> = case["py_random"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let mut py_iter = py.into_iter();
        let mut py_random = move || {
            py_iter
                .next()
                .expect("more Python random draws than recorded")
        };
        let s = Tensor::from(0.9f32).set_requires_grad(true);
        let mut unet = |noisy: &Tensor, t: &Tensor| -> anyhow::Result<Tensor> {
            Ok(noisy * &s + (t.to_kind(Kind::Float) / 1000.0).view([-1, 1, 1, 1]) * 0.1)
        };
        tch::manual_seed(c["seed"].as_i64().unwrap());
        let out = step_loss(&cfg, &sched, &latents, &weights, &mut py_random, &mut unet).unwrap();
        let t: Vec<i64> = Vec::<i64>::try_from(&out.timesteps.to_device(Device::Cpu)).unwrap();
        let want_t: Vec<i64> = case["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(t, want_t, "{name}: timesteps");
        let e_noise = rel(&out.noise, &floats(&case["noise"]));
        let e_target = rel(&out.target, &floats(&case["target"]));
        let want_loss = case["loss"].as_f64().unwrap();
        let e_loss = (out.loss.double_value(&[]) - want_loss).abs() / want_loss.abs();
        out.loss.backward();
        let want_g = case["grad_s"].as_f64().unwrap();
        let e_grad = (s.grad().double_value(&[]) - want_g).abs() / want_g.abs().max(1e-12);
        let e = e_noise.max(e_target).max(e_loss).max(e_grad);
        println!("{name}: noise {e_noise:e} target {e_target:e} loss {e_loss:e} grad {e_grad:e}");
        assert!(
            e <= 1e-5,
            "{name}: noise {e_noise:e} target {e_target:e} loss {e_loss:e} grad {e_grad:e}"
        );
        worst = worst.max(e);
    }
    println!("worst relative error {worst:e}");
}

#[test]
fn noisy_latents_match_diffusers_add_noise() {
    let fx = fixture();
    for case in fx["cases"].as_array().unwrap() {
        let c = &case["config"];
        if c.get("ip_noise_gamma").is_some() {
            continue; // the perturbed noise is not recorded
        }
        let sched = NoiseScheduler::new(
            DdpmConfig::default(),
            c.get("zero_terminal_snr")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        );
        let latents = Tensor::from_slice(&floats(&case["latents"])).reshape([2, 4, 6, 4]);
        let noise = Tensor::from_slice(&floats(&case["noise"])).reshape([2, 4, 6, 4]);
        let t = Tensor::from_slice(
            &case["timesteps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect::<Vec<_>>(),
        );
        let e = rel(
            &sched.add_noise(&latents, &noise, &t),
            &floats(&case["noisy_latents"]),
        );
        assert!(e <= 1e-6, "{}: add_noise {e:e}", c["name"]);
    }
}
