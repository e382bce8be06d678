//! The CLIP text encoder (transformers `CLIPTextModel`), SD1 (OpenAI ViT-L/14) and SD2 (OpenCLIP
//! ViT-H/14, 23 layers) shapes, with sd-scripts' `clip_skip` (spec: sdscripts_model_math.md §1.2,
//! §1.4, §2.4). Parameter names are transformers', so a `text_encoder/` folder or a converted LDM
//! checkpoint loads by name.
use super::attention::{attention, AttentionBackend, AttentionOptions};
use super::config::{ClipActivation, ClipTextConfig};
use super::layers::{Container, LayerInfo, LayerMut, Linear, VisitLayers};
use super::nn::{key, LayerNorm};
use super::recompute::{checkpoint, Tape};
use super::weights::WeightMap;
use anyhow::{bail, Result};
use tch::Tensor;

/// `CLIPAttention`: multi-head self-attention with biases on all four projections.
#[derive(Debug)]
pub struct ClipAttention {
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub q_proj: Linear,
    pub out_proj: Linear,
    pub num_heads: i64,
    pub head_dim: i64,
}

impl ClipAttention {
    fn load(w: &mut WeightMap, prefix: &str, cfg: &ClipTextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let lin = |w: &mut WeightMap, name: &str| -> Result<Linear> {
            let p = key(prefix, name);
            let weight = w.take_shaped(&key(&p, "weight"), &[h, h])?;
            let bias = w.take_shaped(&key(&p, "bias"), &[h])?;
            Ok(Linear::new(weight, Some(bias)))
        };
        Ok(ClipAttention {
            k_proj: lin(w, "k_proj")?,
            v_proj: lin(w, "v_proj")?,
            q_proj: lin(w, "q_proj")?,
            out_proj: lin(w, "out_proj")?,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `x`: (B, S, hidden), causal self-attention.
    fn forward(&self, x: &Tensor, backend: AttentionBackend) -> Tensor {
        let (b, s, _) = x.size3().unwrap();
        let split = |t: Tensor| {
            t.view([b, s, self.num_heads, self.head_dim])
                .transpose(1, 2)
        };
        let q = split(self.q_proj.forward(x));
        let k = split(self.k_proj.forward(x));
        let v = split(self.v_proj.forward(x));
        // transformers' eager path does the softmax in fp32 (honoured by the Math backend). Its
        // causal mask adds finfo(dtype).min above the diagonal; masking with -inf gives the same
        // probabilities (every row keeps its diagonal), so the shared causal option is exact.
        let opts = AttentionOptions {
            causal: true,
            softmax_fp32: true,
            ..Default::default()
        };
        let o = attention(&q, &k, &v, backend, opts)
            .transpose(1, 2)
            .contiguous()
            .view([b, s, self.num_heads * self.head_dim]);
        self.out_proj.forward(&o)
    }
}

/// `CLIPMLP`: fc1 → activation → fc2.
#[derive(Debug)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub act: ClipActivation,
}

impl ClipMlp {
    fn load(w: &mut WeightMap, prefix: &str, cfg: &ClipTextConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let fc1 = Linear::new(
            w.take_shaped(&key(prefix, "fc1.weight"), &[i, h])?,
            Some(w.take_shaped(&key(prefix, "fc1.bias"), &[i])?),
        );
        let fc2 = Linear::new(
            w.take_shaped(&key(prefix, "fc2.weight"), &[h, i])?,
            Some(w.take_shaped(&key(prefix, "fc2.bias"), &[h])?),
        );
        Ok(ClipMlp {
            fc1,
            fc2,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.fc1.forward(x);
        let h = match self.act {
            ClipActivation::QuickGelu => &h * (&h * 1.702).sigmoid(),
            ClipActivation::Gelu => h.gelu("none"),
        };
        self.fc2.forward(&h)
    }
}

/// `CLIPEncoderLayer`: pre-LayerNorm residual attention and MLP.
#[derive(Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn load(w: &mut WeightMap, prefix: &str, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(ClipEncoderLayer {
            self_attn: ClipAttention::load(w, &key(prefix, "self_attn"), cfg)?,
            layer_norm1: LayerNorm::load(w, &key(prefix, "layer_norm1"), cfg.layer_norm_eps)?,
            mlp: ClipMlp::load(w, &key(prefix, "mlp"), cfg)?,
            layer_norm2: LayerNorm::load(w, &key(prefix, "layer_norm2"), cfg.layer_norm_eps)?,
        })
    }

    pub fn forward(&self, x: &Tensor, backend: AttentionBackend) -> Tensor {
        let h = x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x), backend);
        let m = self.mlp.forward(&self.layer_norm2.forward(&h));
        h + m
    }
}

/// transformers `CLIPTextModel` (its `text_model`), without the pooled output sd-scripts never
/// uses for SD1/SD2.
#[derive(Debug)]
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    pub token_embedding: Tensor,
    pub position_embedding: Tensor,
    pub layers: Vec<ClipEncoderLayer>,
    pub final_layer_norm: LayerNorm,
    /// How attention is computed. Default `Sdpa`: libtorch's fused kernel, which is what
    /// transformers 4.54 uses by default (`attn_implementation="sdpa"`), bit-identical to it in
    /// fp32 on CPU. `Math` = transformers' eager attention (fp32 softmax); same function,
    /// different rounding (~1e-6 in fp32).
    pub backend: AttentionBackend,
}

const PREFIX: &str = "text_model";

