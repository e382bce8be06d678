//! UNet parity against diffusers 0.32.1 (fixtures made by scripts/make_unet_fixtures.py at test
//! time), attention backends, gradient checkpointing and the LoRA layer visitor.
//! Full-size SD1.5 / SD2.1 cases run with SDLORA_FULL=1.
use sdlora::models::attention::AttentionBackend;
use sdlora::models::config::UNetConfig;
use sdlora::models::layers::{Adapter, Container, LayerMut, VisitLayers};
use sdlora::models::recompute::Tape;
use sdlora::models::unet::UNet2DConditionModel;
use sdlora::models::weights::WeightMap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use tch::{Device, Kind, Tensor};

fn python() -> String {
    std::env::var("SDLORA_PYTHON")
        .unwrap_or_else(|_| "/root/.cache/sdlora/venv/bin/python".to_string())
}

fn generate(dir: &Path, models: &[&str], bigmem: bool) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make_unet_fixtures.py");
    let mut cmd = if bigmem {
        let mut c = std::process::Command::new("flock");
        c.arg("/tmp/sdlora-bigmem.lock").arg(python());
        c
    } else {
        std::process::Command::new(python())
    };
    let status = cmd
        .arg(&script)
        .arg(dir)
        .args(models)
        .status()
        .expect("failed to run the fixture script");
    assert!(status.success(), "make_unet_fixtures.py failed");
}

/// Tiny fixtures, generated once per test binary.
fn tiny_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sdlora-unet-fixtures-{}", std::process::id()));
        generate(
            &dir,
            &["tiny", "tiny_sd2", "sd15:shapes", "sd21:shapes"],
            false,
        );
        dir
    })
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn config(dir: &Path, model: &str) -> UNetConfig {
    let text = std::fs::read_to_string(dir.join(format!("{model}.config.json"))).unwrap();
    UNetConfig::from_diffusers_json(&serde_json::from_str(&text).unwrap()).unwrap()
}

fn load(dir: &Path, model: &str) -> UNet2DConditionModel {
    let cfg = config(dir, model);
    let path = dir.join(format!("{model}.weights.safetensors"));
    let mut w = WeightMap::new(path.display().to_string(), Device::Cpu, Kind::Float);
    for (k, t) in read(&path) {
        w.insert(k, t);
    }
    let unet = UNet2DConditionModel::load(&cfg, &mut w).unwrap();
    w.finish().unwrap();
    unet
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(a, b) / b.abs().max().double_value(&[]).max(1e-30)
}

struct Io(HashMap<String, Tensor>);

impl Io {
    fn open(dir: &Path, case: &str) -> Self {
        Io(read(&dir.join(format!("{case}.io.safetensors"))))
    }
    fn get(&self, k: &str) -> &Tensor {
        self.0.get(k).unwrap_or_else(|| panic!("fixture lacks {k}"))
    }
}

fn check_forward(dir: &Path, model: &str, cases: &[&str], tol: f64) {
    let mut unet = load(dir, model);
    for backend in [
        AttentionBackend::Math,
        AttentionBackend::Sdpa,
        AttentionBackend::MemEff,
    ] {
        unet.set_attention_backend(backend);
        for case in cases {
            let io = Io::open(dir, case);
            let out = tch::no_grad(|| {
                unet.forward(
                    io.get("input.sample"),
                    io.get("input.timesteps"),
                    io.get("input.encoder_hidden_states"),
                )
            });
            let e = max_abs(&out, io.get("output.sample"));
            println!("{case} {backend:?}: noise prediction max abs err {e:.3e}");
            assert!(e <= tol, "{case} {backend:?}: max abs err {e} > {tol}");
        }
    }
}

#[test]
fn tiny_forward_matches_diffusers() {
    let dir = tiny_dir();
    assert_eq!(config(dir, "tiny"), UNetConfig::tiny());
    check_forward(dir, "tiny", &["tiny", "tiny_odd"], 1e-4);
}

#[test]
fn tiny_sd2_forward_matches_diffusers() {
    let dir = tiny_dir();
    let cfg = config(dir, "tiny_sd2");
    assert!(cfg.use_linear_projection && cfg.upcast_attention);
    check_forward(dir, "tiny_sd2", &["tiny_sd2"], 1e-4);
}

