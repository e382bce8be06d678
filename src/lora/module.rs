//! One LoRA module: the trainable `lora_down` / `lora_up` pair attached to a wrapped Linear or
//! Conv2d (spec: sdscripts_model_math.md §3.2, sd-scripts `networks/lora.py::LoRAModule`).
use crate::models::layers::Adapter;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// The wrapped layer's geometry, which fixes the LoRA tensors' shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrappedKind {
    Linear,
    /// `lora_down` copies the wrapped conv's kernel, stride and padding; `lora_up` is 1×1.
    Conv2d {
        kernel: (i64, i64),
        stride: i64,
        padding: i64,
    },
}

impl WrappedKind {
    /// 1×1 convs count as "linear" for rank selection (they get `network_dim`, not `conv_dim`).
    pub fn is_linear_like(&self) -> bool {
        match self {
            WrappedKind::Linear => true,
            WrappedKind::Conv2d { kernel, .. } => *kernel == (1, 1),
        }
    }
}

/// The value of the `alpha` buffer and its dtype. sd-scripts stores `torch.tensor(alpha)`, so a
/// Python int (the `--network_alpha` default 1, or alpha=rank fallback) gives an int64 buffer and
/// a float gives float32 (spec: sdscripts_cli_data.md §5.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Alpha {
    pub value: f64,
    pub kind: Kind,
    /// Read from a file's tensor: sd-scripts turns it into a numpy float32, so `alpha / rank`
    /// is then computed in float32 (`create_network_from_weights`).
    pub from_tensor: bool,
}

impl Alpha {
    pub fn int(v: i64) -> Self {
        Alpha {
            value: v as f64,
            kind: Kind::Int64,
            from_tensor: false,
        }
    }
    pub fn float(v: f64) -> Self {
        Alpha {
            value: v,
            kind: Kind::Float,
            from_tensor: false,
        }
    }
    /// The alpha of a loaded file's `.alpha` tensor (float32 whatever its stored dtype).
    pub fn from_file_value(v: f64) -> Self {
        Alpha {
            value: (v as f32) as f64,
            kind: Kind::Float,
            from_tensor: true,
        }
    }
    /// `str(alpha)` as Python prints it: "1" for an int, "1.0" for a float.
    pub fn py_str(&self) -> String {
        match self.kind {
            Kind::Int64 => (self.value as i64).to_string(),
            _ => super::metadata::py_float(self.value),
        }
    }

    pub fn tensor(&self) -> Tensor {
        match self.kind {
            Kind::Int64 => Tensor::from(self.value as i64),
            _ => Tensor::from(self.value as f32),
        }
    }
}

#[derive(Debug)]
struct Params {
    down: Tensor,
    up: Tensor,
    alpha: Tensor,
}

/// A LoRA module. Parameters are fp32 leaf tensors with `requires_grad`; the mutex exists only
/// because `tch::Tensor` is not `Sync` and adapters are shared through `Arc`.
#[derive(Debug)]
pub struct LoraModule {
    /// sd-scripts name, e.g. `lora_unet_down_blocks_0_attentions_0_proj_in`.
    pub name: String,
    pub wrapped: WrappedKind,
    pub in_dim: i64,
    pub out_dim: i64,
    pub rank: i64,
    /// alpha / rank, fixed at creation: sd-scripts does not recompute it when `--network_weights`
    /// loads a different alpha (spec §3.4).
    pub scale: f64,
    pub dropout: Option<f64>,
    pub rank_dropout: Option<f64>,
    pub module_dropout: Option<f64>,
    params: Mutex<Params>,
    multiplier: AtomicU64,
    training: AtomicBool,
}

fn kaiming_uniform_bound(fan_in: i64) -> f64 {
    // torch.nn.init.kaiming_uniform_(w, a=sqrt(5)) with leaky_relu gain, in the same f64 steps
    // torch takes, so the bound (and thus the drawn numbers) is bit-identical.
    let a = 5f64.sqrt();
    let gain = (2.0 / (1.0 + a * a)).sqrt();
    let std = gain / (fan_in as f64).sqrt();
    3f64.sqrt() * std
}

