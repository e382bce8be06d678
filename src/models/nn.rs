//! Normalisation layers shared by the UNet, the VAE and CLIP, loaded from a [`WeightMap`].
use super::layers::{Conv2d, Linear};
use super::weights::WeightMap;
use anyhow::Result;
use tch::Tensor;

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// `torch.nn.GroupNorm` (affine).
#[derive(Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: i64,
    pub eps: f64,
}

impl GroupNorm {
    pub fn load(w: &mut WeightMap, prefix: &str, groups: i64, eps: f64) -> Result<Self> {
        Ok(GroupNorm {
            weight: w.take(&join(prefix, "weight"))?,
            bias: w.take(&join(prefix, "bias"))?,
            groups,
            eps,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// `torch.nn.LayerNorm` over the last dimension (affine).
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(w: &mut WeightMap, prefix: &str, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.take(&join(prefix, "weight"))?,
            bias: w.take(&join(prefix, "bias"))?,
            eps,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let n = *self.weight.size().last().unwrap();
        x.layer_norm([n], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

impl Linear {
    /// Loads `{prefix}.weight` and, when `bias`, `{prefix}.bias`.
    pub fn load(w: &mut WeightMap, prefix: &str, bias: bool) -> Result<Self> {
        let weight = w.take(&join(prefix, "weight"))?;
        let b = if bias {
            Some(w.take(&join(prefix, "bias"))?)
        } else {
            None
        };
        Ok(Linear::new(weight, b))
    }
}

impl Conv2d {
    /// Loads `{prefix}.weight` and `{prefix}.bias`.
    pub fn load(w: &mut WeightMap, prefix: &str, stride: i64, padding: i64) -> Result<Self> {
        let weight = w.take(&join(prefix, "weight"))?;
        let b = w.take(&join(prefix, "bias"))?;
        Ok(Conv2d::new(weight, Some(b), stride, padding))
    }
}

/// `prefix.name`, or `name` when the prefix is empty.
pub fn key(prefix: &str, name: &str) -> String {
    join(prefix, name)
}
