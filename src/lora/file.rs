//! kohya-layout LoRA `.safetensors` files: reading with key validation, writing with sd-scripts'
//! hashes (spec: sdscripts_cli_data.md §5.2, §5.4; peers.md §4.1).
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, View};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The three tensors sd-scripts' LoRAModule saves.
pub const ROLES: [&str; 3] = ["alpha", "lora_down.weight", "lora_up.weight"];

/// Tensors of one module as found in a file.
#[derive(Debug, Default)]
pub struct ModuleTensors {
    pub down: Option<Tensor>,
    pub up: Option<Tensor>,
    pub alpha: Option<Tensor>,
}

impl ModuleTensors {
    pub fn rank(&self) -> Option<i64> {
        self.down.as_ref().map(|d| d.size()[0])
    }
    /// The alpha as a number (sd-scripts: a missing alpha means alpha = rank).
    pub fn alpha_value(&self) -> Option<f64> {
        self.alpha
            .as_ref()
            .map(|a| a.to_kind(Kind::Double).double_value(&[]))
    }
}

/// A loaded kohya-layout LoRA file.
#[derive(Debug)]
pub struct LoraFile {
    pub path: String,
    /// Every tensor under its file key, on the CPU in its stored dtype.
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
    /// Modules by sd-scripts name, in the order of the file's keys (sorted).
    pub modules: BTreeMap<String, ModuleTensors>,
}

pub(crate) fn kind_to_dtype(kind: Kind) -> Result<Dtype> {
    crate::models::loading::dtype_of_kind(kind)
}

pub(crate) fn dtype_to_kind(d: Dtype) -> Result<Kind> {
    crate::models::loading::kind_of_dtype(d)
        .ok_or_else(|| anyhow!("safetensors dtype {d:?} is not supported"))
}

/// The dtype name as safetensors writes it in the header (F32, F16, BF16, I64, …).
pub fn dtype_name(kind: Kind) -> String {
    kind_to_dtype(kind)
        .map(|d| format!("{d:?}"))
        .unwrap_or_else(|_| format!("{kind:?}"))
}

/// A CPU tensor's bytes, ready for safetensors.
pub(crate) struct Bytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Bytes {
    pub(crate) fn from_tensor(t: &Tensor) -> Result<Self> {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let dtype = kind_to_dtype(t.kind())?;
        let n = t.numel() * t.kind().elt_size_in_bytes();
        let mut data = vec![0u8; n];
        t.copy_data_u8(&mut data, t.numel());
        Ok(Bytes {
            dtype,
            shape: t.size().iter().map(|&s| s as usize).collect(),
            data,
        })
    }
}

impl View for &Bytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// `sshs_model_hash` and `sshs_legacy_hash` of a safetensors serialization (sd-scripts
/// `train_util.precalculate_safetensors_hashes`): sha256 of everything after the header, and the
/// first 8 hex digits of the sha256 of bytes [1 MiB, 1 MiB + 64 KiB) of the whole buffer.
pub fn addnet_hashes(buf: &[u8]) -> (String, String) {
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8-byte header length")) as usize;
    let model = hex(&Sha256::digest(&buf[(8 + n).min(buf.len())..]));
    let lo = 0x100000.min(buf.len());
    let hi = 0x110000.min(buf.len());
    let legacy = hex(&Sha256::digest(&buf[lo..hi]))[..8].to_string();
    (model, legacy)
}

/// sd-scripts `train_util.model_hash`: the old A1111 hash of a checkpoint file (first 8 hex of
/// sha256 of 64 KiB at offset 1 MiB).
pub fn legacy_file_hash(path: &Path) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(0x100000)).is_ok() {
        f.take(0x10000).read_to_end(&mut buf)?;
    }
    Ok(hex(&Sha256::digest(&buf))[..8].to_string())
}

/// sd-scripts `train_util.calculate_sha256`: full-file sha256 (hex).
pub fn file_sha256(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Serializes named tensors with metadata (safetensors orders them by dtype, then name).
pub fn serialize(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    // Always a (possibly empty) metadata map, as Python's `safetensors.torch.save(t, {})` passes
    // one: an empty map still writes `"__metadata__":{}`, which shifts the legacy hash window.
    serialize_opt(tensors, Some(metadata))
}

/// [`serialize`], with `None` writing no `__metadata__` at all (`save_file(t, path, None)`).
pub fn serialize_opt(
    tensors: &[(String, Tensor)],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Bytes)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), Bytes::from_tensor(t).with_context(|| k.clone())?)))
        .collect::<Result<_>>()?;
    let md: Option<HashMap<String, String>> =
        metadata.map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    safetensors::serialize(bytes.iter().map(|(k, b)| (k.as_str(), b)), &md)
        .map_err(|e| anyhow!("serializing safetensors: {e:?}"))
}