impl LoraModule {
    /// Creates the module and draws its initial weights from the libtorch global CPU generator
    /// exactly as sd-scripts does: `nn.Linear`/`nn.Conv2d` constructors run their default
    /// kaiming init on down then up, then `kaiming_uniform_` re-initialises down and up is
    /// zeroed — three uniform fills per module (spec §3.2, RNG note).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        wrapped: WrappedKind,
        in_dim: i64,
        out_dim: i64,
        rank: i64,
        alpha: Option<Alpha>,
        multiplier: f64,
        dropout: Option<f64>,
        rank_dropout: Option<f64>,
        module_dropout: Option<f64>,
    ) -> Self {
        let (down_shape, up_shape, down_fan, up_fan) = match wrapped {
            WrappedKind::Linear => (vec![rank, in_dim], vec![out_dim, rank], in_dim, rank),
            WrappedKind::Conv2d { kernel, .. } => (
                vec![rank, in_dim, kernel.0, kernel.1],
                vec![out_dim, rank, 1, 1],
                in_dim * kernel.0 * kernel.1,
                rank,
            ),
        };
        let opts = (Kind::Float, Device::Cpu);
        let (down, up) = tch::no_grad(|| {
            let down_b = kaiming_uniform_bound(down_fan);
            let up_b = kaiming_uniform_bound(up_fan);
            let mut down = Tensor::empty(down_shape.as_slice(), opts);
            let _ = down.uniform_(-down_b, down_b);
            let mut up = Tensor::empty(up_shape.as_slice(), opts);
            let _ = up.uniform_(-up_b, up_b);
            let _ = down.uniform_(-down_b, down_b);
            let _ = up.zero_();
            (down, up)
        });
        // alpha None or 0 → rank (a Python int, hence int64).
        let alpha = match alpha {
            Some(a) if a.value != 0.0 => a,
            _ => Alpha::int(rank),
        };
        let scale = if alpha.from_tensor {
            ((alpha.value as f32) / rank as f32) as f64
        } else {
            alpha.value / rank as f64
        };
        LoraModule {
            name,
            wrapped,
            in_dim,
            out_dim,
            rank,
            scale,
            dropout,
            rank_dropout,
            module_dropout,
            params: Mutex::new(Params {
                down: down.set_requires_grad(true),
                up: up.set_requires_grad(true),
                alpha: alpha.tensor(),
            }),
            multiplier: AtomicU64::new(multiplier.to_bits()),
            training: AtomicBool::new(true),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Params> {
        self.params.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Shallow handles on the trainable tensors (down, up): they share storage and `.grad()` with
    /// the module, so an optimizer stepping them updates the module.
    pub fn parameters(&self) -> (Tensor, Tensor) {
        let p = self.lock();
        (p.down.shallow_clone(), p.up.shallow_clone())
    }

    pub fn alpha(&self) -> Tensor {
        self.lock().alpha.shallow_clone()
    }

    /// The module's tensors under their state-dict suffixes, in sd-scripts' `state_dict()` order
    /// (buffer `alpha` first, then the child modules).
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let p = self.lock();
        vec![
            (format!("{}.alpha", self.name), p.alpha.shallow_clone()),
            (
                format!("{}.lora_down.weight", self.name),
                p.down.shallow_clone(),
            ),
            (
                format!("{}.lora_up.weight", self.name),
                p.up.shallow_clone(),
            ),
        ]
    }

    pub fn multiplier(&self) -> f64 {
        f64::from_bits(self.multiplier.load(Ordering::Relaxed))
    }
    pub fn set_multiplier(&self, m: f64) {
        self.multiplier.store(m.to_bits(), Ordering::Relaxed);
    }
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }
    pub fn set_training(&self, t: bool) {
        self.training.store(t, Ordering::Relaxed);
    }

    /// Moves the parameters (and alpha) to `device`, keeping them fp32 leaves that require grad.
    /// Must happen before handles are given to an optimizer.
    pub fn to_device(&self, device: Device) {
        let mut p = self.lock();
        let down = p.down.detach().to_device(device).set_requires_grad(true);
        let up = p.up.detach().to_device(device).set_requires_grad(true);
        p.down = down;
        p.up = up;
        p.alpha = p.alpha.to_device(device);
    }

    /// Casts the parameters to `kind` (sd-scripts `--full_fp16`/`--full_bf16` cast the network);
    /// the int64 alpha stays int64 as `Module.to(dtype)` leaves integer buffers alone.
    pub fn to_kind(&self, kind: Kind) {
        let mut p = self.lock();
        let down = p.down.detach().to_kind(kind).set_requires_grad(true);
        let up = p.up.detach().to_kind(kind).set_requires_grad(true);
        p.down = down;
        p.up = up;
        if p.alpha.is_floating_point() {
            p.alpha = p.alpha.to_kind(kind);
        }
    }

    /// Overwrites the module's tensors from a loaded file (`load_state_dict` semantics: values
    /// are cast into the existing tensors' dtype; shapes must match).
    pub fn copy_from(
        &self,
        down: Option<&Tensor>,
        up: Option<&Tensor>,
        alpha: Option<&Tensor>,
    ) -> anyhow::Result<()> {
        let mut guard = self.lock();
        let p = &mut *guard;
        for (what, dst, src) in [
            ("lora_down.weight", &mut p.down, down),
            ("lora_up.weight", &mut p.up, up),
        ] {
            if let Some(src) = src {
                if src.size() != dst.size() {
                    anyhow::bail!(
                        "size mismatch for {}.{what}: the file has shape {:?}, the network expects {:?} \
                         (a different --network_dim/conv_dim? use --dim_from_weights to take ranks from the file)",
                        self.name,
                        src.size(),
                        dst.size()
                    );
                }
                tch::no_grad(|| dst.copy_(src));
            }
        }
        if let Some(a) = alpha {
            if a.numel() != 1 {
                anyhow::bail!(
                    "{}.alpha must be a scalar, the file has shape {:?}",
                    self.name,
                    a.size()
                );
            }
            let kind = p.alpha.kind();
            let dev = p.alpha.device();
            p.alpha = a.reshape([]).to_kind(kind).to_device(dev);
        }
        Ok(())
    }

    /// The wrapped layer's output shape for input `x`.
    fn output_shape(&self, x: &Tensor) -> Vec<i64> {
        let mut s = x.size();
        match self.wrapped {
            WrappedKind::Linear => {
                *s.last_mut().expect("input has at least one dim") = self.out_dim;
            }
            WrappedKind::Conv2d {
                kernel,
                stride,
                padding,
            } => {
                let n = s.len();
                s[n - 3] = self.out_dim;
                s[n - 2] = (s[n - 2] + 2 * padding - kernel.0) / stride + 1;
                s[n - 1] = (s[n - 1] + 2 * padding - kernel.1) / stride + 1;
            }
        }
        s
    }

    fn lora_down(&self, x: &Tensor, w: &Tensor) -> Tensor {
        match self.wrapped {
            WrappedKind::Linear => x.linear::<&Tensor>(w, None),
            WrappedKind::Conv2d {
                stride, padding, ..
            } => x.conv2d::<&Tensor>(w, None, [stride, stride], [padding, padding], [1, 1], 1),
        }
    }

    fn lora_up(&self, x: &Tensor, w: &Tensor) -> Tensor {
        match self.wrapped {
            WrappedKind::Linear => x.linear::<&Tensor>(w, None),
            WrappedKind::Conv2d { .. } => x.conv2d::<&Tensor>(w, None, [1, 1], [0, 0], [1, 1], 1),
        }
    }
}

