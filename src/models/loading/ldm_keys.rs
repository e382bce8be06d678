//! The LDM ("original Stable Diffusion") ↔ Diffusers key maps of SD1.x/2.x: UNet, VAE and the
//! OpenCLIP text tower. A new model family adds a file like this one.
#![allow(unused_imports)]
use super::*;

/// Which network an LDM key belongs to and its Diffusers/transformers name.
pub enum Target {
    Unet(String),
    /// 2-D Linear proj weight that sd-scripts' SD2 single-file path turns into a 1×1 conv.
    UnetToConv(String),
    Text(String),
    /// OpenCLIP fused `in_proj`: split in three along dim 0 into these q, k, v names.
    TextSplit([String; 3]),
    Vae(String),
    /// LDM VAE attention 1×1 conv weight → Diffusers Linear weight.
    VaeToLinear(String),
    Ignore,
}

pub(super) fn ldm_unet_resnet(rest: &str) -> Option<String> {
    const MAP: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    MAP.iter()
        .find_map(|(l, d)| rest.strip_prefix(l).map(|r| format!("{d}{r}")))
}

/// `index.sub.rest` → (index, sub, rest).
pub(super) fn split2(s: &str) -> Option<(usize, usize, &str)> {
    let mut it = s.splitn(3, '.');
    let a = it.next()?.parse().ok()?;
    let b = it.next()?.parse().ok()?;
    Some((a, b, it.next()?))
}

/// LDM UNet key (without `model.diffusion_model.`) → Diffusers name (spec §2.2, generalised to
/// any level count and `layers_per_block`).
pub(super) fn ldm_unet_key(k: &str, layers_per_block: usize) -> Option<String> {
    let per = layers_per_block + 1;
    for (l, d) in [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ] {
        if let Some(r) = k.strip_prefix(l) {
            return Some(format!("{d}{r}"));
        }
    }
    if let Some(r) = k.strip_prefix("input_blocks.") {
        let (n, m, rest) = split2(r)?;
        if n == 0 {
            return None;
        }
        let (b, l) = ((n - 1) / per, (n - 1) % per);
        return match (l < layers_per_block, m) {
            (true, 0) => Some(format!(
                "down_blocks.{b}.resnets.{l}.{}",
                ldm_unet_resnet(rest)?
            )),
            (true, 1) => Some(format!("down_blocks.{b}.attentions.{l}.{rest}")),
            (false, 0) => rest
                .strip_prefix("op.")
                .map(|r| format!("down_blocks.{b}.downsamplers.0.conv.{r}")),
            _ => None,
        };
    }
    if let Some(r) = k.strip_prefix("middle_block.") {
        let (i, rest) = r.split_once('.')?;
        return match i {
            "0" => Some(format!("mid_block.resnets.0.{}", ldm_unet_resnet(rest)?)),
            "1" => Some(format!("mid_block.attentions.0.{rest}")),
            "2" => Some(format!("mid_block.resnets.1.{}", ldm_unet_resnet(rest)?)),
            _ => None,
        };
    }
    if let Some(r) = k.strip_prefix("output_blocks.") {
        let (n, m, rest) = split2(r)?;
        let (b, l) = (n / per, n % per);
        // The upsampler is the last sub-module of a level's last layer: `.1.conv` after a plain
        // resnet, `.2.conv` after resnet + attention. Attention modules have no `conv` child.
        if m >= 1 && l == layers_per_block {
            if let Some(c) = rest.strip_prefix("conv.") {
                return Some(format!("up_blocks.{b}.upsamplers.0.conv.{c}"));
            }
        }
        return match m {
            0 => Some(format!(
                "up_blocks.{b}.resnets.{l}.{}",
                ldm_unet_resnet(rest)?
            )),
            1 => Some(format!("up_blocks.{b}.attentions.{l}.{rest}")),
            _ => None,
        };
    }
    None
}