/// Makes every Linear/1×1-conv weight inside the Transformer2DModels trainable (the LoRA targets)
/// and returns them by Diffusers parameter name.
fn train_lora_targets(unet: &mut UNet2DConditionModel) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    unet.visit_layers(&mut |info, layer| {
        if info.container != Container::Transformer2D {
            return;
        }
        let w = match layer {
            LayerMut::Linear(l) => &mut l.weight,
            LayerMut::Conv2d(c) => &mut c.weight,
        };
        *w = w.detach().set_requires_grad(true);
        out.push((format!("{}.weight", info.path), w.shallow_clone()));
    });
    out
}

/// Gradients of the fixture loss w.r.t. the LoRA-target weights and both inputs, with and
/// without checkpointing, against diffusers autograd.
fn check_grads(dir: &Path, model: &str, case: &str, backend: AttentionBackend, tol: f64) {
    let mut unet = load(dir, model);
    unet.set_attention_backend(backend);
    let params = train_lora_targets(&mut unet);
    let io = Io::open(dir, case);
    let sample = io.get("input.sample").detach().set_requires_grad(true);
    let ehs = io
        .get("input.encoder_hidden_states")
        .detach()
        .set_requires_grad(true);
    let mut plain: Vec<Tensor> = Vec::new();
    for ckpt in [false, true] {
        for (_, p) in &params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        for x in [&sample, &ehs] {
            let mut g = x.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let tape = Tape::new();
        let out = unet.forward_with_tape(
            &sample,
            io.get("input.timesteps"),
            &ehs,
            if ckpt { Some(&tape) } else { None },
        );
        let loss = (&out * io.get("loss.weight")).sum(Kind::Float);
        if ckpt {
            assert!(!tape.is_empty());
            tape.backward(&loss).unwrap();
        } else {
            loss.backward();
        }
        let mut worst = 0f64;
        let mut got = Vec::new();
        for (name, p) in &params {
            let g = p.grad();
            assert!(g.defined(), "{name}: no gradient (checkpointing={ckpt})");
            let e = rel(&g, io.get(&format!("grad.{name}")));
            assert!(
                e <= tol,
                "{case} {backend:?} {name}: relative grad err {e} (checkpointing={ckpt})"
            );
            worst = worst.max(e);
            got.push(g.copy());
        }
        for (x, name) in [(&sample, "sample"), (&ehs, "encoder_hidden_states")] {
            let e = rel(&x.grad(), io.get(&format!("grad.input.{name}")));
            assert!(
                e <= tol,
                "{case} {backend:?} input {name}: relative grad err {e}"
            );
            worst = worst.max(e);
            got.push(x.grad().copy());
        }
        assert_eq!(params.len() + 2, got.len());
        println!(
            "{case} {backend:?} checkpointing={ckpt}: {} weight grads, max relative err vs diffusers {worst:.3e}",
            params.len()
        );
        if ckpt {
            let worst = plain
                .iter()
                .zip(&got)
                .map(|(a, b)| rel(b, a))
                .fold(0f64, f64::max);
            println!("{case} {backend:?}: checkpointed vs plain max relative diff {worst:.3e}");
            assert!(worst <= 1e-5, "checkpointed vs plain grads differ: {worst}");
        } else {
            plain = got;
        }
    }
}

#[test]
fn tiny_grads_match_diffusers() {
    let dir = tiny_dir();
    assert_eq!(load(dir, "tiny").visit_count(Container::Transformer2D), 132);
    check_grads(dir, "tiny", "tiny", AttentionBackend::Math, 1e-4);
    check_grads(dir, "tiny", "tiny_odd", AttentionBackend::MemEff, 1e-4);
}

#[test]
fn tiny_sd2_grads_match_diffusers() {
    check_grads(
        tiny_dir(),
        "tiny_sd2",
        "tiny_sd2",
        AttentionBackend::Sdpa,
        1e-4,
    );
}

/// A LoRA-like adapter with trainable down/up tensors (the real LoRA module lives elsewhere).
#[derive(Debug)]
struct TestAdapter {
    down: Mutex<Tensor>,
    up: Mutex<Tensor>,
    conv: Option<(i64, i64)>,
}

impl Adapter for TestAdapter {
    fn delta(&self, x: &Tensor) -> Tensor {
        let down = self.down.lock().unwrap();
        let up = self.up.lock().unwrap();
        match self.conv {
            None => x
                .linear(&down, None::<&Tensor>)
                .linear(&up, None::<&Tensor>),
            Some((stride, pad)) => x
                .conv2d(
                    &down,
                    None::<&Tensor>,
                    [stride, stride],
                    [pad, pad],
                    [1, 1],
                    1,
                )
                .conv2d(&up, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 1),
        }
    }
}

fn attach_adapters(unet: &mut UNet2DConditionModel) -> Vec<(String, Arc<TestAdapter>)> {
    let rank = 2;
    let mut out = Vec::new();
    unet.visit_layers(&mut |info, layer| {
        let (a, slot) = match layer {
            LayerMut::Linear(l) => {
                let a = TestAdapter {
                    down: Mutex::new(
                        (Tensor::randn([rank, l.in_features()], (Kind::Float, Device::Cpu)) * 0.1)
                            .set_requires_grad(true),
                    ),
                    up: Mutex::new(
                        (Tensor::randn([l.out_features(), rank], (Kind::Float, Device::Cpu)) * 0.1)
                            .set_requires_grad(true),
                    ),
                    conv: None,
                };
                (Arc::new(a), &mut l.adapter)
            }
            LayerMut::Conv2d(c) => {
                let (kh, kw) = c.kernel_size();
                let a = TestAdapter {
                    down: Mutex::new(
                        (Tensor::randn(
                            [rank, c.in_channels(), kh, kw],
                            (Kind::Float, Device::Cpu),
                        ) * 0.1)
                            .set_requires_grad(true),
                    ),
                    up: Mutex::new(
                        (Tensor::randn([c.out_channels(), rank, 1, 1], (Kind::Float, Device::Cpu))
                            * 0.1)
                            .set_requires_grad(true),
                    ),
                    conv: Some((c.stride, c.padding)),
                };
                (Arc::new(a), &mut c.adapter)
            }
        };
        *slot = Some(a.clone() as Arc<dyn Adapter>);
        out.push((info.path.to_string(), a));
    });
    out
}

fn adapter_grads(adapters: &[(String, Arc<TestAdapter>)]) -> Vec<Tensor> {
    let mut v = Vec::new();
    for (name, a) in adapters {
        for t in [&a.down, &a.up] {
            let t = t.lock().unwrap();
            let g = t.grad();
            assert!(g.defined(), "{name}: adapter got no gradient");
            v.push(g.copy());
            let mut g = g;
            let _ = g.zero_();
        }
    }
    v
}

fn fixture_loss<'a>(
    unet: &'a UNet2DConditionModel,
    io: &Io,
    ehs: &Tensor,
    tape: Option<&Tape<'a>>,
) -> Tensor {
    let out = unet.forward_with_tape(io.get("input.sample"), io.get("input.timesteps"), ehs, tape);
    (&out * io.get("loss.weight")).sum(Kind::Float)
}

