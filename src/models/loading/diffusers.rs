//! Diffusers folders (`unet/`, `text_encoder/`, `vae/` with config.json and safetensors).
#![allow(unused_imports)]
use super::*;

pub(super) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} (a Diffusers folder needs unet/, text_encoder/ and vae/ with config.json)",
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// The safetensors file(s) of one Diffusers component: `{stem}.safetensors`, else the `fp16`
/// variant, else a sharded index (`{stem}.safetensors.index.json`).
pub(super) fn component_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    for name in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(vec![p]);
        }
    }
    for name in [
        format!("{stem}.safetensors.index.json"),
        format!("{stem}.safetensors.index.fp16.json"),
    ] {
        let p = dir.join(&name);
        if p.is_file() {
            let index = read_json(&p)?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: no `weight_map` object", p.display()))?;
            let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            return Ok(files.into_iter().map(|f| dir.join(f)).collect());
        }
    }
    let bins = ["pytorch_model.bin", "diffusion_pytorch_model.bin"];
    if let Some(b) = bins.iter().map(|b| dir.join(b)).find(|p| p.is_file()) {
        return Ok(vec![b]);
    }
    bail!(
        "{}: no {stem}.safetensors (or .fp16.safetensors / sharded index) in this Diffusers \
         component folder",
        dir.display()
    )
}

/// Reads one component's tensors, renaming with `rename` (None = drop).
pub(super) fn load_component(
    dir: &Path,
    stem: &str,
    kind: Kind,
    device: Device,
    rename: impl Fn(&str) -> Option<String>,
    reshape_2d: impl Fn(&str) -> bool,
) -> Result<WeightMap> {
    let mut map = WeightMap::new(dir.display().to_string(), device, kind);
    for file in component_files(dir, stem)? {
        let st = MappedSafetensors::open(&file)?;
        st.for_each(
            |_| true,
            |k, t| {
                if let Some(d) = rename(k) {
                    let t = if reshape_2d(&d) && t.dim() == 4 {
                        let s = t.size();
                        t.reshape([s[0], s[1] * s[2] * s[3]])
                    } else {
                        t
                    };
                    map.insert(d, t);
                }
                Ok(())
            },
            |_| kind,
            device,
        )?;
    }
    Ok(map)
}

/// Diffusers < 0.17 saved the VAE attention as `query/key/value/proj_attn`; Diffusers itself
/// still renames them on load.
pub(super) fn diffusers_vae_key(k: &str) -> String {
    for (old, new) in [
        (".attentions.0.query.", ".attentions.0.to_q."),
        (".attentions.0.key.", ".attentions.0.to_k."),
        (".attentions.0.value.", ".attentions.0.to_v."),
        (".attentions.0.proj_attn.", ".attentions.0.to_out.0."),
    ] {
        if k.contains(old) {
            return k.replacen(old, new, 1);
        }
    }
    k.to_string()
}

pub(super) fn load_diffusers_folder(dir: &Path, opts: &LoadOptions) -> Result<LoadedCheckpoint> {
    let sub = |s: &str| dir.join(s);
    for s in ["unet", "text_encoder", "vae"] {
        if !sub(s).is_dir() {
            let unet_file = dir.join("diffusion_pytorch_model.safetensors");
            bail!(
                "{}: not a Diffusers Stable Diffusion folder: `{s}/` is missing{}",
                dir.display(),
                if unet_file.is_file() {
                    " (this looks like a single component folder; pass the pipeline folder above it)"
                } else {
                    ""
                }
            );
        }
    }
    let unet_json_path = sub("unet").join("config.json");
    let unet_json = read_json(&unet_json_path)?;
    if let Some(c) = unet_json.get("_class_name") {
        if c.as_str() != Some("UNet2DConditionModel") {
            bail!(
                "{}: `_class_name` {c} is not UNet2DConditionModel",
                unet_json_path.display()
            );
        }
    }
    if let Some(v) = unet_json
        .get("addition_embed_type")
        .filter(|v| !v.is_null())
    {
        bail!(
            "{}: `addition_embed_type` = {v}: this is an SDXL-style UNet; sdlora trains Stable \
             Diffusion 1.x/2.x only",
            unet_json_path.display()
        );
    }
    let unet_config = UNetConfig::from_diffusers_json(&unet_json)
        .with_context(|| format!("{}", unet_json_path.display()))?;
    let te_json_path = sub("text_encoder").join("config.json");
    let te_json = read_json(&te_json_path)?;
    if let Some(arch) = te_json.get("architectures").and_then(|a| a.as_array()) {
        if arch
            .iter()
            .any(|a| a.as_str() == Some("CLIPTextModelWithProjection"))
        {
            bail!(
                "{}: CLIPTextModelWithProjection is SDXL's second text encoder; sdlora trains \
                 Stable Diffusion 1.x/2.x only",
                te_json_path.display()
            );
        }
    }
    // A full CLIPConfig nests the text tower's settings.
    let te_cfg = te_json
        .get("text_config")
        .filter(|v| v.is_object())
        .unwrap_or(&te_json);
    let clip_config = ClipTextConfig::from_diffusers_json(te_cfg)
        .with_context(|| format!("{}", te_json_path.display()))?;
    let vae_json_path = sub("vae").join("config.json");
    let vae_config = VaeConfig::from_diffusers_json(
        &read_json(&vae_json_path)?,
        &vae_json_path.display().to_string(),
    )?;
    if dir.join("text_encoder_2").is_dir() {
        bail!(
            "{}: has text_encoder_2/ (SDXL); sdlora trains Stable Diffusion 1.x/2.x only",
            dir.display()
        );
    }
    // OpenCLIP towers (SD2) use exact GELU; OpenAI CLIP (SD1) quick GELU.
    let version = match clip_config.hidden_act {
        ClipActivation::Gelu => SdVersion::V2,
        ClipActivation::QuickGelu => SdVersion::V1,
    };

    let unet = load_component(
        &sub("unet"),
        "diffusion_pytorch_model",
        opts.unet_dtype,
        opts.device,
        |k| Some(k.to_string()),
        |_| false,
    )?;
    let text_encoder = load_component(
        &sub("text_encoder"),
        "model",
        opts.text_encoder_dtype,
        opts.device,
        |k| {
            if k.ends_with("embeddings.position_ids") {
                None
            } else if k.starts_with("text_model.") {
                Some(k.to_string())
            } else {
                Some(format!("text_model.{k}"))
            }
        },
        |_| false,
    )?;
    let vae = load_component(
        &sub("vae"),
        "diffusion_pytorch_model",
        opts.vae_dtype,
        opts.device,
        |k| Some(diffusers_vae_key(k)),
        |d| d.contains(".attentions.0.to_") && d.ends_with(".weight"),
    )?;
    let hint = "Diffusers names, checked against the component's config.json";
    validate(&unet, &unet_shapes(&unet_config), "UNet", hint)?;
    validate(
        &text_encoder,
        &clip_shapes(&clip_config),
        "text encoder",
        hint,
    )?;
    validate(&vae, &vae_shapes(&vae_config), "VAE", hint)?;
    Ok(LoadedCheckpoint {
        version,
        unet_config,
        clip_config,
        vae_config,
        unet,
        text_encoder,
        vae,
    })
}
