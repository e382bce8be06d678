//! sd-scripts' model and LoRA tools as subcommands, each in its own file and taking the script's
//! flags verbatim: `merge_lora`, `svd_merge_lora`, `resize_lora`, `extract_lora_from_models`.
//! What they share lives here (precision names, LoRA state dicts read and written as those
//! scripts do) and in [`lowrank`] (the SVD re-factoring).
pub mod extract_lora;
pub mod lowrank;
pub mod merge_lora;
pub mod resize_lora;
pub mod svd_merge_lora;

use crate::lora::file::{addnet_hashes, serialize};
use crate::models::loading::MappedSafetensors;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The scripts' `str_to_dtype`: "float" | "fp16" | "bf16".
pub fn precision_kind(p: &str) -> Kind {
    match p {
        "fp16" => Kind::Half,
        "bf16" => Kind::BFloat16,
        _ => Kind::Float,
    }
}

/// Values the scripts' `choices=[None, "float", "fp16", "bf16"]` accept.
pub const PRECISIONS: [&str; 3] = ["float", "fp16", "bf16"];

/// `--device` as the scripts pass it to `tensor.to(device)`: None / "cpu" / "cuda" / "cuda:N".
pub fn parse_device(flag: &str, v: Option<&str>) -> Result<Device> {
    Ok(match v {
        None | Some("cpu") => Device::Cpu,
        Some("cuda") => Device::Cuda(0),
        Some(d) => match d.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::Cuda(n),
            None => bail!("{flag}={d}: expected cpu, cuda or cuda:N"),
        },
    })
    .and_then(|d| {
        if let Device::Cuda(n) = d {
            if n as i64 >= tch::Cuda::device_count() {
                bail!("{flag}: no CUDA device {n} on this machine (use --device=cpu or omit it)");
            }
        }
        Ok(d)
    })
}

/// A state dict as the scripts hold it after `load_file` / `torch.load`: keys in Python's order
/// (safetensors: sorted; a pickle: its own order), every tensor on the CPU.
pub struct StateDict {
    pub path: PathBuf,
    pub keys: Vec<String>,
    pub tensors: HashMap<String, Tensor>,
    /// The safetensors metadata; empty for a pickle (`load_metadata_from_safetensors` gives {},
    /// and resize_lora's `None` becomes {} before use).
    pub metadata: BTreeMap<String, String>,
}

impl StateDict {
    /// Reads a LoRA (or any) state dict; `cast` converts every tensor (integers too, as
    /// `sd[key].to(dtype)` does in the scripts).
    pub fn load(path: &Path, cast: Option<Kind>) -> Result<Self> {
        if !path.is_file() {
            bail!("{}: no such file", path.display());
        }
        let st = MappedSafetensors::open(path)?;
        let pickle = is_pickle(path)?;
        let mut keys: Vec<String> = st.names().map(String::from).collect();
        if !pickle {
            // safetensors' `safe_open(...).keys()` is sorted
            keys.sort();
        }
        let mut tensors = HashMap::new();
        for k in &keys {
            let t = st.tensor(k)?;
            let t = match cast {
                Some(kind) if t.kind() != kind => t.to_kind(kind),
                _ => t,
            };
            tensors.insert(k.clone(), t);
        }
        let metadata = if pickle {
            BTreeMap::new()
        } else {
            st.metadata().clone().into_iter().collect()
        };
        Ok(StateDict {
            path: path.to_path_buf(),
            keys,
            tensors,
            metadata,
        })
    }

    pub fn get(&self, k: &str) -> Option<&Tensor> {
        self.tensors.get(k)
    }
}

/// `--models` and `--ratios` of the merge scripts: one ratio per model, every model a file.
pub fn check_models_ratios(models: &[PathBuf], ratios: &[f64]) -> Result<()> {
    if models.len() != ratios.len() {
        bail!(
            "--models has {} file(s) but --ratios {} value(s): give one ratio per model",
            models.len(),
            ratios.len()
        );
    }
    if models.is_empty() {
        bail!("--models: give at least one LoRA file to merge");
    }
    for m in models {
        if !m.is_file() {
            bail!("--models: {}: no such file", m.display());
        }
    }
    Ok(())
}

/// `--save_precision` when given, else `default` (the scripts' `save_dtype or merge_dtype`).
pub fn save_kind_or(save_precision: Option<&str>, default: Kind) -> Kind {
    save_precision.map(precision_kind).unwrap_or(default)
}

/// What the merge scripts carry over from their input LoRAs: `ss_v2` and
/// `ss_base_model_version`, each from the first file that has it.
#[derive(Debug, Default)]
pub struct MergedFacts {
    pub v2: Option<String>,
    pub base_model: Option<String>,
}

impl MergedFacts {
    pub fn take(&mut self, md: &BTreeMap<String, String>) {
        if self.v2.is_none() {
            self.v2 = md.get("ss_v2").cloned();
        }
        if self.base_model.is_none() {
            self.base_model = md.get("ss_base_model_version").cloned();
        }
    }

