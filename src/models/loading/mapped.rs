//! Checkpoint files memory-mapped: `.safetensors`, and `torch.save` zips through the restricted
//! unpickler of [`crate::models::ckpt`]; tensors are made one at a time from the mapped bytes.
#![allow(unused_imports)]
use super::*;

/// A memory-mapped checkpoint file (`.safetensors`, or a `torch.save` zip) whose tensors are
/// read one at a time in file order.
pub struct MappedSafetensors {
    path: PathBuf,
    mmap: memmap2::Mmap,
    /// (name, entry) sorted by file offset, so reading streams through the file once.
    tensors: Vec<(String, Entry)>,
    metadata: HashMap<String, String>,
    /// A `torch.save` checkpoint's top-level integers (`epoch`, `global_step`), kept only when
    /// it nests its weights under `state_dict` (a training checkpoint); empty otherwise.
    counters: HashMap<String, i64>,
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

/// The safetensors dtype of a libtorch kind, for writing (the inverse of [`kind_of_dtype`]).
pub fn dtype_of_kind(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        k => bail!("tensor dtype {k:?} cannot be stored in safetensors"),
    })
}

pub(super) fn safetensors_kind(path: &Path, name: &str, d: Dtype) -> Result<Kind> {
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
        if crate::models::ckpt::looks_like_torch_save(&mmap) {
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
            counters: HashMap::new(),
        })
    }

    /// A `torch.save` checkpoint: its state dict through the restricted unpickler.
    fn open_torch_save(path: &Path, mmap: memmap2::Mmap) -> Result<Self> {
        let (list, extras) = crate::models::ckpt::read_state_dict(path, &mmap)?;
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
                let e = crate::models::ckpt::elem_size(t.kind);
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
            counters: if extras.has_state_dict {
                extras.ints
            } else {
                HashMap::new()
            },
        })
    }

    /// See the `counters` field: `epoch`, `global_step` of a training checkpoint.
    pub fn counter(&self, name: &str) -> Option<i64> {
        self.counters.get(name).copied()
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
    pub(crate) fn for_each(
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

    pub(crate) fn read(
        &self,
        name: &str,
        info: &Entry,
        kind: Kind,
        device: Device,
    ) -> Result<Tensor> {
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
                let n = ((end - start) / crate::models::ckpt::elem_size(src_kind)) as i64;
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
