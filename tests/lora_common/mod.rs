//! Test support for the LoRA tests: a layer skeleton of the SD UNet / CLIP text encoder built
//! from the model configs (weights are zero-strided views, so full SD1/SD2 trees cost no memory),
//! exposing its layers through `VisitLayers` in sd-scripts' `named_modules()` order. It stands in
//! for the real models until they are merged, and writes/reads tensors for the Python oracle.
#![allow(dead_code)]
use sdlora::lora::LoraNetwork;
use sdlora::models::config::{BlockKind, ClipTextConfig, UNetConfig};
use sdlora::models::layers::{Container, Conv2d, LayerInfo, LayerMut, Linear, VisitLayers};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

pub enum Layer {
    Linear(Linear),
    Conv(Conv2d),
}

pub struct Skeleton {
    pub layers: Vec<(String, Container, Layer)>,
}

fn w(shape: &[i64]) -> Tensor {
    Tensor::zeros([1], (Kind::Float, Device::Cpu))
        .reshape(vec![1; shape.len()])
        .expand(shape, false)
}

impl Skeleton {
    fn lin(&mut self, path: String, c: Container, inp: i64, out: i64) {
        self.layers
            .push((path, c, Layer::Linear(Linear::new(w(&[out, inp]), None))));
    }
    #[allow(clippy::too_many_arguments)]
    fn conv(&mut self, path: String, c: Container, inp: i64, out: i64, k: i64, s: i64, p: i64) {
        self.layers.push((
            path,
            c,
            Layer::Conv(Conv2d::new(w(&[out, inp, k, k]), None, s, p)),
        ));
    }

    fn transformer(&mut self, p: &str, ch: i64, cfg: &UNetConfig) {
        let c = Container::Transformer2D;
        if cfg.use_linear_projection {
            self.lin(format!("{p}.proj_in"), c, ch, ch);
        } else {
            self.conv(format!("{p}.proj_in"), c, ch, ch, 1, 1, 0);
        }
        let b = format!("{p}.transformer_blocks.0");
        for q in ["to_q", "to_k", "to_v", "to_out.0"] {
            self.lin(format!("{b}.attn1.{q}"), c, ch, ch);
        }
        self.lin(format!("{b}.ff.net.0.proj"), c, ch, ch * 8);
        self.lin(format!("{b}.ff.net.2"), c, ch * 4, ch);
        for q in ["to_q", "to_k", "to_v", "to_out.0"] {
            let inp = if q == "to_k" || q == "to_v" {
                cfg.cross_attention_dim
            } else {
                ch
            };
            self.lin(format!("{b}.attn2.{q}"), c, inp, ch);
        }
        if cfg.use_linear_projection {
            self.lin(format!("{p}.proj_out"), c, ch, ch);
        } else {
            self.conv(format!("{p}.proj_out"), c, ch, ch, 1, 1, 0);
        }
    }

    fn resnet(&mut self, p: &str, inp: i64, out: i64, temb: i64) {
        let c = Container::ResnetBlock2D;
        self.conv(format!("{p}.conv1"), c, inp, out, 3, 1, 1);
        self.lin(format!("{p}.time_emb_proj"), c, temb, out);
        self.conv(format!("{p}.conv2"), c, out, out, 3, 1, 1);
        if inp != out {
            self.conv(format!("{p}.conv_shortcut"), c, inp, out, 1, 1, 0);
        }
    }

    /// The UNet's wrappable layers in sd-scripts' order (down blocks, up blocks, mid block;
    /// attentions before resnets; attn1, ff, attn2 inside a transformer block).
    pub fn unet(cfg: &UNetConfig) -> Self {
        let mut s = Skeleton { layers: vec![] };
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let temb = cfg.time_embed_dim();
        let lpb = cfg.layers_per_block;
        let mut out_ch = boc[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let inp = out_ch;
            out_ch = boc[i];
            let p = format!("down_blocks.{i}");
            if *kind == BlockKind::CrossAttn {
                for j in 0..lpb {
                    s.transformer(&format!("{p}.attentions.{j}"), out_ch, cfg);
                }
            }
            for j in 0..lpb {
                s.resnet(
                    &format!("{p}.resnets.{j}"),
                    if j == 0 { inp } else { out_ch },
                    out_ch,
                    temb,
                );
            }
            if i + 1 < n {
                s.conv(
                    format!("{p}.downsamplers.0.conv"),
                    Container::Downsample2D,
                    out_ch,
                    out_ch,
                    3,
                    2,
                    1,
                );
            }
        }
        let rev: Vec<i64> = boc.iter().rev().cloned().collect();
        let mut prev_out = rev[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let out = rev[i];
            let inp = rev[(i + 1).min(n - 1)];
            let p = format!("up_blocks.{i}");
            if *kind == BlockKind::CrossAttn {
                for j in 0..=lpb {
                    s.transformer(&format!("{p}.attentions.{j}"), out, cfg);
                }
            }
            for j in 0..=lpb {
                let skip = if j == lpb { inp } else { out };
                let rin = if j == 0 { prev_out } else { out };
                s.resnet(&format!("{p}.resnets.{j}"), rin + skip, out, temb);
            }
            if i + 1 < n {
                s.conv(
                    format!("{p}.upsamplers.0.conv"),
                    Container::Upsample2D,
                    out,
                    out,
                    3,
                    1,
                    1,
                );
            }
            prev_out = out;
        }
        let c = boc[n - 1];
        s.transformer("mid_block.attentions.0", c, cfg);
        s.resnet("mid_block.resnets.0", c, c, temb);
        s.resnet("mid_block.resnets.1", c, c, temb);
        s
    }