/// With adapters on every visited layer (Transformer2D, resnets, resamplers: conv_dim LoRA),
/// checkpointed gradients equal plain autograd gradients.
#[test]
fn checkpointing_preserves_adapter_grads() {
    let dir = tiny_dir();
    for (model, case, backend) in [
        ("tiny", "tiny_odd", AttentionBackend::Math),
        ("tiny_sd2", "tiny_sd2", AttentionBackend::MemEff),
    ] {
        let mut unet = load(dir, model);
        unet.set_attention_backend(backend);
        tch::manual_seed(7);
        let adapters = attach_adapters(&mut unet);
        let io = Io::open(dir, case);
        let ehs = io
            .get("input.encoder_hidden_states")
            .detach()
            .set_requires_grad(true);
        let loss = fixture_loss(&unet, &io, &ehs, None);
        loss.backward();
        let mut plain = adapter_grads(&adapters);
        plain.push(ehs.grad().copy());
        let _ = ehs.grad().zero_();
        let tape = Tape::new();
        let loss2 = fixture_loss(&unet, &io, &ehs, Some(&tape));
        tape.backward(&loss2).unwrap();
        let mut ck = adapter_grads(&adapters);
        ck.push(ehs.grad().copy());
        // Relative to each gradient's size, but with a floor at 1% of the largest adapter
        // gradient: in the tiny config every GroupNorm group is one channel, so norm2 cancels the
        // per-channel time embedding and time_emb_proj grads are pure rounding noise (~1e-8).
        let floor = plain
            .iter()
            .map(|g| g.abs().max().double_value(&[]))
            .fold(0f64, f64::max)
            * 1e-2;
        let errs: Vec<f64> = plain
            .iter()
            .zip(&ck)
            .map(|(a, b)| max_abs(b, a) / a.abs().max().double_value(&[]).max(floor))
            .collect();
        let worst = errs.iter().copied().fold(0f64, f64::max);
        let at = errs.iter().position(|e| *e == worst).unwrap();
        println!(
            "worst at {} (|grad| {:.3e}, floor {floor:.3e})",
            adapters
                .get(at / 2)
                .map(|x| x.0.as_str())
                .unwrap_or("encoder_hidden_states"),
            plain[at].abs().max().double_value(&[])
        );
        println!(
            "{case} {backend:?}: {} adapters, checkpointed vs plain max relative diff {worst:.3e}",
            adapters.len()
        );
        assert!(
            worst <= 1e-5,
            "{case}: checkpointed grads differ by {worst}"
        );
        assert!(
            (loss.double_value(&[]) - loss2.double_value(&[])).abs()
                <= 1e-4 * loss.double_value(&[]).abs()
        );
    }
}

