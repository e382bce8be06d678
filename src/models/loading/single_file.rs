//! LDM single-file checkpoints (and VAE-only files) loaded into Diffusers-named weight maps.
#![allow(unused_imports)]
use super::*;

/// A VAE on its own, as sd-scripts' `--vae` accepts it (`model_util.load_vae`): a Diffusers VAE
/// folder (`config.json` + weights), a Diffusers pipeline folder (its `vae/`), or a
/// `.safetensors` file with an LDM VAE — a full checkpoint (`first_stage_model.*`) or a VAE-only
/// file such as `vae-ft-mse-840000-ema-pruned.safetensors` (`encoder.down.*`) — or with
/// Diffusers-named VAE weights. Returns the config and the weights under Diffusers names,
/// validated against the config.
pub fn load_vae(path: &Path, device: Device, kind: Kind) -> Result<(VaeConfig, WeightMap)> {
    if path.is_dir() {
        let dir = if path.join("vae").is_dir() {
            path.join("vae")
        } else {
            path.to_path_buf()
        };
        let json_path = dir.join("config.json");
        let config = VaeConfig::from_diffusers_json(
            &read_json(&json_path)?,
            &json_path.display().to_string(),
        )?;
        let map = load_component(
            &dir,
            "diffusion_pytorch_model",
            kind,
            device,
            |k| Some(diffusers_vae_key(k)),
            |d| d.contains(".attentions.0.to_") && d.ends_with(".weight"),
        )?;
        validate(&map, &vae_shapes(&config), "VAE", "Diffusers names")?;
        return Ok((config, map));
    }
    let st = MappedSafetensors::open(path)?;
    let names: Vec<&str> = st.names().collect();
    let diffusers = names.iter().any(|k| k.starts_with("encoder.down_blocks."));
    let prefix = if names.iter().any(|k| k.starts_with(VAE_PREFIX)) {
        VAE_PREFIX
    } else {
        ""
    };
    if !diffusers
        && !names
            .iter()
            .any(|k| k.starts_with(&format!("{prefix}encoder.down.")))
    {
        bail!(
            "{}: no VAE weights (`{VAE_PREFIX}encoder.*`, `encoder.down.*` or \
             `encoder.down_blocks.*`) in this file",
            path.display()
        );
    }
    let config = detect_vae_config(&st, &names, prefix, diffusers)?;
    let levels = config.block_out_channels.len();
    let mut map = WeightMap::new(path.display().to_string(), device, kind);
    let mut targets: HashMap<&str, (String, bool)> = HashMap::new();
    let mut bad = Vec::new();
    for &k in &names {
        let Some(r) = k.strip_prefix(prefix) else {
            continue;
        };
        if !["encoder.", "decoder.", "quant_conv.", "post_quant_conv."]
            .iter()
            .any(|p| r.starts_with(p))
        {
            // Other networks of a full checkpoint, `loss.*`, `model_ema.*`…
            continue;
        }
        let t = if diffusers {
            let d = diffusers_vae_key(r);
            let lin = d.contains(".attentions.0.to_") && d.ends_with(".weight");
            Some((d, lin))
        } else {
            ldm_vae_key(r, levels)
        };
        match t {
            Some(t) => {
                targets.insert(k, t);
            }
            None => bad.push(k),
        }
    }
    if !bad.is_empty() {
        bail!(
            "{}: {} key(s) that are not part of a Stable Diffusion VAE, e.g. {}",
            path.display(),
            bad.len(),
            bad.iter()
                .take(5)
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    st.for_each(
        |k| targets.contains_key(k),
        |k, t| {
            let (d, lin) = &targets[k];
            let t = if *lin && t.dim() == 4 {
                let s = t.size();
                t.reshape([s[0], s[1] * s[2] * s[3]])
            } else {
                t
            };
            map.insert(d.clone(), t);
            Ok(())
        },
        |_| kind,
        device,
    )?;
    validate(
        &map,
        &vae_shapes(&config),
        "VAE",
        "renamed to Diffusers names",
    )?;
    Ok((config, map))
}

pub(super) fn unsupported_model_error(path: &Path, names: &[&str]) -> Option<anyhow::Error> {
    let p = path.display();
    if names.iter().any(|k| {
        k.starts_with("conditioner.embedders.") || k.contains("diffusion_model.label_emb.")
    }) {
        return Some(anyhow!(
            "{p}: this is an SDXL checkpoint (`conditioner.embedders.*` / `label_emb`); sdlora \
             trains Stable Diffusion 1.x/2.x only (sd-scripts uses sdxl_train_network.py for SDXL)"
        ));
    }
    if !names.iter().any(|k| k.starts_with(UNET_PREFIX)) {
        let sample: Vec<&str> = names.iter().take(3).copied().collect();
        let lora = names.iter().any(|k| k.starts_with("lora_"));
        return Some(anyhow!(
            "{p}: not a Stable Diffusion checkpoint: no `{UNET_PREFIX}*` keys (found e.g. {}){}",
            sample.join(", "),
            if lora {
                "; this looks like a LoRA file, pass it with --network_weights instead"
            } else {
                ""
            }
        ));
    }
    None
}

/// How every key of an LDM single file maps onto the three networks, and the SD version the
/// text encoder keys say. Shared by the loader and by the tools that edit checkpoints key by key
/// (`merge_lora` into a model), so both agree on what each key is.
pub struct LdmKeyMap {
    pub version: SdVersion,
    /// Every key of the file (model EMA copies, schedule buffers… as [`Target::Ignore`]).
    pub targets: HashMap<String, Target>,
}

/// The key map of an LDM single file from its key names; unknown keys under a network's prefix
/// are an error naming them.
pub fn ldm_key_map(path: &Path, names: &[&str]) -> Result<LdmKeyMap> {
    let source = path.display().to_string();
    if let Some(e) = unsupported_model_error(path, names) {
        return Err(e);
    }
    let has_v1 = names.iter().any(|k| k.starts_with(CLIP_V1_PREFIX));
    let has_v2 = names.iter().any(|k| k.starts_with(CLIP_V2_PREFIX));
    let version = match (has_v1, has_v2) {
        (true, false) => SdVersion::V1,
        (false, true) => SdVersion::V2,
        (true, true) => bail!(
            "{source}: both SD1 (`{CLIP_V1_PREFIX}*`) and SD2 (`{CLIP_V2_PREFIX}*`) text encoder \
             keys; cannot tell which model this is"
        ),
        (false, false) => bail!(
            "{source}: no text encoder (`{CLIP_V1_PREFIX}*` for SD1 or `{CLIP_V2_PREFIX}*` for \
             SD2); sdlora needs a full Stable Diffusion checkpoint"
        ),
    };
    if !names.iter().any(|k| k.starts_with(VAE_PREFIX)) {
        bail!("{source}: no VAE (`{VAE_PREFIX}*` keys) in this checkpoint");
    }

    // Layout facts the key renames depend on.
    let unet_inputs = indices(names, &format!("{UNET_PREFIX}input_blocks."));
    let first_op = unet_inputs.iter().copied().find(|n| {
        names
            .iter()
            .any(|k| k.starts_with(&format!("{UNET_PREFIX}input_blocks.{n}.0.op.")))
    });
    let lpb = match first_op {
        Some(n) => n - 1,
        None => unet_inputs.iter().max().copied().unwrap_or(0),
    };
    let vae_levels = indices(names, &format!("{VAE_PREFIX}encoder.down.")).len();
    let clip_blocks = indices(names, &format!("{CLIP_V2_PREFIX}transformer.resblocks.")).len();

    let mut targets: HashMap<String, Target> = HashMap::new();
    let mut bad = Vec::new();
    for &k in names {
        let t = if let Some(r) = k.strip_prefix(UNET_PREFIX) {
            match ldm_unet_key(r, lpb) {
                // SD2 stores Linear projections; SD1 files already hold 1×1 convs.
                Some(d) if d.contains(".proj_") => Target::UnetToConv(d),
                Some(d) => Target::Unet(d),
                None => {
                    bad.push(k);
                    continue;
                }
            }
        } else if let Some(r) = k.strip_prefix(VAE_PREFIX) {
            match ldm_vae_key(r, vae_levels) {
                Some((d, true)) => Target::VaeToLinear(d),
                Some((d, false)) => Target::Vae(d),
                None => {
                    bad.push(k);
                    continue;
                }
            }
        } else if let Some(r) = k.strip_prefix(CLIP_V1_PREFIX) {
            // Old LDM files lack the `text_model.` level (sd-scripts'
            // load_checkpoint_with_text_encoder_conversion adds it).
            let d = if r.starts_with("text_model.") {
                r.to_string()
            } else {
                format!("text_model.{r}")
            };
            if d == "text_model.embeddings.position_ids" {
                Target::Ignore
            } else {
                Target::Text(d)
            }
        } else if let Some(r) = k.strip_prefix(CLIP_V2_PREFIX) {
            match openclip_key(r, clip_blocks) {
                Some(t) => t,
                None => {
                    bad.push(k);
                    continue;
                }
            }
        } else {
            // `model_ema.*`, diffusion schedule buffers, `lvlb_weights`…: not model weights.
            Target::Ignore
        };
        targets.insert(k.to_string(), t);
    }
    if !bad.is_empty() {
        bail!(
            "{source}: {} key(s) that are not part of a Stable Diffusion 1.x/2.x model, e.g. {}",
            bad.len(),
            bad.iter()
                .take(5)
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    Ok(LdmKeyMap { version, targets })
}

pub(super) fn load_single_file(path: &Path, opts: &LoadOptions) -> Result<LoadedCheckpoint> {
    let st = MappedSafetensors::open(path)?;
    let source = path.display().to_string();
    let names: Vec<&str> = st.names().collect();
    let LdmKeyMap { version, targets } = ldm_key_map(path, &names)?;
    let text_keys: BTreeMap<String, String> = targets
        .iter()
        .flat_map(|(k, t)| match t {
            Target::Text(d) => vec![(d.clone(), k.to_string())],
            Target::TextSplit(ds) => ds.iter().map(|d| (d.clone(), k.to_string())).collect(),
            _ => vec![],
        })
        .collect();
    let unet_config = detect_unet_config(&st, &names, version)?;
    let clip_config = detect_clip_config(&st, &names, version, &text_keys)?;
    let vae_config = detect_vae_config(&st, &names, VAE_PREFIX, false)?;

    let mut unet = WeightMap::new(source.clone(), opts.device, opts.unet_dtype);
    let mut text = WeightMap::new(source.clone(), opts.device, opts.text_encoder_dtype);
    let mut vae = WeightMap::new(source.clone(), opts.device, opts.vae_dtype);
    let kind_of = |k: &str| match targets.get(k) {
        Some(Target::Unet(_)) | Some(Target::UnetToConv(_)) => opts.unet_dtype,
        Some(Target::Text(_)) | Some(Target::TextSplit(_)) => opts.text_encoder_dtype,
        _ => opts.vae_dtype,
    };
    st.for_each(
        |k| !matches!(targets.get(k), Some(Target::Ignore) | None),
        |k, t| {
            match &targets[k] {
                Target::Unet(d) => unet.insert(d.clone(), t),
                Target::UnetToConv(d) => {
                    let t = if d.ends_with(".weight") && t.dim() == 2 {
                        t.unsqueeze(-1).unsqueeze(-1)
                    } else {
                        t
                    };
                    unet.insert(d.clone(), t)
                }
                Target::Text(d) => text.insert(d.clone(), t),
                Target::TextSplit(ds) => {
                    let n = t.size().first().copied().unwrap_or(0);
                    if n % 3 != 0 {
                        bail!(
                            "{source}: `{k}` has shape {:?}; a fused q/k/v projection needs a \
                             first dimension divisible by 3",
                            t.size()
                        );
                    }
                    for (d, part) in ds.iter().zip(t.chunk(3, 0)) {
                        text.insert(d.clone(), part);
                    }
                }
                Target::Vae(d) => vae.insert(d.clone(), t),
                Target::VaeToLinear(d) => {
                    let t = if t.dim() == 4 {
                        let s = t.size();
                        t.reshape([s[0], s[1] * s[2] * s[3]])
                    } else {
                        t
                    };
                    vae.insert(d.clone(), t)
                }
                Target::Ignore => {}
            }
            Ok(())
        },
        kind_of,
        opts.device,
    )?;
    let hint = "LDM single-file keys, renamed to Diffusers names";
    validate(&unet, &unet_shapes(&unet_config), "UNet", hint)?;
    validate(&text, &clip_shapes(&clip_config), "text encoder", hint)?;
    validate(&vae, &vae_shapes(&vae_config), "VAE", hint)?;
    Ok(LoadedCheckpoint {
        version,
        unet_config,
        clip_config,
        vae_config,
        unet,
        text_encoder: text,
        vae,
    })
}