/// Writes a LoRA state dict as sd-scripts' `save_weights` does: the hashes are computed on a
/// serialization carrying only the `ss_*` metadata, then added, then the file is written with the
/// full metadata (atomically).
pub fn save_with_hashes(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "safetensors" => {}
        // sd-scripts' save_weights: torch.save(state_dict), no metadata and no hashes
        "ckpt" | "pt" => {
            crate::models::ckpt::write_state_dict(path, tensors)
                .with_context(|| format!("writing LoRA file {}", path.display()))?;
            return Ok(BTreeMap::new());
        }
        _ => bail!(
            "cannot save {}: LoRA files are written as .safetensors, .ckpt or .pt",
            path.display()
        ),
    }
    let ss_only: BTreeMap<String, String> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let probe = serialize(tensors, &ss_only)?;
    let (model_hash, legacy_hash) = addnet_hashes(&probe);
    drop(probe);
    let mut full = metadata.clone();
    full.insert("sshs_model_hash".into(), model_hash);
    full.insert("sshs_legacy_hash".into(), legacy_hash);
    let buf = serialize(tensors, &full)?;
    crate::io::write_bytes_atomic(path, &buf)
        .with_context(|| format!("writing LoRA file {}", path.display()))?;
    Ok(full)
}

/// What a key's suffix says about the adapter type, for errors on non-LoRA formats.
fn foreign_role(role: &str) -> Option<&'static str> {
    let r = role;
    if r.starts_with("hada_") {
        Some("LoHa (LyCORIS, hada_* keys)")
    } else if r.starts_with("lokr_") {
        Some("LoKr (LyCORIS, lokr_* keys)")
    } else if r == "dora_scale" {
        Some("DoRA (dora_scale keys)")
    } else if r.starts_with("lora_mid") {
        Some("LoCon with Tucker decomposition (lora_mid keys)")
    } else if r.starts_with("oft_") || r == "oft_blocks" {
        Some("OFT")
    } else if r.starts_with("a1.")
        || r.starts_with("a2.")
        || r.starts_with("b1.")
        || r.starts_with("b2.")
    {
        Some("GLoRA")
    } else if r == "on_input" {
        Some("IA3")
    } else if r == "diff" || r == "diff_b" || r == "w_norm" || r == "b_norm" {
        Some("full-weight diff (LyCORIS)")
    } else if r.contains("lora_A")
        || r.contains("lora_B")
        || r.contains("lora.down")
        || r.contains("lora.up")
        || r.contains("lora_linear_layer")
    {
        Some("diffusers/PEFT")
    } else {
        None
    }
}

