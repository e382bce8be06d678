//! The parameter shapes each network must have for its config (Diffusers/transformers names),
//! and the check of a loaded weight map against them.
#![allow(unused_imports)]
use super::*;

pub(super) type Shapes = BTreeMap<String, Vec<i64>>;

pub(super) fn put_norm(s: &mut Shapes, p: &str, c: i64) {
    s.insert(format!("{p}.weight"), vec![c]);
    s.insert(format!("{p}.bias"), vec![c]);
}

pub(super) fn put_conv(s: &mut Shapes, p: &str, cin: i64, cout: i64, k: i64) {
    s.insert(format!("{p}.weight"), vec![cout, cin, k, k]);
    s.insert(format!("{p}.bias"), vec![cout]);
}

pub(super) fn put_linear(s: &mut Shapes, p: &str, cin: i64, cout: i64, bias: bool) {
    s.insert(format!("{p}.weight"), vec![cout, cin]);
    if bias {
        s.insert(format!("{p}.bias"), vec![cout]);
    }
}

pub(super) fn put_unet_resnet(s: &mut Shapes, p: &str, cin: i64, cout: i64, temb: i64) {
    put_norm(s, &format!("{p}.norm1"), cin);
    put_conv(s, &format!("{p}.conv1"), cin, cout, 3);
    put_linear(s, &format!("{p}.time_emb_proj"), temb, cout, true);
    put_norm(s, &format!("{p}.norm2"), cout);
    put_conv(s, &format!("{p}.conv2"), cout, cout, 3);
    if cin != cout {
        put_conv(s, &format!("{p}.conv_shortcut"), cin, cout, 1);
    }
}

pub(super) fn put_transformer(s: &mut Shapes, p: &str, c: i64, ctx: i64, linear_proj: bool) {
    put_norm(s, &format!("{p}.norm"), c);
    for proj in ["proj_in", "proj_out"] {
        if linear_proj {
            put_linear(s, &format!("{p}.{proj}"), c, c, true);
        } else {
            put_conv(s, &format!("{p}.{proj}"), c, c, 1);
        }
    }
    let b = format!("{p}.transformer_blocks.0");
    for n in ["norm1", "norm2", "norm3"] {
        put_norm(s, &format!("{b}.{n}"), c);
    }
    for (attn, kv) in [("attn1", c), ("attn2", ctx)] {
        put_linear(s, &format!("{b}.{attn}.to_q"), c, c, false);
        put_linear(s, &format!("{b}.{attn}.to_k"), kv, c, false);
        put_linear(s, &format!("{b}.{attn}.to_v"), kv, c, false);
        put_linear(s, &format!("{b}.{attn}.to_out.0"), c, c, true);
    }
    // GEGLU: value and gate halves of one projection to 2·4C.
    put_linear(s, &format!("{b}.ff.net.0.proj"), c, 8 * c, true);
    put_linear(s, &format!("{b}.ff.net.2"), 4 * c, c, true);
}