impl ClipTextModel {
    /// Takes every `text_model.*` tensor from `w` (transformers names); the non-parameter
    /// buffer `text_model.embeddings.position_ids` is dropped if present. Other keys are left
    /// for the caller's `finish`.
    pub fn load(w: &mut WeightMap, config: &ClipTextConfig) -> Result<Self> {
        let cfg = config.clone();
        let (v, h, p) = (cfg.vocab_size, cfg.hidden_size, cfg.max_position_embeddings);
        let _ = w.take_opt(&key(PREFIX, "embeddings.position_ids"))?;
        let token_embedding =
            w.take_shaped(&key(PREFIX, "embeddings.token_embedding.weight"), &[v, h])?;
        let position_embedding = w.take_shaped(
            &key(PREFIX, "embeddings.position_embedding.weight"),
            &[p, h],
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::load(w, &format!("{PREFIX}.encoder.layers.{i}"), &cfg))
            .collect::<Result<Vec<_>>>()?;
        let extra = format!("{PREFIX}.encoder.layers.{}.", cfg.num_hidden_layers);
        if w.keys().any(|k| k.starts_with(&extra)) {
            bail!(
                "{}: has more than {} text encoder layers (`{extra}*`); the config does not match the checkpoint",
                w.source,
                cfg.num_hidden_layers
            );
        }
        let final_layer_norm =
            LayerNorm::load(w, &key(PREFIX, "final_layer_norm"), cfg.layer_norm_eps)?;
        Ok(ClipTextModel {
            config: cfg,
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            backend: AttentionBackend::Sdpa,
        })
    }

    /// Checks a `--clip_skip` value against this encoder: `hidden_states[-k]` must exist.
    pub fn check_clip_skip(&self, clip_skip: Option<i64>) -> Result<()> {
        if let Some(k) = clip_skip {
            let n = self.config.num_hidden_layers;
            if k < 1 || k > n + 1 {
                bail!(
                    "--clip_skip {k} is out of range: the text encoder has {n} layers (use 1..={})",
                    n + 1
                );
            }
        }
        Ok(())
    }

    /// Token + position embeddings, (B, S, hidden).
    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        let s = input_ids.size()[1];
        let tok = Tensor::embedding(&self.token_embedding, input_ids, -1, false, false);
        tok + self.position_embedding.narrow(0, 0, s)
    }

    /// How many encoder layers run for `clip_skip` (`hidden_states[-k]` is the output of layer
    /// `n + 1 - k`; k = 1 is the last layer).
    pub fn layers_for(&self, clip_skip: Option<i64>) -> usize {
        let n = self.config.num_hidden_layers;
        match clip_skip {
            None => n as usize,
            Some(k) => {
                assert!(
                    (1..=n + 1).contains(&k),
                    "clip_skip {k} out of range for a {n}-layer text encoder"
                );
                (n + 1 - k) as usize
            }
        }
    }

    /// `input_ids` (B, S ≤ max_position_embeddings), int64 → (B, S, hidden).
    /// `clip_skip = None`: `last_hidden_state`; `Some(k)`: `final_layer_norm(hidden_states[-k])`
    /// as sd-scripts' `SdTextEncodingStrategy.encode_tokens`. No padding mask (sd-scripts passes
    /// none), so pad tokens attend causally like any other token.
    pub fn forward(&self, input_ids: &Tensor, clip_skip: Option<i64>) -> Tensor {
        self.forward_with_tape(input_ids, clip_skip, None)
    }

    /// [`forward`](Self::forward) with gradient checkpointing: with a tape, every encoder layer
    /// is a recomputed segment (transformers checkpoints each `CLIPEncoderLayer`, spec §6).
    pub fn forward_with_tape<'a>(
        &'a self,
        input_ids: &Tensor,
        clip_skip: Option<i64>,
        tape: Option<&Tape<'a>>,
    ) -> Tensor {
        let s = input_ids.size()[1];
        assert!(
            s <= self.config.max_position_embeddings,
            "text encoder input has {s} positions, more than max_position_embeddings {}",
            self.config.max_position_embeddings
        );
        let mut h = self.embed(input_ids);
        let backend = self.backend;
        for layer in &self.layers[..self.layers_for(clip_skip)] {
            h = checkpoint(tape, &[&h], move |xs: &[Tensor]| {
                layer.forward(&xs[0], backend)
            });
        }
        self.final_layer_norm.forward(&h)
    }
}

impl VisitLayers for ClipTextModel {
    /// transformers registration order: per layer `self_attn` (k, v, q, out_proj) then `mlp`
    /// (fc1, fc2) — sd-scripts' LoRA module order.
    fn visit_layers(&mut self, f: &mut dyn FnMut(&LayerInfo<'_>, LayerMut<'_>)) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let base = format!("{PREFIX}.encoder.layers.{i}");
            let a = &mut layer.self_attn;
            for (name, lin) in [
                ("k_proj", &mut a.k_proj),
                ("v_proj", &mut a.v_proj),
                ("q_proj", &mut a.q_proj),
                ("out_proj", &mut a.out_proj),
            ] {
                let path = format!("{base}.self_attn.{name}");
                f(
                    &LayerInfo {
                        path: &path,
                        container: Container::ClipAttention,
                    },
                    LayerMut::Linear(lin),
                );
            }
            let m = &mut layer.mlp;
            for (name, lin) in [("fc1", &mut m.fc1), ("fc2", &mut m.fc2)] {
                let path = format!("{base}.mlp.{name}");
                f(
                    &LayerInfo {
                        path: &path,
                        container: Container::ClipMlp,
                    },
                    LayerMut::Linear(lin),
                );
            }
        }
    }
}
