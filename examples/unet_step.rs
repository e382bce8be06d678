//! One UNet training step (forward + backward into rank-4 LoRA-like adapters on the 192
//! Transformer2D layers), reporting time and peak RSS; used for the memory figures of gradient
//! checkpointing and by `scripts/bench models`.
//!
//! usage: unet_step DIR MODEL PIXELS MODE [BACKEND] [REPEAT]
//!   DIR/MODEL.config.json + DIR/MODEL.weights.safetensors from scripts/make_unet_fixtures.py
//!   MODE: forward | plain (forward+backward) | ckpt (forward+backward with checkpointing)
//!   BACKEND: math (default) | sdpa | memeff
use anyhow::{bail, Context, Result};
use sdlora::models::attention::AttentionBackend;
use sdlora::models::config::UNetConfig;
use sdlora::models::layers::{Adapter, Container, LayerMut, VisitLayers};
use sdlora::models::recompute::Tape;
use sdlora::models::unet::UNet2DConditionModel;
use sdlora::models::weights::WeightMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Debug)]
struct Lora {
    down: Mutex<Tensor>,
    up: Mutex<Tensor>,
}

impl Adapter for Lora {
    fn delta(&self, x: &Tensor) -> Tensor {
        let down = self.down.lock().unwrap();
        let up = self.up.lock().unwrap();
        if down.dim() == 2 {
            x.linear(&down, None::<&Tensor>)
                .linear(&up, None::<&Tensor>)
        } else {
            x.conv2d(&down, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 1)
                .conv2d(&up, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 1)
        }
    }
}

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        bail!("usage: unet_step DIR MODEL PIXELS forward|plain|ckpt [math|sdpa|memeff] [REPEAT]");
    }
    let (dir, model, mode) = (&a[1], &a[2], a[4].as_str());
    let pixels: i64 = a[3].parse().context("PIXELS must be an integer")?;
    let backend = match a.get(5).map(|s| s.as_str()).unwrap_or("math") {
        "math" => AttentionBackend::Math,
        "sdpa" => AttentionBackend::Sdpa,
        "memeff" => AttentionBackend::MemEff,
        b => bail!("unknown backend {b}"),
    };
    let repeat: usize = a.get(6).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let cfg_text = std::fs::read_to_string(format!("{dir}/{model}.config.json"))?;
    let cfg = UNetConfig::from_diffusers_json(&serde_json::from_str(&cfg_text)?)?;
    let wpath = format!("{dir}/{model}.weights.safetensors");
    let mut w = WeightMap::new(wpath.clone(), Device::Cpu, Kind::Float);
    for (k, t) in Tensor::read_safetensors(&wpath)? {
        w.insert(k, t);
    }
    let mut unet = UNet2DConditionModel::load(&cfg, &mut w)?;
    w.finish()?;
    unet.set_attention_backend(backend);
    tch::manual_seed(0);
    let mut n_adapters = 0;
    unet.visit_layers(&mut |info, layer| {
        if info.container != Container::Transformer2D {
            return;
        }
        let (shape_down, shape_up, slot) = match layer {
            LayerMut::Linear(l) => (
                vec![4, l.in_features()],
                vec![l.out_features(), 4],
                &mut l.adapter,
            ),
            LayerMut::Conv2d(c) => (
                vec![4, c.in_channels(), 1, 1],
                vec![c.out_channels(), 4, 1, 1],
                &mut c.adapter,
            ),
        };
        let opts = (Kind::Float, Device::Cpu);
        *slot = Some(Arc::new(Lora {
            down: Mutex::new((Tensor::randn(shape_down, opts) * 0.01).set_requires_grad(true)),
            up: Mutex::new((Tensor::randn(shape_up, opts) * 0.01).set_requires_grad(true)),
        }));
        n_adapters += 1;
    });
    let rss_loaded = status_kb("VmRSS:");
    // Reset VmHWM so the peak below is the step's, not the loader's.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let lat = pixels / 8;
    let opts = (Kind::Float, Device::Cpu);
    let sample = Tensor::randn([1, cfg.in_channels, lat, lat], opts);
    let t = Tensor::from_slice(&[500i64]);
    let ctx = Tensor::randn([1, 77, cfg.cross_attention_dim], opts);
    let target = Tensor::randn([1, cfg.out_channels, lat, lat], opts);
    let mut times = Vec::new();
    for _ in 0..repeat {
        let t0 = Instant::now();
        match mode {
            "forward" => {
                let _ = tch::no_grad(|| unet.forward(&sample, &t, &ctx));
            }
            "plain" => {
                let out = unet.forward(&sample, &t, &ctx);
                let loss = (out - &target).square().mean(Kind::Float);
                loss.backward();
            }
            "ckpt" => {
                let tape = Tape::new();
                let out = unet.forward_with_tape(&sample, &t, &ctx, Some(&tape));
                let loss = (out - &target).square().mean(Kind::Float);
                tape.backward(&loss)?;
            }
            m => bail!("unknown mode {m}"),
        }
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "unet_step model={model} pixels={pixels} mode={mode} backend={backend:?} adapters={n_adapters} \
         best_s={:.3} median_s={:.3} rss_after_load_mb={} peak_rss_step_mb={}",
        times[0],
        times[times.len() / 2],
        rss_loaded / 1024,
        status_kb("VmHWM:") / 1024
    );
    Ok(())
}
