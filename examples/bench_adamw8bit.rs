//! Step time and state memory of sdlora's AdamW8bit for flat float32 parameters on the CPU.
//! Run through `scripts/bench adamw8bit`, which also times the Python reference in the same run.
//! usage: bench_adamw8bit [--threads N] [--sizes 1000000,10000000] [--steps N]
use anyhow::{bail, Context, Result};
use sdlora::train::optim::adamw8bit::{AdamW8bit, AdamW8bitConfig};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn main() -> Result<()> {
    let mut threads = 1i32;
    let mut sizes = vec![1_000_000i64, 10_000_000];
    let mut steps = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--threads" => threads = val()?.parse()?,
            "--steps" => steps = val()?.parse()?,
            "--sizes" => {
                sizes = val()?
                    .split(',')
                    .map(|s| s.trim().parse::<i64>())
                    .collect::<Result<_, _>>()?
            }
            _ => bail!("unknown argument {a}"),
        }
    }
    tch::set_num_threads(threads);
    tch::manual_seed(0);
    for &n in &sizes {
        let p = Tensor::randn([n], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        p.sum(Kind::Float).backward();
        let g = Tensor::randn([n], (Kind::Float, Device::Cpu)) * 1e-3;
        tch::no_grad(|| p.grad().copy_(&g));
        let mut opt = AdamW8bit::from_tensors(vec![p.shallow_clone()], AdamW8bitConfig::default())?;
        // warm-up: allocates the state and the allocator's buffers
        opt.step()?;
        opt.step()?;
        let mut times = Vec::with_capacity(steps);
        for _ in 0..steps {
            let t0 = Instant::now();
            opt.step()?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let (bytes, params) = opt.state_bytes();
        println!(
            "impl=rust n={n} threads={threads} steps={steps} median_ms={:.3} min_ms={:.3} state_bytes_per_param={:.5}",
            times[times.len() / 2],
            times[0],
            bytes as f64 / params as f64
        );
    }
    Ok(())
}