trait VisitCount {
    fn visit_count(&mut self, c: Container) -> usize;
}

impl VisitCount for UNet2DConditionModel {
    fn visit_count(&mut self, c: Container) -> usize {
        let mut n = 0;
        self.visit_layers(&mut |info, _| n += usize::from(info.container == c));
        n
    }
}

fn paths(unet: &mut UNet2DConditionModel) -> Vec<(String, Container)> {
    let mut v = Vec::new();
    unet.visit_layers(&mut |info, _| v.push((info.path.to_string(), info.container)));
    v
}

/// A full-size model whose tensors are uninitialised (never touched, so no RSS), with the keys
/// and shapes diffusers' state_dict has.
fn empty_full(dir: &Path, model: &str) -> UNet2DConditionModel {
    let cfg = config(dir, model);
    let text = std::fs::read_to_string(dir.join(format!("{model}.shapes.json"))).unwrap();
    let shapes: HashMap<String, Vec<i64>> = serde_json::from_str(&text).unwrap();
    let mut w = WeightMap::new(format!("{model}.shapes.json"), Device::Cpu, Kind::Float);
    for (k, s) in shapes {
        w.insert(k, Tensor::empty(s.as_slice(), (Kind::Float, Device::Cpu)));
    }
    let unet = UNet2DConditionModel::load(&cfg, &mut w).unwrap();
    w.finish().unwrap();
    unet
}

