//! Stable Diffusion checkpoints as users have them, loaded into three [`WeightMap`]s under
//! Diffusers/transformers parameter names plus the configs of the three networks.
//!
//! Sources (spec: sdscripts_model_math.md §2, §2.5):
//! - an LDM single file `.safetensors` (`model.diffusion_model.*`, `first_stage_model.*`,
//!   `cond_stage_model.transformer.*` for SD1 / `cond_stage_model.model.*` for SD2), fp32, fp16
//!   or bf16, with or without `model_ema.*` (ignored, as sd-scripts does);
//! - a Diffusers folder (`unet/`, `text_encoder/`, `vae/`, each `config.json` + safetensors,
//!   plain or `fp16` variant, single or sharded).
//!
//! PyTorch pickles (`.ckpt`, `.pt`, `.pth`, `.bin` written by `torch.save`) are read by
//! [`super::ckpt`] without running any of their code: the tensors of `state_dict` (or of the
//! top-level dict), strided views of storages in the same memory-mapped file.
//!
//! Single files are memory-mapped and each tensor is created from the mapped bytes, converted to
//! the requested dtype and device, after which its pages are dropped from the mapping: peak
//! memory is the loaded weights plus about one tensor, not two copies of the file.
use super::config::{BlockKind, ClipActivation, ClipTextConfig, SdVersion, UNetConfig, VaeConfig};
use super::weights::WeightMap;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Metadata keys with the attention head counts, which LDM single files do not record.
/// `scripts/make_sd_checkpoint.py` writes them for configs that break the SD1/SD2 rule (tiny).
pub const META_UNET_HEADS: &str = "sdlora.unet_num_heads";
pub const META_CLIP_HEADS: &str = "sdlora.clip_num_heads";

/// SD1 UNets have 8 heads at every level (Diffusers' `attention_head_dim=8`), SD2 UNets and both
/// CLIP towers use 64-wide heads (spec §1.1, §1.2, §1.4).
const SD1_UNET_HEADS: i64 = 8;
const HEAD_DIM: i64 = 64;
/// Not recorded in a single file; every SD checkpoint uses these (sd-scripts hard-codes them).
const NORM_GROUPS: i64 = 32;

const UNET_PREFIX: &str = "model.diffusion_model.";
const VAE_PREFIX: &str = "first_stage_model.";
const CLIP_V1_PREFIX: &str = "cond_stage_model.transformer.";
const CLIP_V2_PREFIX: &str = "cond_stage_model.model.";

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where every tensor is put.
    pub device: Device,
    pub unet_dtype: Kind,
    pub text_encoder_dtype: Kind,
    pub vae_dtype: Kind,
    /// sd-scripts' `--v2`: `Some(true)`/`Some(false)` demand an SD2/SD1 checkpoint (a mismatch is
    /// an error naming the flag); `None` accepts what the keys say.
    pub v2: Option<bool>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            unet_dtype: Kind::Float,
            text_encoder_dtype: Kind::Float,
            vae_dtype: Kind::Float,
            v2: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// LDM single file.
    SingleFile,
    /// Diffusers folder.
    Diffusers,
}

pub struct LoadedCheckpoint {
    pub version: SdVersion,
    pub unet_config: UNetConfig,
    pub clip_config: ClipTextConfig,
    pub vae_config: VaeConfig,
    pub unet: WeightMap,
    pub text_encoder: WeightMap,
    pub vae: WeightMap,
}

/// Loads a Stable Diffusion 1.x/2.x checkpoint: an LDM single `.safetensors` file or a Diffusers
/// folder. SD2 single files get 1×1-conv `proj_in`/`proj_out` (`use_linear_projection = false`,
/// weights unsqueezed) exactly as sd-scripts' single-file loader builds them; Diffusers folders
/// keep what their `config.json` says (spec §1.4).
pub fn load_checkpoint(path: &Path, opts: &LoadOptions) -> Result<LoadedCheckpoint> {
    let ck = if path.is_dir() {
        load_diffusers_folder(path, opts)?
    } else if path.is_file() {
        load_single_file(path, opts)?
    } else {
        bail!(
            "{}: no such file or folder (expected a Stable Diffusion .safetensors file or a \
             Diffusers folder with unet/, text_encoder/ and vae/)",
            path.display()
        )
    };
    check_v2_flag(path, ck.version, opts.v2)?;
    Ok(ck)
}