/// Every Diffusers `UNet2DConditionModel` parameter and its shape for `cfg` (spec §2.1).
pub fn unet_shapes(cfg: &UNetConfig) -> BTreeMap<String, Vec<i64>> {
    let mut s = Shapes::new();
    let ch = &cfg.block_out_channels;
    let n = ch.len();
    let temb = cfg.time_embed_dim();
    let ctx = cfg.cross_attention_dim;
    let lin = cfg.use_linear_projection;
    put_conv(&mut s, "conv_in", cfg.in_channels, ch[0], 3);
    put_linear(&mut s, "time_embedding.linear_1", ch[0], temb, true);
    put_linear(&mut s, "time_embedding.linear_2", temb, temb, true);
    let mut prev = ch[0];
    for (i, &c) in ch.iter().enumerate() {
        for j in 0..cfg.layers_per_block {
            let cin = if j == 0 { prev } else { c };
            put_unet_resnet(
                &mut s,
                &format!("down_blocks.{i}.resnets.{j}"),
                cin,
                c,
                temb,
            );
            if cfg.down_block_types[i] == BlockKind::CrossAttn {
                put_transformer(
                    &mut s,
                    &format!("down_blocks.{i}.attentions.{j}"),
                    c,
                    ctx,
                    lin,
                );
            }
        }
        if i + 1 < n {
            put_conv(
                &mut s,
                &format!("down_blocks.{i}.downsamplers.0.conv"),
                c,
                c,
                3,
            );
        }
        prev = c;
    }
    let last = ch[n - 1];
    put_unet_resnet(&mut s, "mid_block.resnets.0", last, last, temb);
    put_transformer(&mut s, "mid_block.attentions.0", last, ctx, lin);
    put_unet_resnet(&mut s, "mid_block.resnets.1", last, last, temb);
    let rev: Vec<i64> = ch.iter().rev().copied().collect();
    let mut prev_out = rev[0];
    for (i, &out) in rev.iter().enumerate() {
        // The last resnet of each up level takes the skip from the level below's input side.
        let input = rev[(i + 1).min(n - 1)];
        for j in 0..=cfg.layers_per_block {
            let skip = if j == cfg.layers_per_block {
                input
            } else {
                out
            };
            let cin = if j == 0 { prev_out } else { out } + skip;
            put_unet_resnet(
                &mut s,
                &format!("up_blocks.{i}.resnets.{j}"),
                cin,
                out,
                temb,
            );
            if cfg.up_block_types[i] == BlockKind::CrossAttn {
                put_transformer(
                    &mut s,
                    &format!("up_blocks.{i}.attentions.{j}"),
                    out,
                    ctx,
                    lin,
                );
            }
        }
        if i + 1 < n {
            put_conv(
                &mut s,
                &format!("up_blocks.{i}.upsamplers.0.conv"),
                out,
                out,
                3,
            );
        }
        prev_out = out;
    }
    put_norm(&mut s, "conv_norm_out", ch[0]);
    put_conv(&mut s, "conv_out", ch[0], cfg.out_channels, 3);
    s
}

/// Every transformers `CLIPTextModel` parameter and its shape (without the `position_ids`
/// buffer, which is not a parameter).
pub fn clip_shapes(cfg: &ClipTextConfig) -> BTreeMap<String, Vec<i64>> {
    let mut s = Shapes::new();
    let h = cfg.hidden_size;
    s.insert(
        "text_model.embeddings.token_embedding.weight".into(),
        vec![cfg.vocab_size, h],
    );
    s.insert(
        "text_model.embeddings.position_embedding.weight".into(),
        vec![cfg.max_position_embeddings, h],
    );
    for i in 0..cfg.num_hidden_layers {
        let p = format!("text_model.encoder.layers.{i}");
        for x in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            put_linear(&mut s, &format!("{p}.self_attn.{x}"), h, h, true);
        }
        put_norm(&mut s, &format!("{p}.layer_norm1"), h);
        put_norm(&mut s, &format!("{p}.layer_norm2"), h);
        put_linear(
            &mut s,
            &format!("{p}.mlp.fc1"),
            h,
            cfg.intermediate_size,
            true,
        );
        put_linear(
            &mut s,
            &format!("{p}.mlp.fc2"),
            cfg.intermediate_size,
            h,
            true,
        );
    }
    put_norm(&mut s, "text_model.final_layer_norm", h);
    s
}

pub(super) fn put_vae_resnet(s: &mut Shapes, p: &str, cin: i64, cout: i64) {
    put_norm(s, &format!("{p}.norm1"), cin);
    put_conv(s, &format!("{p}.conv1"), cin, cout, 3);
    put_norm(s, &format!("{p}.norm2"), cout);
    put_conv(s, &format!("{p}.conv2"), cout, cout, 3);
    if cin != cout {
        put_conv(s, &format!("{p}.conv_shortcut"), cin, cout, 1);
    }
}

pub(super) fn put_vae_mid(s: &mut Shapes, p: &str, c: i64) {
    put_vae_resnet(s, &format!("{p}.resnets.0"), c, c);
    put_norm(s, &format!("{p}.attentions.0.group_norm"), c);
    for x in ["to_q", "to_k", "to_v", "to_out.0"] {
        put_linear(s, &format!("{p}.attentions.0.{x}"), c, c, true);
    }
    put_vae_resnet(s, &format!("{p}.resnets.1"), c, c);
}