    /// CLIPTextModel's attention/MLP linears in transformers' registration order (k, v, q, out).
    pub fn clip(cfg: &ClipTextConfig) -> Self {
        let mut s = Skeleton { layers: vec![] };
        let h = cfg.hidden_size;
        for i in 0..cfg.num_hidden_layers {
            let p = format!("text_model.encoder.layers.{i}");
            for q in ["k_proj", "v_proj", "q_proj", "out_proj"] {
                s.lin(format!("{p}.self_attn.{q}"), Container::ClipAttention, h, h);
            }
            s.lin(
                format!("{p}.mlp.fc1"),
                Container::ClipMlp,
                h,
                cfg.intermediate_size,
            );
            s.lin(
                format!("{p}.mlp.fc2"),
                Container::ClipMlp,
                cfg.intermediate_size,
                h,
            );
        }
        s
    }

    pub fn attached(&self) -> usize {
        self.layers
            .iter()
            .filter(|(_, _, l)| match l {
                Layer::Linear(l) => l.adapter.is_some(),
                Layer::Conv(c) => c.adapter.is_some(),
            })
            .count()
    }
}

impl VisitLayers for Skeleton {
    fn visit_layers(&mut self, f: &mut dyn FnMut(&LayerInfo<'_>, LayerMut<'_>)) {
        for (path, c, l) in self.layers.iter_mut() {
            let info = LayerInfo {
                path,
                container: *c,
            };
            match l {
                Layer::Linear(l) => f(&info, LayerMut::Linear(l)),
                Layer::Conv(c) => f(&info, LayerMut::Conv2d(c)),
            }
        }
    }
}

pub fn python() -> String {
    std::env::var("SDLORA_PYTHON")
        .unwrap_or_else(|_| "/root/.cache/sdlora/venv/bin/python".to_string())
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh scratch directory under target/.
pub fn scratch(name: &str) -> PathBuf {
    let d = repo().join("target").join("lora-tests").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs a Python oracle script; panics with its stderr on failure.
pub fn run_python(args: &[&str]) {
    let out = std::process::Command::new(python())
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run the Python oracle (set SDLORA_PYTHON)");
    assert!(
        out.status.success(),
        "python {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn dtype_of(t: &Tensor) -> String {
    sdlora::lora::file::dtype_name(t.kind())
}

/// Asserts the network's modules (order, names, down/up shapes, scale, alpha value and dtype)
/// equal the oracle's list for one case of scripts/lora_module_list.py.
pub fn compare_with_oracle(key: &str, net: &LoraNetwork, exp: &[serde_json::Value]) {
    let got: Vec<_> = net.all_modules().collect();
    let names: Vec<&str> = got.iter().map(|m| m.name.as_str()).collect();
    let exp_names: Vec<&str> = exp.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, exp_names, "{key}: module names/order differ");
    let shape = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    for (m, e) in got.iter().zip(exp) {
        let (d, u) = m.parameters();
        assert_eq!(d.size(), shape(&e["down"]), "{key} {}", m.name);
        assert_eq!(u.size(), shape(&e["up"]), "{key} {}", m.name);
        assert_eq!(m.scale, e["scale"].as_f64().unwrap(), "{key} {}", m.name);
        let a = m.alpha();
        assert_eq!(
            a.to_kind(Kind::Double).double_value(&[]),
            e["alpha"].as_f64().unwrap(),
            "{key} {}",
            m.name
        );
        assert_eq!(
            dtype_of(&a),
            e["alpha_dtype"].as_str().unwrap(),
            "{key} {}",
            m.name
        );
    }
    eprintln!(
        "{key}: {} text-encoder + {} UNet modules match the oracle",
        net.text_encoder_loras.len(),
        net.unet_loras.len()
    );
}

/// Random lora_up (randn·0.1) so the LoRA has an effect.
pub fn randomize_up(net: &LoraNetwork) {
    for m in net.all_modules() {
        let (_, mut u) = m.parameters();
        tch::no_grad(|| {
            let r = Tensor::randn_like(&u) * 0.1;
            u.copy_(&r);
        });
    }
}