/// Tells whether `path` is a folder (Diffusers) or a single file, without loading anything.
pub fn checkpoint_format(path: &Path) -> CheckpointFormat {
    if path.is_dir() {
        CheckpointFormat::Diffusers
    } else {
        CheckpointFormat::SingleFile
    }
}

fn check_v2_flag(path: &Path, version: SdVersion, v2: Option<bool>) -> Result<()> {
    match (v2, version) {
        (Some(true), SdVersion::V1) => bail!(
            "{}: --v2 was given but this is a Stable Diffusion 1.x checkpoint (CLIP ViT-L text \
             encoder); remove --v2",
            path.display()
        ),
        (Some(false), SdVersion::V2) => bail!(
            "{}: this is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder); pass --v2 \
             (and --v_parameterization for 768-v models)",
            path.display()
        ),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Memory-mapped safetensors.

/// A memory-mapped checkpoint file (`.safetensors`, or a `torch.save` zip) whose tensors are
/// read one at a time in file order.
pub struct MappedSafetensors {
    path: PathBuf,
    mmap: memmap2::Mmap,
    /// (name, entry) sorted by file offset, so reading streams through the file once.
    tensors: Vec<(String, Entry)>,
    metadata: HashMap<String, String>,
}

/// Where one tensor's data lies in the mapped file.
#[derive(Debug, Clone)]
pub struct Entry {
    pub kind: Kind,
    pub shape: Vec<i64>,
    /// Byte range of the data (the tensor itself, or the whole storage of a strided view).
    start: usize,
    end: usize,
    /// A strided view of the storage in `start..end`: (stride, offset), in elements.
    view: Option<(Vec<i64>, i64)>,
}

/// The libtorch kind of a safetensors dtype (None for dtypes sdlora does not load).
pub fn kind_of_dtype(d: Dtype) -> Option<Kind> {
    Some(match d {
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn safetensors_kind(path: &Path, name: &str, d: Dtype) -> Result<Kind> {
    kind_of_dtype(d).with_context(|| {
        format!(
            "{}: tensor `{name}` has dtype {d:?}, which sdlora cannot load",
            path.display()
        )
    })
}

impl MappedSafetensors {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the mapping is read-only; a file truncated by another process while we read it
        // would fault, which is the same risk every mmap-based safetensors reader accepts.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("memory-mapping {}", path.display()))?;
        if super::ckpt::looks_like_torch_save(&mmap) {
            return Self::open_torch_save(path, mmap);
        }
        let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            anyhow!(
                "{}: not a valid .safetensors file ({e:?}); the file may be truncated or of \
                 another format",
                path.display()
            )
        })?;
        let data_start = 8 + n;
        let mut tensors = Vec::new();
        for (name, info) in meta.tensors() {
            let (a, b) = info.data_offsets;
            tensors.push((
                name.clone(),
                Entry {
                    kind: safetensors_kind(path, &name, info.dtype)?,
                    shape: info.shape.iter().map(|&d| d as i64).collect(),
                    start: data_start + a,
                    end: data_start + b,
                    view: None,
                },
            ));
        }
        tensors.sort_by_key(|(_, e)| e.start);
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(MappedSafetensors {
            path: path.to_path_buf(),
            mmap,
            tensors,
            metadata,
        })
    }

    /// A `torch.save` checkpoint: its state dict through the restricted unpickler.
    fn open_torch_save(path: &Path, mmap: memmap2::Mmap) -> Result<Self> {
        let (list, extras) = super::ckpt::read_state_dict(path, &mmap)?;
        if !extras.opaque.is_empty() {
            eprintln!(
                "note: {}: objects of classes sdlora does not load were skipped, never run: {}",
                path.display(),
                extras.opaque.join(", ")
            );
        }
        let mut tensors: Vec<(String, Entry)> = list
            .into_iter()
            .map(|t| {
                let e = super::ckpt::elem_size(t.kind);
                let entry = if t.is_contiguous() {
                    let start = t.storage.0 + t.storage_offset as usize * e;
                    Entry {
                        kind: t.kind,
                        start,
                        end: start + t.numel() as usize * e,
                        shape: t.shape,
                        view: None,
                    }
                } else {
                    Entry {
                        kind: t.kind,
                        start: t.storage.0,
                        end: t.storage.1,
                        shape: t.shape,
                        view: Some((t.stride, t.storage_offset)),
                    }
                };
                (t.name, entry)
            })
            .collect();
        tensors.sort_by_key(|(_, e)| e.start);
        Ok(MappedSafetensors {
            path: path.to_path_buf(),
            mmap,
            tensors,
            metadata: extras.metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|(n, _)| n.as_str())
    }

    pub fn info(&self, name: &str) -> Option<&Entry> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, i)| i)
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// One tensor, on the CPU in its stored dtype.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self
            .info(name)
            .with_context(|| format!("{}: no tensor `{name}`", self.path.display()))?;
        self.read(name, info, info.kind, Device::Cpu)
    }

    /// Every tensor in file order, created on `device` with floating-point tensors converted to
    /// the kind `kind_of(name)` returns. Pages of the mapping are released after each tensor.
    fn for_each(
        &self,
        mut want: impl FnMut(&str) -> bool,
        mut f: impl FnMut(&str, Tensor) -> Result<()>,
        kind_of: impl Fn(&str) -> Kind,
        device: Device,
    ) -> Result<()> {
        for (name, info) in &self.tensors {
            if !want(name) {
                continue;
            }
            let t = self.read(name, info, kind_of(name), device)?;
            f(name, t)?;
        }
        Ok(())
    }

    fn read(&self, name: &str, info: &Entry, kind: Kind, device: Device) -> Result<Tensor> {
        let src_kind = info.kind;
        let (start, end) = (info.start, info.end);
        if end > self.mmap.len() || start > end {
            bail!(
                "{}: tensor `{name}` lies outside the file (truncated download?)",
                self.path.display()
            );
        }
        let t = match &info.view {
            None => Tensor::f_from_data_size(&self.mmap[start..end], &info.shape, src_kind),
            Some((stride, offset)) => {
                let n = ((end - start) / super::ckpt::elem_size(src_kind)) as i64;
                Tensor::f_from_data_size(&self.mmap[start..end], &[n], src_kind)
                    .and_then(|s| s.f_as_strided(&info.shape, stride, Some(*offset)))
                    .and_then(|v| v.f_contiguous())
            }
        }
        .with_context(|| format!("{}: reading tensor `{name}`", self.path.display()))?;
        self.release(start, end);
        let t = if t.is_floating_point() && src_kind != kind {
            t.to_kind(kind)
        } else {
            t
        };
        Ok(if device != Device::Cpu {
            t.to_device(device)
        } else {
            t
        })
    }

    /// Drops the mapping's pages for bytes already copied out, so the file's pages do not count
    /// towards resident memory on top of the tensors made from them. Pages re-fault from the page
    /// cache if touched again (a tensor sharing a boundary page).
    fn release(&self, start: usize, end: usize) {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let lo = start / page * page;
        if end <= lo {
            return;
        }
        // SAFETY: [lo, end) lies inside the live read-only mapping (lo is page-aligned, the base
        // is page-aligned); MADV_DONTNEED on a file mapping only discards page-table entries, the
        // contents stay readable through the page cache. Failure is harmless, so it is ignored.
        unsafe {
            libc::madvise(
                self.mmap.as_ptr().add(lo) as *mut libc::c_void,
                end - lo,
                libc::MADV_DONTNEED,
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Expected parameter shapes of each network, from its config (Diffusers/transformers names).

type Shapes = BTreeMap<String, Vec<i64>>;

fn put_norm(s: &mut Shapes, p: &str, c: i64) {
    s.insert(format!("{p}.weight"), vec![c]);
    s.insert(format!("{p}.bias"), vec![c]);
}

fn put_conv(s: &mut Shapes, p: &str, cin: i64, cout: i64, k: i64) {
    s.insert(format!("{p}.weight"), vec![cout, cin, k, k]);
    s.insert(format!("{p}.bias"), vec![cout]);
}

fn put_linear(s: &mut Shapes, p: &str, cin: i64, cout: i64, bias: bool) {
    s.insert(format!("{p}.weight"), vec![cout, cin]);
    if bias {
        s.insert(format!("{p}.bias"), vec![cout]);
    }
}

fn put_unet_resnet(s: &mut Shapes, p: &str, cin: i64, cout: i64, temb: i64) {
    put_norm(s, &format!("{p}.norm1"), cin);
    put_conv(s, &format!("{p}.conv1"), cin, cout, 3);
    put_linear(s, &format!("{p}.time_emb_proj"), temb, cout, true);
    put_norm(s, &format!("{p}.norm2"), cout);
    put_conv(s, &format!("{p}.conv2"), cout, cout, 3);
    if cin != cout {
        put_conv(s, &format!("{p}.conv_shortcut"), cin, cout, 1);
    }
}

fn put_transformer(s: &mut Shapes, p: &str, c: i64, ctx: i64, linear_proj: bool) {
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

fn put_vae_resnet(s: &mut Shapes, p: &str, cin: i64, cout: i64) {
    put_norm(s, &format!("{p}.norm1"), cin);
    put_conv(s, &format!("{p}.conv1"), cin, cout, 3);
    put_norm(s, &format!("{p}.norm2"), cout);
    put_conv(s, &format!("{p}.conv2"), cout, cout, 3);
    if cin != cout {
        put_conv(s, &format!("{p}.conv_shortcut"), cin, cout, 1);
    }
}

fn put_vae_mid(s: &mut Shapes, p: &str, c: i64) {
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
fn validate(map: &WeightMap, want: &Shapes, what: &str, hint: &str) -> Result<()> {
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

// ---------------------------------------------------------------------------------------------
// LDM single files.

/// Which network an LDM key belongs to and its Diffusers/transformers name.
enum Target {
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

fn ldm_unet_resnet(rest: &str) -> Option<String> {
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
fn split2(s: &str) -> Option<(usize, usize, &str)> {
    let mut it = s.splitn(3, '.');
    let a = it.next()?.parse().ok()?;
    let b = it.next()?.parse().ok()?;
    Some((a, b, it.next()?))
}

/// LDM UNet key (without `model.diffusion_model.`) → Diffusers name (spec §2.2, generalised to
/// any level count and `layers_per_block`).
fn ldm_unet_key(k: &str, layers_per_block: usize) -> Option<String> {
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
fn ldm_vae_key(k: &str, levels: usize) -> Option<(String, bool)> {
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
fn openclip_key(k: &str, blocks: usize) -> Option<Target> {
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

fn shape_of(st: &MappedSafetensors, key: &str) -> Result<Vec<i64>> {
    let info = st.info(key).with_context(|| {
        format!(
            "{}: missing key `{key}` needed to detect the architecture (incomplete checkpoint?)",
            st.path().display()
        )
    })?;
    Ok(info.shape.clone())
}

fn dim(st: &MappedSafetensors, key: &str, d: usize) -> Result<i64> {
    let s = shape_of(st, key)?;
    s.get(d).copied().with_context(|| {
        format!(
            "{}: key `{key}` has shape {s:?}, which has no dimension {d}",
            st.path().display()
        )
    })
}

/// Distinct indices `i` of keys `{prefix}{i}.…`.
fn indices(names: &[&str], prefix: &str) -> BTreeSet<usize> {
    names
        .iter()
        .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse().ok())
        .collect()
}

fn parse_heads(st: &MappedSafetensors, key: &str) -> Result<Option<Vec<i64>>> {
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

fn heads_by_rule(
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

fn detect_unet_config(
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

fn detect_clip_config(
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
fn detect_vae_config(
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

fn unsupported_model_error(path: &Path, names: &[&str]) -> Option<anyhow::Error> {
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

fn load_single_file(path: &Path, opts: &LoadOptions) -> Result<LoadedCheckpoint> {
    let st = MappedSafetensors::open(path)?;
    let source = path.display().to_string();
    let names: Vec<&str> = st.names().collect();
    if let Some(e) = unsupported_model_error(path, &names) {
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
    let unet_inputs = indices(&names, &format!("{UNET_PREFIX}input_blocks."));
    let first_op = unet_inputs.iter().copied().find(|n| {
        names
            .iter()
            .any(|k| k.starts_with(&format!("{UNET_PREFIX}input_blocks.{n}.0.op.")))
    });
    let lpb = match first_op {
        Some(n) => n - 1,
        None => unet_inputs.iter().max().copied().unwrap_or(0),
    };
    let vae_levels = indices(&names, &format!("{VAE_PREFIX}encoder.down.")).len();
    let clip_blocks = indices(&names, &format!("{CLIP_V2_PREFIX}transformer.resblocks.")).len();

    let mut targets: HashMap<&str, Target> = HashMap::new();
    let mut bad = Vec::new();
    for &k in &names {
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
        targets.insert(k, t);
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

// ---------------------------------------------------------------------------------------------
// Diffusers folders.

fn read_json(path: &Path) -> Result<Value> {
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
fn component_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
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
fn load_component(
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
fn diffusers_vae_key(k: &str) -> String {
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

fn load_diffusers_folder(dir: &Path, opts: &LoadOptions) -> Result<LoadedCheckpoint> {
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
