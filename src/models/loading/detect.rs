//! Network configs of an LDM single file, read from its tensor shapes.
#![allow(unused_imports)]
use super::*;

pub(super) fn shape_of(st: &MappedSafetensors, key: &str) -> Result<Vec<i64>> {
    let info = st.info(key).with_context(|| {
        format!(
            "{}: missing key `{key}` needed to detect the architecture (incomplete checkpoint?)",
            st.path().display()
        )
    })?;
    Ok(info.shape.clone())
}

pub(super) fn dim(st: &MappedSafetensors, key: &str, d: usize) -> Result<i64> {
    let s = shape_of(st, key)?;
    s.get(d).copied().with_context(|| {
        format!(
            "{}: key `{key}` has shape {s:?}, which has no dimension {d}",
            st.path().display()
        )
    })
}

/// Distinct indices `i` of keys `{prefix}{i}.…`.
pub(super) fn indices(names: &[&str], prefix: &str) -> BTreeSet<usize> {
    names
        .iter()
        .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse().ok())
        .collect()
}

pub(super) fn parse_heads(st: &MappedSafetensors, key: &str) -> Result<Option<Vec<i64>>> {
    let Some(v) = st.metadata().get(key) else {
        return Ok(None);
    };
    let parsed: Option<Vec<i64>> = v.split(',').map(|x| x.trim().parse().ok()).collect();
    match parsed {
        Some(h) if !h.is_empty() && h.iter().all(|&x| x > 0) => Ok(Some(h)),
        _ => bail!(
            "{}: metadata `{key}` = {v:?} is not a comma-separated list of head counts",
            st.path().display()
        ),
    }
}

pub(super) fn heads_by_rule(
    st: &MappedSafetensors,
    version: SdVersion,
    widths: &[i64],
    what: &str,
) -> Result<Vec<i64>> {
    widths
        .iter()
        .map(|&c| {
            let h = match version {
                SdVersion::V1 if what == "UNet" => SD1_UNET_HEADS,
                _ => c / HEAD_DIM,
            };
            if h < 1 || c % h != 0 {
                bail!(
                    "{}: cannot infer the {what} attention head count for width {c} (the SD1/SD2 \
                     rule gives {h}); single files do not record it. Use a Diffusers folder, or \
                     add metadata `{}`",
                    st.path().display(),
                    if what == "UNet" {
                        META_UNET_HEADS
                    } else {
                        META_CLIP_HEADS
                    }
                );
            }
            Ok(h)
        })
        .collect()
}

pub(super) fn detect_unet_config(
    st: &MappedSafetensors,
    names: &[&str],
    version: SdVersion,
) -> Result<UNetConfig> {
    let path = st.path().display();
    let p = |s: &str| format!("{UNET_PREFIX}{s}");
    let inputs = indices(names, &p("input_blocks."));
    let ops: Vec<usize> = inputs
        .iter()
        .copied()
        .filter(|n| {
            names
                .iter()
                .any(|k| k.starts_with(&p(&format!("input_blocks.{n}.0.op."))))
        })
        .collect();
    let max_in = inputs.iter().max().copied().unwrap_or(0);
    let (levels, lpb) = match ops.first() {
        Some(&first) => (ops.len() + 1, first - 1),
        None => (1, max_in),
    };
    if lpb == 0 || max_in + 1 != levels * (lpb + 1) {
        bail!(
            "{path}: cannot make sense of the UNet's input_blocks (found indices up to {max_in}, \
             downsamplers at {ops:?}); not an SD1/SD2 UNet?"
        );
    }
    let per = lpb + 1;
    let mut block_out_channels = Vec::new();
    let mut down_block_types = Vec::new();
    let mut up_block_types = Vec::new();
    let has = |k: String| names.iter().any(|n| **n == k);
    for b in 0..levels {
        let n = 1 + b * per;
        block_out_channels.push(dim(
            st,
            &p(&format!("input_blocks.{n}.0.out_layers.3.weight")),
            0,
        )?);
        down_block_types.push(if has(p(&format!("input_blocks.{n}.1.proj_in.weight"))) {
            BlockKind::CrossAttn
        } else {
            BlockKind::Plain
        });
        up_block_types.push(
            if has(p(&format!("output_blocks.{}.1.proj_in.weight", b * per))) {
                BlockKind::CrossAttn
            } else {
                BlockKind::Plain
            },
        );
    }
    let attn = names
        .iter()
        .find(|k| k.starts_with(UNET_PREFIX) && k.ends_with(".attn2.to_k.weight"))
        .with_context(|| format!("{path}: the UNet has no cross-attention (attn2) layers"))?;
    let cross_attention_dim = dim(st, attn, 1)?;
    let proj = names
        .iter()
        .find(|k| k.starts_with(UNET_PREFIX) && k.ends_with(".proj_in.weight"))
        .with_context(|| format!("{path}: the UNet has no proj_in layers"))?;
    // Only checks the layer exists: SD2 files store Linear projections, SD1 files 1×1 convs, and
    // both are loaded as convs below.
    let _ = shape_of(st, proj)?;
    let num_heads = match parse_heads(st, META_UNET_HEADS)? {
        Some(h) if h.len() == levels => h,
        Some(h) => bail!(
            "{path}: metadata `{META_UNET_HEADS}` lists {} levels, the UNet has {levels}",
            h.len()
        ),
        None => heads_by_rule(st, version, &block_out_channels, "UNet")?,
    };
    let d = UNetConfig::sd1();
    Ok(UNetConfig {
        in_channels: dim(st, &p("input_blocks.0.0.weight"), 1)?,
        out_channels: dim(st, &p("out.2.weight"), 0)?,
        block_out_channels,
        layers_per_block: lpb as i64,
        down_block_types,
        up_block_types,
        num_heads,
        cross_attention_dim,
        // sd-scripts' single-file loader builds 1×1-conv projections for SD1 and SD2 alike
        // (`unet_use_linear_projection_in_v2=False`), unsqueezing SD2's Linear weights (§1.4).
        use_linear_projection: false,
        // Never set by the single-file path (§1.4).
        upcast_attention: false,
        norm_num_groups: NORM_GROUPS,
        ..d
    })
}

