//! SAI ModelSpec 1.0.1 metadata (`modelspec.*` keys) as sd-scripts' `sai_model_spec.build_metadata`
//! writes it for SD1.x/2.x models, LoRAs and Textual Inversion embeddings. The trainers and the
//! tools build theirs from this one description, so the values agree everywhere.
use crate::lora::metadata::{local_iso_datetime, py_float};
use std::collections::BTreeMap;

/// What the `modelspec.*` keys say about a file.
#[derive(Debug, Clone, Default)]
pub struct ModelSpec {
    pub v2: bool,
    pub v_parameterization: bool,
    /// "lora", "textual-inversion", or None for a checkpoint.
    pub adapter: Option<&'static str>,
    /// None → "LoRA@<timestamp>" / "TextualInversion@…" / "Checkpoint@…".
    pub title: Option<String>,
    /// None → 512×512, or 768×768 for SD2 v-prediction.
    pub resolution: Option<(i64, i64)>,
    pub description: Option<String>,
    pub author: Option<String>,
    pub license: Option<String>,
    pub tags: Option<String>,
    pub merged_from: Option<String>,
    /// "min,max".
    pub timestep_range: Option<String>,
    pub encoder_layer: Option<String>,
    /// Further fields (`usage_hint`, `trigger_phrase`, …) without the `modelspec.` prefix.
    pub extra: Vec<(String, String)>,
    /// Written unless `extra` has an `implementation_version` (sd-scripts: "sd-scripts/<commit>").
    pub implementation_version: String,
}

/// sd-scripts' `IMPL_STABILITY_AI`, the implementation of a full SD checkpoint (and of TI).
const IMPL_STABILITY_AI: &str = "https://github.com/Stability-AI/generative-models";
const IMPL_DIFFUSERS: &str = "diffusers";

impl ModelSpec {
    pub fn new(v2: bool, v_parameterization: bool, adapter: Option<&'static str>) -> Self {
        ModelSpec {
            v2,
            v_parameterization,
            adapter,
            implementation_version: format!("sdlora/{}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        }
    }

    /// The `modelspec.*` keys, dated `timestamp` (Unix seconds, as `time.time()`).
    pub fn keys(&self, timestamp: f64) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(format!("modelspec.{k}"), v);
        };
        let arch = match (self.v2, self.v_parameterization) {
            (false, _) => "stable-diffusion-v1",
            (true, false) => "stable-diffusion-v2-512",
            (true, true) => "stable-diffusion-v2-768-v",
        };
        put(
            "architecture",
            match self.adapter {
                Some(a) => format!("{arch}/{a}"),
                None => arch.to_string(),
            },
        );
        // A LoRA for SD1/SD2 is "diffusers"; a checkpoint and a TI embedding are Stability's.
        let implementation = match self.adapter {
            Some("lora") => IMPL_DIFFUSERS,
            _ => IMPL_STABILITY_AI,
        };
        put("implementation", implementation.into());
        let title = self.title.clone().unwrap_or_else(|| {
            let kind = match self.adapter {
                Some("lora") => "LoRA",
                Some(_) => "TextualInversion",
                None => "Checkpoint",
            };
            format!("{kind}@{}", py_float(timestamp))
        });
        put("title", title);
        let reso = self
            .resolution
            .unwrap_or(if self.v2 && self.v_parameterization {
                (768, 768)
            } else {
                (512, 512)
            });
        put("resolution", format!("{}x{}", reso.0, reso.1));
        put("sai_model_spec", "1.0.1".into());
        let opt = [
            ("description", &self.description),
            ("author", &self.author),
            ("license", &self.license),
            ("tags", &self.tags),
            ("merged_from", &self.merged_from),
            ("timestep_range", &self.timestep_range),
            ("encoder_layer", &self.encoder_layer),
        ];
        for (k, v) in opt {
            if let Some(v) = v {
                put(k, v.clone());
            }
        }
        put("date", local_iso_datetime(timestamp));
        put(
            "prediction_type",
            if self.v_parameterization {
                "v"
            } else {
                "epsilon"
            }
            .into(),
        );
        let mut has_impl_version = false;
        for (k, v) in &self.extra {
            has_impl_version |= k == "implementation_version";
            put(k, v.clone());
        }
        if !has_impl_version {
            put(
                "implementation_version",
                self.implementation_version.clone(),
            );
        }
        m
    }
}