/// LDM VAE key (without `first_stage_model.`) → (Diffusers name, is a 1×1-conv attention weight).
pub(super) fn ldm_vae_key(k: &str, levels: usize) -> Option<(String, bool)> {
    if k.starts_with("quant_conv.") || k.starts_with("post_quant_conv.") {
        return Some((k.to_string(), false));
    }
    let (part, rest) = k.split_once('.')?;
    if part != "encoder" && part != "decoder" {
        return None;
    }
    let resnet = |r: &str| match r.strip_prefix("nin_shortcut.") {
        Some(x) => format!("conv_shortcut.{x}"),
        None => r.to_string(),
    };
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return Some((k.to_string(), false));
    }
    if let Some(r) = rest.strip_prefix("norm_out.") {
        return Some((format!("{part}.conv_norm_out.{r}"), false));
    }
    if let Some(r) = rest.strip_prefix("mid.block_1.") {
        return Some((format!("{part}.mid_block.resnets.0.{}", resnet(r)), false));
    }
    if let Some(r) = rest.strip_prefix("mid.block_2.") {
        return Some((format!("{part}.mid_block.resnets.1.{}", resnet(r)), false));
    }
    if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        let (name, leaf) = r.split_once('.')?;
        let (d, conv) = match name {
            "norm" => ("group_norm", false),
            "q" => ("to_q", true),
            "k" => ("to_k", true),
            "v" => ("to_v", true),
            "proj_out" => ("to_out.0", true),
            _ => return None,
        };
        return Some((format!("{part}.mid_block.attentions.0.{d}.{leaf}"), conv));
    }
    if part == "encoder" {
        let r = rest.strip_prefix("down.")?;
        let (i, r) = r.split_once('.')?;
        let i: usize = i.parse().ok()?;
        if let Some(r) = r.strip_prefix("block.") {
            let (j, leaf) = r.split_once('.')?;
            let j: usize = j.parse().ok()?;
            return Some((
                format!("encoder.down_blocks.{i}.resnets.{j}.{}", resnet(leaf)),
                false,
            ));
        }
        let leaf = r.strip_prefix("downsample.conv.")?;
        return Some((
            format!("encoder.down_blocks.{i}.downsamplers.0.conv.{leaf}"),
            false,
        ));
    }
    // LDM numbers decoder levels from the lowest resolution up; Diffusers top-down (spec §2.3).
    let r = rest.strip_prefix("up.")?;
    let (i, r) = r.split_once('.')?;
    let i: usize = i.parse().ok()?;
    if i >= levels {
        return None;
    }
    let d = levels - 1 - i;
    if let Some(r) = r.strip_prefix("block.") {
        let (j, leaf) = r.split_once('.')?;
        let j: usize = j.parse().ok()?;
        return Some((
            format!("decoder.up_blocks.{d}.resnets.{j}.{}", resnet(leaf)),
            false,
        ));
    }
    let leaf = r.strip_prefix("upsample.conv.")?;
    Some((
        format!("decoder.up_blocks.{d}.upsamplers.0.conv.{leaf}"),
        false,
    ))
}

/// OpenCLIP text key (without `cond_stage_model.model.`) → target (spec §2.4), for a file with
/// `blocks` resblocks of which SD2 uses all but the last.
pub(super) fn openclip_key(k: &str, blocks: usize) -> Option<Target> {
    let t = |s: String| Some(Target::Text(s));
    match k {
        "token_embedding.weight" => return t("text_model.embeddings.token_embedding.weight".into()),
        "positional_embedding" => {
            return t("text_model.embeddings.position_embedding.weight".into())
        }
        "text_projection" | "logit_scale" | "attn_mask" => return Some(Target::Ignore),
        _ => {}
    }
    if let Some(r) = k.strip_prefix("ln_final.") {
        return t(format!("text_model.final_layer_norm.{r}"));
    }
    let r = k.strip_prefix("transformer.resblocks.")?;
    let (i, rest) = r.split_once('.')?;
    let i: usize = i.parse().ok()?;
    if i + 1 == blocks {
        // SD2 conditions on the penultimate layer: the last block is dropped.
        return Some(Target::Ignore);
    }
    let p = format!("text_model.encoder.layers.{i}");
    if let Some(leaf) = rest.strip_prefix("attn.in_proj_") {
        return Some(Target::TextSplit(
            ["q", "k", "v"].map(|x| format!("{p}.self_attn.{x}_proj.{leaf}")),
        ));
    }
    for (l, d) in [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
        ("attn.out_proj.", "self_attn.out_proj."),
    ] {
        if let Some(leaf) = rest.strip_prefix(l) {
            return t(format!("{p}.{d}{leaf}"));
        }
    }
    None
}