impl Adapter for LoraModule {
    /// `lora_up(dropouts(lora_down(x))) * multiplier * scale`, the term sd-scripts adds to the
    /// original output (§3.2). Returns zeros when module dropout skips the module.
    fn delta(&self, x: &Tensor) -> Tensor {
        let training = self.is_training();
        if training {
            if let Some(p) = self.module_dropout {
                // `torch.rand(1) < p` on the CPU generator, compared in float32.
                let r = Tensor::rand([1], (Kind::Float, Device::Cpu)).double_value(&[0]) as f32;
                if r < p as f32 {
                    return Tensor::zeros(self.output_shape(x).as_slice(), (x.kind(), x.device()));
                }
            }
        }
        let (down, up) = {
            let p = self.lock();
            (p.down.shallow_clone(), p.up.shallow_clone())
        };
        // Under sd-scripts' autocast the LoRA matmuls run in the activation dtype; casting the
        // fp32 weights to x's dtype reproduces that (and is a no-op in fp32).
        let (down, up) = if down.kind() != x.kind() {
            (down.to_kind(x.kind()), up.to_kind(x.kind()))
        } else {
            (down, up)
        };
        let mut lx = self.lora_down(x, &down);
        if training {
            if let Some(p) = self.dropout {
                lx = lx.dropout(p, true);
            }
        }
        let mut scale = self.scale;
        if training {
            if let Some(p) = self.rank_dropout {
                let b = lx.size()[0];
                let mut mask = Tensor::rand([b, self.rank], (Kind::Float, lx.device())).gt(p);
                match lx.dim() {
                    3 => mask = mask.unsqueeze(1),
                    4 => mask = mask.unsqueeze(-1).unsqueeze(-1),
                    _ => {}
                }
                lx = &lx * &mask;
                scale *= 1.0 / (1.0 - p);
            }
        }
        let lx = self.lora_up(&lx, &up);
        lx * self.multiplier() * scale
    }
}