/// The visitor follows sd-scripts' `named_modules()` order (spec §2.1): down blocks, then up
/// blocks, then the mid block; in a block attentions, then resnets, then the resampler; in a
/// transformer block attn1, ff, attn2. SD1: 16 × 12 Transformer2D layers, 86 conv_dim layers.
#[test]
fn visitor_order_and_counts_sd1() {
    let dir = tiny_dir();
    assert_eq!(config(dir, "sd15"), UNetConfig::sd1());
    let mut unet = empty_full(dir, "sd15");
    let v = paths(&mut unet);
    let count = |c: Container| v.iter().filter(|(_, k)| *k == c).count();
    assert_eq!(count(Container::Transformer2D), 192);
    assert_eq!(v.len() - 192, 86);
    assert_eq!(count(Container::Downsample2D), 3);
    assert_eq!(count(Container::Upsample2D), 3);
    let first: Vec<&str> = v.iter().take(14).map(|(p, _)| p.as_str()).collect();
    let t = "down_blocks.0.attentions.0.transformer_blocks.0";
    assert_eq!(
        first,
        [
            "down_blocks.0.attentions.0.proj_in".to_string(),
            format!("{t}.attn1.to_q"),
            format!("{t}.attn1.to_k"),
            format!("{t}.attn1.to_v"),
            format!("{t}.attn1.to_out.0"),
            format!("{t}.ff.net.0.proj"),
            format!("{t}.ff.net.2"),
            format!("{t}.attn2.to_q"),
            format!("{t}.attn2.to_k"),
            format!("{t}.attn2.to_v"),
            format!("{t}.attn2.to_out.0"),
            "down_blocks.0.attentions.0.proj_out".to_string(),
            "down_blocks.0.attentions.1.proj_in".to_string(),
            "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q".to_string(),
        ]
    );
    let pos = |p: &str| {
        v.iter()
            .position(|(x, _)| x == p)
            .unwrap_or_else(|| panic!("{p} not visited"))
    };
    assert!(pos("down_blocks.0.attentions.1.proj_out") < pos("down_blocks.0.resnets.0.conv1"));
    assert!(pos("down_blocks.0.resnets.0.conv1") < pos("down_blocks.0.resnets.0.time_emb_proj"));
    assert!(pos("down_blocks.0.resnets.1.conv2") < pos("down_blocks.0.downsamplers.0.conv"));
    assert!(pos("down_blocks.3.resnets.1.conv2") < pos("up_blocks.0.resnets.0.conv1"));
    assert!(pos("up_blocks.3.resnets.2.conv_shortcut") < pos("mid_block.attentions.0.proj_in"));
    assert!(pos("mid_block.attentions.0.proj_out") < pos("mid_block.resnets.0.conv1"));
    assert_eq!(v.last().unwrap().0, "mid_block.resnets.1.conv2");

    // SD2.1 (Diffusers layout): Linear proj_in/proj_out, same module list.
    let cfg = config(dir, "sd21");
    assert_eq!(
        cfg,
        UNetConfig {
            upcast_attention: true,
            ..UNetConfig::sd2()
        }
    );
    let mut unet2 = empty_full(dir, "sd21");
    let mut linear_proj = 0;
    unet2.visit_layers(&mut |info, layer| {
        if info.path.ends_with("proj_in") || info.path.ends_with("proj_out") {
            assert!(matches!(layer, LayerMut::Linear(_)), "{}", info.path);
            linear_proj += 1;
        }
    });
    assert_eq!(linear_proj, 32);
    let v2 = paths(&mut unet2);
    assert_eq!(
        v.iter().map(|x| &x.0).collect::<Vec<_>>(),
        v2.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
}

#[test]
fn load_errors_name_the_key() {
    let dir = tiny_dir();
    let cfg = config(dir, "tiny");
    let path = dir.join("tiny.weights.safetensors");
    let mut tensors = read(&path);
    tensors.remove("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight");
    let mut w = WeightMap::new("tiny.safetensors", Device::Cpu, Kind::Float);
    for (k, t) in tensors {
        w.insert(k, t);
    }
    let e = UNet2DConditionModel::load(&cfg, &mut w)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tiny.safetensors")
            && e.contains("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
        "{e}"
    );

    let mut bad = UNetConfig::tiny();
    bad.cross_attention_dim = 40;
    let mut w = WeightMap::new("tiny.safetensors", Device::Cpu, Kind::Float);
    for (k, t) in read(&path) {
        w.insert(k, t);
    }
    let e = UNet2DConditionModel::load(&bad, &mut w)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("attn2.to_k.weight") && e.contains("shape"),
        "{e}"
    );

    let json = serde_json::json!({"block_out_channels": [32], "down_block_types": ["SimpleCrossAttnDownBlock2D"], "up_block_types": ["UpBlock2D"]});
    let e = UNetConfig::from_diffusers_json(&json)
        .unwrap_err()
        .to_string();
    assert!(e.contains("SimpleCrossAttnDownBlock2D"), "{e}");
}

fn full_enabled() -> bool {
    std::env::var("SDLORA_FULL").is_ok_and(|v| v == "1")
}

/// Full-size SD1.5 and SD2.1 UNets at 64×64 pixels (8×8 latents), SDLORA_FULL=1.
#[test]
fn full_size_matches_diffusers() {
    if !full_enabled() {
        eprintln!("skipped: set SDLORA_FULL=1");
        return;
    }
    // SDLORA_UNET_FULL_DIR reuses fixtures made earlier (e.g. by scripts/bench); otherwise they
    // are generated into a temporary folder and deleted afterwards.
    let (dir, keep) = match std::env::var("SDLORA_UNET_FULL_DIR") {
        Ok(d) => (PathBuf::from(d), true),
        Err(_) => (
            std::env::temp_dir().join(format!("sdlora-unet-full-{}", std::process::id())),
            false,
        ),
    };
    for model in ["sd15", "sd21"] {
        let have = dir.join(format!("{model}.io.safetensors")).exists()
            && dir.join(format!("{model}.weights.safetensors")).exists();
        if !have {
            generate(&dir, &[model], true);
        }
        // The Rust side holds the weights plus grads too: take the same lock.
        let lock = std::fs::File::create("/tmp/sdlora-bigmem.lock").unwrap();
        flock(&lock);
        let expected = if model == "sd15" {
            UNetConfig::sd1()
        } else {
            UNetConfig {
                upcast_attention: true,
                ..UNetConfig::sd2()
            }
        };
        assert_eq!(config(&dir, model), expected);
        check_forward(&dir, model, &[model], 1e-3);
        check_grads(&dir, model, model, AttentionBackend::Math, 1e-3);
        drop(lock);
        if !keep {
            for f in ["weights", "io"] {
                let _ = std::fs::remove_file(dir.join(format!("{model}.{f}.safetensors")));
            }
        }
    }
}

fn flock(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock /tmp/sdlora-bigmem.lock failed");
}