    /// `build_minimum_network_metadata`'s optional keys.
    pub fn insert_into(&self, m: &mut BTreeMap<String, String>) {
        if let Some(v) = &self.v2 {
            m.insert("ss_v2".into(), v.clone());
        }
        if let Some(b) = &self.base_model {
            m.insert("ss_base_model_version".into(), b.clone());
        }
    }

    /// The merged LoRA's `modelspec.*`: v2 (and then v-prediction, as the scripts assume) from
    /// `ss_v2`, titled after `save_to`, `merged_from` the inputs' titles.
    pub fn modelspec(
        &self,
        save_to: &Path,
        models: &[PathBuf],
    ) -> Result<BTreeMap<String, String>> {
        let v2 = self.v2.as_deref() == Some("True");
        let mut spec = crate::modelspec::ModelSpec::new(v2, v2, Some("lora"));
        spec.title = Some(file_stem(save_to));
        spec.merged_from = Some(merged_from(models)?);
        Ok(spec.keys(crate::lora::metadata::now_unix()))
    }
}

/// True when the file is a `torch.save` pickle rather than safetensors.
pub fn is_pickle(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut head = [0u8; 4];
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let n = f.read(&mut head)?;
    Ok(crate::models::ckpt::looks_like_torch_save(&head[..n]))
}

/// The `__metadata__` of a safetensors file: None when the header has none.
pub fn safetensors_metadata(path: &Path) -> Result<Option<HashMap<String, String>>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{}: too short for a safetensors file", path.display()))?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata()?.len();
    if n > 100 << 20 || n + 8 > size {
        bail!(
            "{}: safetensors header of {n} bytes does not fit the file (corrupt or not safetensors)",
            path.display()
        );
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .with_context(|| format!("{}: the safetensors header is not JSON", path.display()))?;
    Ok(v.get("__metadata__").and_then(|m| m.as_object()).map(|m| {
        m.iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
            .collect()
    }))
}

/// `train_util.load_metadata_from_safetensors`: {} for anything that is not `.safetensors`.
pub fn metadata_or_empty(path: &Path) -> Result<BTreeMap<String, String>> {
    if !has_ext(path, "safetensors") {
        return Ok(BTreeMap::new());
    }
    Ok(safetensors_metadata(path)?
        .unwrap_or_default()
        .into_iter()
        .collect())
}

/// `os.path.splitext(path)[1] == ".<ext>"` (case-sensitive, as the scripts compare).
pub fn has_ext(path: &Path, ext: &str) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some(ext)
}

/// `sai_model_spec.build_merged_from`: each file's `modelspec.title`, else its file stem.
pub fn merged_from(paths: &[PathBuf]) -> Result<String> {
    let mut titles = Vec::new();
    for p in paths {
        let md = metadata_or_empty(p)?;
        titles.push(match md.get("modelspec.title") {
            Some(t) => t.clone(),
            None => file_stem(p),
        });
    }
    Ok(titles.join(", "))
}

/// `os.path.splitext(os.path.basename(p))[0]`.
pub fn file_stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `train_util.precalculate_safetensors_hashes(tensors, metadata)`: (sshs_model_hash,
/// sshs_legacy_hash) of a serialization carrying only the `ss_*` metadata.
pub fn sshs_hashes(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<(String, String)> {
    let ss: BTreeMap<String, String> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(addnet_hashes(&serialize(tensors, &ss)?))
}

/// The scripts' `save_to_file`: `.safetensors` → `save_file(tensors, path, metadata)`, anything
/// else → `torch.save(state_dict)` (no metadata). Written atomically.
pub fn save_state_dict(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    if has_ext(path, "safetensors") {
        let buf = crate::lora::file::serialize_opt(tensors, metadata)?;
        crate::io::write_bytes_atomic(path, &buf)
            .with_context(|| format!("writing {}", path.display()))
    } else {
        crate::models::ckpt::write_state_dict(path, tensors)
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Refuses an output path the script would not write (or could not), before any work.
pub fn check_save_to(flag: &str, path: Option<&PathBuf>) -> Result<PathBuf> {
    let Some(p) = path else {
        bail!("{flag} is required: the file to write (.safetensors, or .ckpt/.pt for a pickle)");
    };
    if p.is_dir() {
        bail!("{flag}={}: is a directory; give a file name", p.display());
    }
    Ok(p.clone())
}

/// Parses the tool's flags with clap, mapping a parse error to one message naming the script.
pub fn parse_args<T: clap::Parser>(script: &str, args: &[String]) -> Result<Option<T>> {
    let argv = std::iter::once(script.to_string()).chain(args.iter().cloned());
    match T::try_parse_from(argv) {
        Ok(a) => Ok(Some(a)),
        Err(e) => {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    print!("{e}");
                    Ok(None)
                }
                _ => bail!("{}", e.to_string().trim_end()),
            }
        }
    }
}
