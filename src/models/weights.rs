//! Named tensors on their way into a model. Loaders (single-file LDM, Diffusers folders, test
//! fixtures) fill a [`WeightMap`] under Diffusers/transformers parameter names; model
//! constructors `take` what they need; `finish` reports whatever nobody took. Every error names the
//! source file and the key, so a wrong checkpoint is diagnosed before training starts.
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

pub struct WeightMap {
    tensors: BTreeMap<String, Tensor>,
    /// Where the tensors came from (a file or folder), for error messages.
    pub source: String,
    /// Device and dtype every taken floating-point tensor is converted to.
    pub device: Device,
    pub kind: Kind,
}

impl WeightMap {
    pub fn new(source: impl Into<String>, device: Device, kind: Kind) -> Self {
        WeightMap {
            tensors: BTreeMap::new(),
            source: source.into(),
            device,
            kind,
        }
    }

    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.tensors.insert(name.into(), t);
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Borrow a tensor without taking it (e.g. to read a shape while detecting a config).
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Removes and returns `name`, converted to the map's device and dtype, frozen.
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        let Some(t) = self.tensors.remove(name) else {
            bail!(
                "{}: missing key `{name}` (is this the right kind of checkpoint?)",
                self.source
            )
        };
        let t = if t.is_floating_point() {
            t.to_device(self.device).to_kind(self.kind)
        } else {
            t.to_device(self.device)
        };
        Ok(t.set_requires_grad(false))
    }

    /// Like [`take`](Self::take), and checks the shape.
    pub fn take_shaped(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let t = self.take(name)?;
        if t.size() != shape {
            bail!(
                "{}: key `{name}` has shape {:?}, expected {:?}",
                self.source,
                t.size(),
                shape
            );
        }
        Ok(t)
    }

    /// Takes `name` if present.
    pub fn take_opt(&mut self, name: &str) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.take(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Errors if any tensor was not taken by the model (unexpected keys), naming the first few.
    pub fn finish(self) -> Result<()> {
        if self.tensors.is_empty() {
            return Ok(());
        }
        let first: Vec<&str> = self.tensors.keys().take(5).map(|s| s.as_str()).collect();
        bail!(
            "{}: {} unexpected key(s), e.g. {}",
            self.source,
            self.tensors.len(),
            first.join(", ")
        )
    }
}