pub(super) fn detect_clip_config(
    st: &MappedSafetensors,
    names: &[&str],
    version: SdVersion,
    text_keys: &BTreeMap<String, String>,
) -> Result<ClipTextConfig> {
    // Shapes come from the renamed keys, so SD1 and SD2 share the logic.
    let find = |name: &str| -> Result<Vec<i64>> {
        let file_key = text_keys.get(name).with_context(|| {
            format!(
                "{}: text encoder key for `{name}` not found (incomplete checkpoint?)",
                st.path().display()
            )
        })?;
        shape_of(st, file_key)
    };
    let tok = find("text_model.embeddings.token_embedding.weight")?;
    let pos = find("text_model.embeddings.position_embedding.weight")?;
    let (vocab_size, hidden_size) = (tok[0], *tok.get(1).unwrap_or(&0));
    let layers = match version {
        SdVersion::V1 => indices(
            &text_keys.keys().map(|s| s.as_str()).collect::<Vec<_>>(),
            "text_model.encoder.layers.",
        )
        .len(),
        SdVersion::V2 => indices(names, &format!("{CLIP_V2_PREFIX}transformer.resblocks."))
            .len()
            .saturating_sub(1),
    } as i64;
    if layers == 0 {
        bail!("{}: the text encoder has no layers", st.path().display());
    }
    let fc1 = find("text_model.encoder.layers.0.mlp.fc1.weight")?;
    let num_attention_heads = match parse_heads(st, META_CLIP_HEADS)? {
        Some(h) if h.len() == 1 => h[0],
        Some(_) => bail!(
            "{}: metadata `{META_CLIP_HEADS}` must be one number",
            st.path().display()
        ),
        None => heads_by_rule(st, version, &[hidden_size], "text encoder")?[0],
    };
    let base = match version {
        SdVersion::V1 => ClipTextConfig::sd1(),
        SdVersion::V2 => ClipTextConfig::sd2(),
    };
    Ok(ClipTextConfig {
        vocab_size,
        hidden_size,
        intermediate_size: fc1[0],
        num_hidden_layers: layers,
        num_attention_heads,
        max_position_embeddings: pos[0],
        ..base
    })
}

/// VAE config from tensor shapes; `prefix` + LDM names (`diffusers = false`) or Diffusers names.
pub(super) fn detect_vae_config(
    st: &MappedSafetensors,
    names: &[&str],
    prefix: &str,
    diffusers: bool,
) -> Result<VaeConfig> {
    let p = |s: &str| format!("{prefix}{s}");
    let (down, block) = if diffusers {
        ("encoder.down_blocks.", "resnets")
    } else {
        ("encoder.down.", "block")
    };
    let levels = indices(names, &p(down)).len();
    if levels == 0 {
        bail!(
            "{}: no VAE encoder blocks (`{}*`) in this file",
            st.path().display(),
            p(down)
        );
    }
    let block_out_channels = (0..levels)
        .map(|i| dim(st, &p(&format!("{down}{i}.{block}.0.conv1.weight")), 0))
        .collect::<Result<Vec<_>>>()?;
    let layers = indices(names, &p(&format!("{down}0.{block}."))).len() as i64;
    Ok(VaeConfig {
        in_channels: dim(st, &p("encoder.conv_in.weight"), 1)?,
        out_channels: dim(st, &p("decoder.conv_out.weight"), 0)?,
        block_out_channels,
        layers_per_block: layers,
        latent_channels: dim(st, &p("post_quant_conv.weight"), 0)?,
        norm_num_groups: NORM_GROUPS,
        ..VaeConfig::sd()
    })
}
