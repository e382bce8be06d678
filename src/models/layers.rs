//! The two layer kinds LoRA can wrap, and the visitor through which the LoRA network finds them.
//!
//! Model weights are plain tensors (not a VarStore): checkpoints are loaded straight into them,
//! frozen, in the weight dtype. A LoRA module attaches itself to a layer as an [`Adapter`]; the
//! layer's forward then adds the adapter's term to its own output, as sd-scripts' LoRAModule
//! replaces `org_module.forward` (spec: sdscripts_model_math.md §3).
use std::sync::Arc;
use tch::Tensor;

/// Something added to a wrapped layer's output: for LoRA, `up(down(x)) * multiplier * scale`.
/// The adapter owns its parameters and its training/dropout state.
pub trait Adapter: Send + Sync + std::fmt::Debug {
    /// The term added to the wrapped layer's output for input `x` (same shape as that output).
    fn delta(&self, x: &Tensor) -> Tensor;
}

/// `torch.nn.Linear`: `x @ weight.T + bias`.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub adapter: Option<Arc<dyn Adapter>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            adapter: None,
        }
    }
    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }
    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.linear(&self.weight, self.bias.as_ref());
        match &self.adapter {
            Some(a) => y + a.delta(x),
            None => y,
        }
    }
}

/// `torch.nn.Conv2d` (no groups, no dilation: all SD convs).
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: i64,
    pub padding: i64,
    pub adapter: Option<Arc<dyn Adapter>>,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, stride: i64, padding: i64) -> Self {
        Conv2d {
            weight,
            bias,
            stride,
            padding,
            adapter: None,
        }
    }
    pub fn in_channels(&self) -> i64 {
        self.weight.size()[1]
    }
    pub fn out_channels(&self) -> i64 {
        self.weight.size()[0]
    }
    /// (kh, kw)
    pub fn kernel_size(&self) -> (i64, i64) {
        let s = self.weight.size();
        (s[2], s[3])
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        );
        match &self.adapter {
            Some(a) => y + a.delta(x),
            None => y,
        }
    }
}

/// The module classes sd-scripts' LoRA targets by class name (§3): the layers inside them are
/// the candidates for wrapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Container {
    /// UNet `Transformer2DModel` (sd-scripts: always targeted).
    Transformer2D,
    /// UNet `ResnetBlock2D` (targeted with `conv_dim`).
    ResnetBlock2D,
    /// UNet `Downsample2D` (targeted with `conv_dim`).
    Downsample2D,
    /// UNet `Upsample2D` (targeted with `conv_dim`).
    Upsample2D,
    /// Text encoder `CLIPAttention`.
    ClipAttention,
    /// Text encoder `CLIPMLP`.
    ClipMlp,
}

/// A wrappable layer, handed out mutably so an adapter can be attached.
pub enum LayerMut<'a> {
    Linear(&'a mut Linear),
    Conv2d(&'a mut Conv2d),
}

/// Where a layer sits: its Diffusers/transformers module path (e.g.
/// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, or for the text encoder
/// `text_model.encoder.layers.0.self_attn.q_proj`) and the targeted container it is inside.
pub struct LayerInfo<'a> {
    pub path: &'a str,
    pub container: Container,
}

/// Models implement this to expose every Linear/Conv2d inside a targeted container, in the order
/// the container's modules are registered in the model (sd-scripts' `named_modules()` order).
pub trait VisitLayers {
    fn visit_layers(&mut self, f: &mut dyn FnMut(&LayerInfo<'_>, LayerMut<'_>));
}