/// Every Diffusers `AutoencoderKL` parameter and its shape (spec §1.3).
pub fn vae_shapes(cfg: &VaeConfig) -> BTreeMap<String, Vec<i64>> {
    let mut s = Shapes::new();
    let ch = &cfg.block_out_channels;
    let n = ch.len();
    let last = ch[n - 1];
    let lat = cfg.latent_channels;
    put_conv(&mut s, "encoder.conv_in", cfg.in_channels, ch[0], 3);
    let mut prev = ch[0];
    for (i, &c) in ch.iter().enumerate() {
        for j in 0..cfg.layers_per_block {
            let cin = if j == 0 { prev } else { c };
            put_vae_resnet(
                &mut s,
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                cin,
                c,
            );
        }
        if i + 1 < n {
            put_conv(
                &mut s,
                &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                c,
                c,
                3,
            );
        }
        prev = c;
    }
    put_vae_mid(&mut s, "encoder.mid_block", last);
    put_norm(&mut s, "encoder.conv_norm_out", last);
    put_conv(&mut s, "encoder.conv_out", last, 2 * lat, 3);
    put_conv(&mut s, "quant_conv", 2 * lat, 2 * lat, 1);
    put_conv(&mut s, "post_quant_conv", lat, lat, 1);
    put_conv(&mut s, "decoder.conv_in", lat, last, 3);
    put_vae_mid(&mut s, "decoder.mid_block", last);
    let mut prev = last;
    for (i, &c) in ch.iter().rev().enumerate() {
        for j in 0..=cfg.layers_per_block {
            let cin = if j == 0 { prev } else { c };
            put_vae_resnet(
                &mut s,
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                cin,
                c,
            );
        }
        if i + 1 < n {
            put_conv(
                &mut s,
                &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                c,
                c,
                3,
            );
        }
        prev = c;
    }
    put_norm(&mut s, "decoder.conv_norm_out", ch[0]);
    put_conv(&mut s, "decoder.conv_out", ch[0], cfg.out_channels, 3);
    s
}

/// Missing, unexpected and mis-shaped keys of `map` against `want`, as one error naming the first
/// few of each and the source. `what` says which network, `hint` how the keys were named.
pub(super) fn validate(map: &WeightMap, want: &Shapes, what: &str, hint: &str) -> Result<()> {
    let have: BTreeSet<&String> = map.keys().collect();
    let missing: Vec<&String> = want.keys().filter(|k| !have.contains(k)).collect();
    let unexpected: Vec<&&String> = have.iter().filter(|k| !want.contains_key(**k)).collect();
    let mut misshaped = Vec::new();
    for (k, shape) in want {
        if let Some(t) = map.get(k) {
            if t.size() != *shape {
                misshaped.push(format!("`{k}` is {:?}, expected {:?}", t.size(), shape));
            }
        }
    }
    if missing.is_empty() && unexpected.is_empty() && misshaped.is_empty() {
        return Ok(());
    }
    let list = |v: Vec<String>| -> String {
        let n = v.len();
        let mut s = v.into_iter().take(5).collect::<Vec<_>>().join(", ");
        if n > 5 {
            s.push_str(&format!(" (and {} more)", n - 5));
        }
        s
    };
    let mut msg = format!(
        "{}: the {what} weights do not fit the detected architecture",
        map.source
    );
    if !missing.is_empty() {
        let n = missing.len();
        msg += &format!(
            "; {n} missing key(s): {}",
            list(missing.iter().map(|k| format!("`{k}`")).collect())
        );
    }
    if !unexpected.is_empty() {
        let n = unexpected.len();
        msg += &format!(
            "; {n} unexpected key(s): {}",
            list(unexpected.iter().map(|k| format!("`{k}`")).collect())
        );
    }
    if !misshaped.is_empty() {
        let n = misshaped.len();
        msg += &format!("; {n} mis-shaped: {}", list(misshaped));
    }
    msg += &format!(" ({hint}). Is the file complete and a Stable Diffusion 1.x/2.x model?");
    bail!(msg)
}