impl LoraFile {
    /// Reads and validates a kohya-layout LoRA file. Any key that is not
    /// `lora_{unet,te}_<module>.{alpha,lora_down.weight,lora_up.weight}` is an error that names
    /// the key and, where recognisable, the format (LoHa, LoKr, DoRA, diffusers/PEFT).
    pub fn load(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let mut head = [0u8; 4];
        let n = {
            use std::io::Read;
            let mut f = std::fs::File::open(path).with_context(|| format!("reading {shown}"))?;
            f.read(&mut head)
                .with_context(|| format!("reading {shown}"))?
        };
        if crate::models::ckpt::looks_like_torch_save(&head[..n]) {
            // a LoRA saved with --save_model_as ckpt/pt: sd-scripts torch.loads it; sdlora reads
            // it without running pickle code
            let st = crate::models::loading::MappedSafetensors::open(path)?;
            let names: Vec<String> = st.names().map(String::from).collect();
            let mut tensors = BTreeMap::new();
            for n in names {
                let t = st.tensor(&n)?;
                tensors.insert(n, t);
            }
            let metadata = st.metadata().clone().into_iter().collect();
            return Self::from_tensors(shown, tensors, metadata);
        }
        let data = std::fs::read(path).with_context(|| format!("reading {shown}"))?;
        let st = SafeTensors::deserialize(&data)
            .map_err(|e| anyhow!("{shown} is not a valid safetensors file: {e:?}"))?;
        let (_, header) = SafeTensors::read_metadata(&data)
            .map_err(|e| anyhow!("{shown}: bad safetensors header: {e:?}"))?;
        let metadata: BTreeMap<String, String> = header
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let kind =
                dtype_to_kind(view.dtype()).with_context(|| format!("{shown}: tensor {name}"))?;
            let shape: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
            let t = Tensor::from_data_size(view.data(), &shape, kind);
            tensors.insert(name, t);
        }
        Self::from_tensors(shown, tensors, metadata)
    }

    /// Validates named tensors as a kohya LoRA (see [`LoraFile::load`]).
    pub fn from_tensors(
        path: String,
        tensors: BTreeMap<String, Tensor>,
        metadata: BTreeMap<String, String>,
    ) -> Result<Self> {
        if tensors.is_empty() {
            bail!("{path} contains no tensors: it is not a LoRA file");
        }
        let kohya = tensors
            .keys()
            .filter(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te"))
            .count();
        if kohya == 0 {
            let first = tensors.keys().next().cloned().unwrap_or_default();
            let hint = if first.starts_with("model.diffusion_model.")
                || first.starts_with("first_stage_model.")
                || first.starts_with("cond_stage_model.")
            {
                " (it looks like a Stable Diffusion checkpoint)"
            } else if tensors.keys().any(|k| {
                k.contains("lora_A") || k.contains("lora.down") || k.contains("lora_linear_layer")
            }) {
                " (it looks like a diffusers/PEFT LoRA; convert it to kohya format, e.g. with diffusers' convert_state_dict_to_kohya)"
            } else if tensors.keys().any(|k| k.starts_with("lycoris_")) {
                " (it uses LyCORIS' lycoris_ prefix)"
            } else {
                ""
            };
            bail!(
                "{path} is not a kohya-layout LoRA: no key starts with lora_unet_ or lora_te_ \
                 (first key: {first}){hint}"
            );
        }
        let mut modules: BTreeMap<String, ModuleTensors> = BTreeMap::new();
        for (key, t) in &tensors {
            let Some((name, role)) = key.split_once('.') else {
                bail!("{path}: unexpected key {key} (kohya LoRA keys look like <lora_name>.lora_down.weight)");
            };
            if name.starts_with("lora_te1_") || name.starts_with("lora_te2_") {
                bail!("{path}: key {key} belongs to an SDXL LoRA (lora_te1_/lora_te2_); sdlora handles SD1.x/2.x only");
            }
            if !(name.starts_with("lora_unet_") || name.starts_with("lora_te_")) {
                bail!("{path}: unexpected key {key}: module names must start with lora_unet_ or lora_te_");
            }
            if !ROLES.contains(&role) {
                if let Some(fmt) = foreign_role(role) {
                    bail!(
                        "{path}: key {key} is a {fmt} weight; sdlora supports plain LoRA (networks.lora) only"
                    );
                }
                bail!(
                    "{path}: unknown key {key}: a networks.lora module has only .alpha, .lora_down.weight and .lora_up.weight"
                );
            }
            let m = modules.entry(name.to_string()).or_default();
            let t = t.shallow_clone();
            match role {
                "alpha" => m.alpha = Some(t),
                "lora_down.weight" => m.down = Some(t),
                _ => m.up = Some(t),
            }
        }
        for (name, m) in &modules {
            match (&m.down, &m.up) {
                (Some(d), Some(u)) => {
                    let (ds, us) = (d.size(), u.size());
                    let ok = ds.len() == us.len()
                        && (ds.len() == 2 || ds.len() == 4)
                        && ds[0] == us[1]
                        && (us.len() == 2 || (us[2] == 1 && us[3] == 1));
                    if !ok {
                        bail!(
                            "{path}: module {name}: lora_down {ds:?} and lora_up {us:?} do not form a LoRA pair \
                             (expected down [r, in(, kh, kw)] and up [out, r(, 1, 1)])"
                        );
                    }
                }
                (None, _) => bail!("{path}: module {name} has no {name}.lora_down.weight"),
                (_, None) => bail!("{path}: module {name} has no {name}.lora_up.weight"),
            }
            if let Some(a) = &m.alpha {
                if a.numel() != 1 {
                    bail!(
                        "{path}: {name}.alpha must be a scalar, found shape {:?}",
                        a.size()
                    );
                }
            }
        }
        Ok(LoraFile {
            path,
            tensors,
            metadata,
            modules,
        })
    }
}
