//! PyTorch checkpoints (`torch.save`'s zip format: `.ckpt`, `.pt`, `.pth`, `.bin`) read without
//! running any of their pickle code.
//!
//! `torch.load` unpickles `data.pkl`, which may name and call any Python function. This reader
//! interprets the pickle opcodes itself and understands only what a checkpoint's tensors need:
//! storages (persistent ids pointing at `data/<key>` entries of the zip), the tensor and parameter
//! rebuild functions, `collections.OrderedDict`, `torch.Size`, dtypes, and the builtin helpers
//! protocol 2 uses for bytes and sets. Every other global becomes an opaque placeholder that is
//! never imported or called (a training framework's callback objects, for instance); a global
//! that can only serve to run code or import modules (`os.system`, `builtins.eval`, …) makes the
//! file refused, naming it.
//!
//! Robustness: all values live in one arena and refer to each other by index, so deep nesting or
//! reference cycles cannot overflow the stack when walked or dropped; every length field is
//! checked against the bytes that remain before anything is allocated; a tensor's view must fit
//! its storage, and a storage its zip entry. Memory is bounded by a small multiple of `data.pkl`.
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use std::rc::Rc;
use tch::Kind;

/// One tensor of a checkpoint's state dict: a strided view of a storage held in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct CkptTensor {
    pub name: String,
    pub kind: Kind,
    pub shape: Vec<i64>,
    pub stride: Vec<i64>,
    /// In elements, from the start of the storage.
    pub storage_offset: i64,
    /// Byte range of the whole storage in the file.
    pub storage: (usize, usize),
}

impl CkptTensor {
    /// True when the tensor is the dense row-major run of its storage starting at the offset.
    pub fn is_contiguous(&self) -> bool {
        let mut expect = 1i64;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d != 1 && s != expect {
                return false;
            }
            expect *= d;
        }
        true
    }

    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

/// True when the bytes start like a `torch.save` file: a zip archive, or a bare pickle (the
/// format torch wrote before 1.6).
pub fn looks_like_torch_save(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
        || (bytes.len() >= 2 && bytes[0] == 0x80 && (2..=5).contains(&bytes[1]))
}

/// What [`read_state_dict`] found besides the tensors.
#[derive(Debug, Default)]
pub struct CkptExtras {
    /// Classes left opaque (at most 8 names), for a note to the user.
    pub opaque: Vec<String>,
    /// Top-level entries whose key and value are strings (a checkpoint's only metadata).
    pub metadata: HashMap<String, String>,
    /// Top-level integer entries (`epoch`, `global_step` of a training checkpoint).
    pub ints: HashMap<String, i64>,
    /// The top-level dict nests the weights under `state_dict`.
    pub has_state_dict: bool,
}

/// The state dict of a `torch.save` zip held in `bytes` (the whole file): the tensors of
/// `checkpoint["state_dict"]` when the top-level dict has that key (as sd-scripts reads `.ckpt`
/// files), else of the top-level dict; non-tensor entries are skipped.
pub fn read_state_dict(path: &Path, bytes: &[u8]) -> Result<(Vec<CkptTensor>, CkptExtras)> {
    let p = path.display();
    if !bytes.starts_with(b"PK\x03\x04") {
        bail!(
            "{p}: a PyTorch pickle in the legacy format (torch < 1.6), which sdlora does not read; \
             re-save it with a current torch (torch.save writes the zip format) or convert it to \
             .safetensors"
        );
    }
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| anyhow!("{p}: not a readable zip archive ({e}); the file may be truncated"))?;
    // name -> (data start, size, stored uncompressed)
    let mut entries: HashMap<String, (usize, usize, bool)> = HashMap::new();
    for i in 0..zip.len() {
        let f = zip
            .by_index_raw(i)
            .map_err(|e| anyhow!("{p}: zip entry {i}: {e}"))?;
        let start = usize::try_from(f.data_start()).unwrap_or(usize::MAX);
        let size = usize::try_from(f.compressed_size()).unwrap_or(usize::MAX);
        let stored =
            f.compression() == zip::CompressionMethod::Stored && f.size() == f.compressed_size();
        if start.checked_add(size).is_none_or(|end| end > bytes.len()) {
            bail!(
                "{p}: zip entry `{}` lies outside the file (truncated download?)",
                f.name()
            );
        }
        entries.insert(f.name().to_string(), (start, size, stored));
    }
    let pkl_name = entries
        .keys()
        .filter(|n| n.ends_with("/data.pkl") || n.as_str() == "data.pkl")
        .min_by_key(|n| n.len())
        .cloned()
        .with_context(|| {
            format!("{p}: a zip archive without data.pkl: not a torch.save checkpoint")
        })?;
    let prefix = pkl_name.strip_suffix("data.pkl").unwrap_or("").to_string();
    if let Some(&(s, n, true)) = entries.get(&format!("{prefix}byteorder")) {
        if &bytes[s..s + n] == b"big" {
            bail!(
                "{p}: saved on a big-endian machine; sdlora reads little-endian checkpoints only"
            );
        }
    }
    let &(s, n, stored) = entries.get(&pkl_name).expect("found above");
    if !stored {
        bail!("{p}: data.pkl is compressed inside the zip; torch.save never does that, so the file was repacked: re-save it with torch.save");
    }
    let mut vm = Unpickler::new(&bytes[s..s + n], path);
    let top = vm.run()?;
    let sd = vm.state_dict_of(&top)?;
    let metadata = vm.string_items(&top);
    let ints = vm.int_items(&top);
    let has_state_dict = vm.has_str_key(&top, "state_dict");
    let mut out = Vec::new();
    for (name, t) in sd {
        let key = format!("{prefix}data/{}", t.storage.key);
        let &(start, size, stored) = entries.get(&key).with_context(|| {
            format!("{p}: tensor `{name}` points at storage `{key}`, which the archive lacks")
        })?;
        if !stored {
            bail!("{p}: storage `{key}` is compressed inside the zip; re-save the file with torch.save");
        }
        let elem = elem_size(t.storage.kind) as u128;
        if t.storage.numel as u128 * elem > size as u128 {
            bail!(
                "{p}: storage `{key}` should hold {} elements but has {size} bytes (corrupt file)",
                t.storage.numel
            );
        }
        // The view must stay inside the storage: offset + Σ (size_i - 1)·stride_i < numel.
        let mut last: i128 = t.offset as i128;
        if t.offset < 0 || t.size.iter().any(|&d| d < 0) || t.stride.iter().any(|&d| d < 0) {
            bail!("{p}: tensor `{name}` has a negative size, stride or offset (corrupt file)");
        }
        if t.size.len() != t.stride.len() {
            bail!(
                "{p}: tensor `{name}` has {} sizes but {} strides (corrupt file)",
                t.size.len(),
                t.stride.len()
            );
        }
        let empty = t.size.contains(&0);
        for (&d, &st) in t.size.iter().zip(&t.stride) {
            last += (d as i128 - 1).max(0) * st as i128;
        }
        if !empty && last >= t.storage.numel as i128 {
            bail!(
                "{p}: tensor `{name}` (shape {:?}, stride {:?}, offset {}) reaches beyond its storage of {} elements (corrupt file)",
                t.size, t.stride, t.offset, t.storage.numel
            );
        }
        // An expanded view (stride 0) may name more elements than its storage holds; making it
        // contiguous would allocate all of them, so it is refused (SD checkpoints have none).
        let numel = t
            .size
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        if numel.is_none_or(|n| n > t.storage.numel.max(1)) {
            bail!(
                "{p}: tensor `{name}` (shape {:?}) has more elements than its storage of {}: an \
                 expanded view, which sdlora does not load",
                t.size,
                t.storage.numel
            );
        }
        out.push(CkptTensor {
            name,
            kind: t.storage.kind,
            shape: t.size.clone(),
            stride: t.stride.clone(),
            storage_offset: t.offset,
            storage: (start, start + (t.storage.numel as usize) * elem as usize),
        });
    }
    Ok((
        out,
        CkptExtras {
            opaque: vm.opaque,
            metadata,
            ints,
            has_state_dict,
        },
    ))
}

pub fn elem_size(k: Kind) -> usize {
    match k {
        Kind::Double | Kind::Int64 => 8,
        Kind::Float | Kind::Int => 4,
        Kind::Half | Kind::BFloat16 | Kind::Int16 => 2,
        _ => 1,
    }
}

// ---------------------------------------------------------------------------------------------
// The pickle machine.

#[derive(Debug)]
struct Storage {
    kind: Kind,
    key: String,
    numel: u64,
}

#[derive(Debug)]
struct TensorV {
    storage: Rc<Storage>,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

/// A pickle value. Containers live in the arena and are referred to by index.
#[derive(Debug, Clone)]
enum V {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits (kept only as a placeholder).
    BigInt,
    Float,
    Str(Rc<str>),
    Bytes,
    Global(Rc<str>, Rc<str>),
    Dtype(Kind),
    Storage(Rc<Storage>),
    Tensor(Rc<TensorV>),
    Ref(usize),
}

#[derive(Debug)]
enum Container {
    List(Vec<V>),
    Tuple(Vec<V>),
    Dict(Vec<(V, V)>),
    /// An object of a class sdlora does not interpret; dict-style items set on it are kept.
    Opaque {
        class: String,
        items: Vec<(V, V)>,
    },
}

/// Module prefixes and globals whose only use in a pickle is to run code, import modules or
/// touch the system: a checkpoint naming one is refused.
const DANGEROUS_MODULES: &[&str] = &[
    "os",
    "posix",
    "nt",
    "subprocess",
    "sys",
    "shutil",
    "socket",
    "importlib",
    "runpy",
    "pickle",
    "_pickle",
    "marshal",
    "dill",
    "pty",
    "ctypes",
    "code",
    "codeop",
    "webbrowser",
    "multiprocessing",
    "asyncio",
    "signal",
    "urllib",
    "http",
    "ftplib",
    "smtplib",
    "telnetlib",
    "tempfile",
    "glob",
    "zipimport",
    "imp",
    "platform",
    "commands",
    "popen2",
    "timeit",
    "pdb",
    "bdb",
    "cProfile",
    "profile",
    "trace",
];
const DANGEROUS_BUILTINS: &[&str] = &[
    "eval",
    "exec",
    "compile",
    "open",
    "__import__",
    "getattr",
    "setattr",
    "delattr",
    "globals",
    "locals",
    "vars",
    "input",
    "breakpoint",
    "exit",
    "quit",
    "help",
    "apply",
    "execfile",
    "file",
    "reload",
];

fn is_dangerous(module: &str, name: &str) -> bool {
    let root = module.split('.').next().unwrap_or(module);
    DANGEROUS_MODULES.contains(&root)
        || (matches!(module, "builtins" | "__builtin__") && DANGEROUS_BUILTINS.contains(&name))
        || (matches!(module, "io" | "_io") && matches!(name, "open" | "open_code" | "FileIO"))
        || (module == "torch" && matches!(name, "load" | "hub" | "ops" | "classes" | "compile"))
        || module.starts_with("torch.hub")
        || module.starts_with("torch.ops")
        || module.starts_with("torch.serialization")
}

/// torch's legacy storage classes, which name a storage's dtype in a checkpoint's pickle.
const STORAGES: &[(&str, Kind)] = &[
    ("FloatStorage", Kind::Float),
    ("HalfStorage", Kind::Half),
    ("BFloat16Storage", Kind::BFloat16),
    ("DoubleStorage", Kind::Double),
    ("LongStorage", Kind::Int64),
    ("IntStorage", Kind::Int),
    ("ShortStorage", Kind::Int16),
    ("CharStorage", Kind::Int8),
    ("ByteStorage", Kind::Uint8),
    ("BoolStorage", Kind::Bool),
];

fn storage_kind(name: &str) -> Option<Kind> {
    if name == "UntypedStorage" {
        return Some(Kind::Uint8);
    }
    STORAGES.iter().find(|(n, _)| *n == name).map(|&(_, k)| k)
}

fn storage_class(kind: Kind) -> Option<&'static str> {
    STORAGES.iter().find(|(_, k)| *k == kind).map(|&(n, _)| n)
}

fn dtype_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "float32" | "float" => Kind::Float,
        "float16" | "half" => Kind::Half,
        "bfloat16" => Kind::BFloat16,
        "float64" | "double" => Kind::Double,
        "int64" | "long" => Kind::Int64,
        "int32" | "int" => Kind::Int,
        "int16" | "short" => Kind::Int16,
        "int8" => Kind::Int8,
        "uint8" => Kind::Uint8,
        "bool" => Kind::Bool,
        _ => return None,
    })
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
    stack: Vec<V>,
    marks: Vec<usize>,
    memo: HashMap<u32, V>,
    arena: Vec<Container>,
    /// Classes left opaque, for one note.
    opaque: Vec<String>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8], path: &'a Path) -> Self {
        Unpickler {
            data,
            pos: 0,
            path,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            arena: Vec::new(),
            opaque: Vec::new(),
        }
    }

    fn err(&self, what: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "{}: data.pkl at byte {}: {what} (corrupt or not a torch checkpoint)",
            self.path.display(),
            self.pos
        )
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(self.err(format!("needs {n} more bytes but the pickle ends")));
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn len_u64(&mut self) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| self.err("length out of range"))
    }
    fn line(&mut self) -> Result<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let Some(i) = rest.iter().position(|&b| b == b'\n') else {
            return Err(self.err("unterminated text argument"));
        };
        self.pos += i + 1;
        Ok(&rest[..i])
    }
    fn utf8(&self, b: &[u8]) -> Result<Rc<str>> {
        std::str::from_utf8(b)
            .map(Rc::from)
            .map_err(|_| self.err("invalid UTF-8 string"))
    }

    fn pop(&mut self) -> Result<V> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(self.err("stack underflow at a mark"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }
    fn top(&self) -> Result<&V> {
        self.stack.last().ok_or_else(|| self.err("stack underflow"))
    }
    fn pop_mark(&mut self) -> Result<Vec<V>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no mark on the stack"))?;
        if m > self.stack.len() {
            return Err(self.err("mark beyond the stack"));
        }
        Ok(self.stack.split_off(m))
    }
    fn push_new(&mut self, c: Container) {
        let v = self.alloc(c);
        self.stack.push(v)
    }

    fn alloc(&mut self, c: Container) -> V {
        self.arena.push(c);
        V::Ref(self.arena.len() - 1)
    }
    fn memo_get(&self, i: u32) -> Result<V> {
        self.memo
            .get(&i)
            .cloned()
            .ok_or_else(|| self.err(format!("memo entry {i} is not defined")))
    }
    fn memo_put(&mut self, i: u32) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(i, v);
        Ok(())
    }

    fn int_of(&self, v: &V) -> Result<i64> {
        match v {
            V::Int(i) => Ok(*i),
            V::Bool(b) => Ok(*b as i64),
            _ => Err(self.err(format!("expected an integer, found {}", self.describe(v)))),
        }
    }

    /// The items of a tuple/list value (the arguments of a call).
    fn seq(&self, v: &V) -> Result<Vec<V>> {
        match v {
            V::Ref(i) => match &self.arena[*i] {
                Container::Tuple(x) | Container::List(x) => Ok(x.clone()),
                _ => Err(self.err("expected a tuple")),
            },
            _ => Err(self.err(format!("expected a tuple, found {}", self.describe(v)))),
        }
    }

    fn ints(&self, v: &V) -> Result<Vec<i64>> {
        self.seq(v)?.iter().map(|x| self.int_of(x)).collect()
    }

    fn describe(&self, v: &V) -> String {
        match v {
            V::None => "None".into(),
            V::Bool(_) => "a bool".into(),
            V::Int(_) | V::BigInt => "an int".into(),
            V::Float => "a float".into(),
            V::Str(_) => "a string".into(),
            V::Bytes => "bytes".into(),
            V::Global(m, n) => format!("{m}.{n}"),
            V::Dtype(_) => "a dtype".into(),
            V::Storage(_) => "a storage".into(),
            V::Tensor(_) => "a tensor".into(),
            V::Ref(i) => match &self.arena[*i] {
                Container::List(_) => "a list".into(),
                Container::Tuple(_) => "a tuple".into(),
                Container::Dict(_) => "a dict".into(),
                Container::Opaque { class, .. } => format!("a {class} object"),
            },
        }
    }

    fn global(&mut self, module: Rc<str>, name: Rc<str>) -> Result<V> {
        if is_dangerous(&module, &name) {
            bail!(
                "{}: refused: the checkpoint's pickle names `{module}.{name}`, which can only serve to \
                 run code or reach the system when unpickled (torch.load would call it). sdlora never \
                 runs pickle code; do not load this file with torch.load either",
                self.path.display()
            );
        }
        if &*module == "torch" {
            if let Some(k) = dtype_kind(&name) {
                return Ok(V::Dtype(k));
            }
        }
        Ok(V::Global(module, name))
    }

    /// `callable(*args)` for the callables a checkpoint needs; anything else yields an opaque
    /// placeholder (nothing is ever imported or called).
    fn call(&mut self, f: V, args: V) -> Result<V> {
        let V::Global(m, n) = &f else {
            return Ok(self.opaque(format!("<call of {}>", self.describe(&f))));
        };
        let (m, n) = (&**m, &**n);
        match (m, n) {
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor" | "_rebuild_tensor_v3") => {
                let a = self.seq(&args)?;
                if a.len() < 4 {
                    return Err(self.err(format!("{n} with {} arguments", a.len())));
                }
                let V::Storage(st) = &a[0] else {
                    return Err(
                        self.err(format!("{n}: first argument is {}", self.describe(&a[0])))
                    );
                };
                let mut storage = st.clone();
                if n == "_rebuild_tensor_v3" {
                    // (storage, offset, size, stride, requires_grad, hooks, dtype, ...): an
                    // untyped storage whose dtype comes as an argument
                    if let Some(V::Dtype(k)) = a.get(6) {
                        if storage.kind != *k {
                            let bytes = storage.numel;
                            let e = elem_size(*k) as u64;
                            storage = Rc::new(Storage {
                                kind: *k,
                                key: storage.key.clone(),
                                numel: bytes / e,
                            });
                        }
                    }
                }
                let t = TensorV {
                    storage,
                    offset: self.int_of(&a[1])?,
                    size: self.ints(&a[2])?,
                    stride: self.ints(&a[3])?,
                };
                Ok(V::Tensor(Rc::new(t)))
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                let a = self.seq(&args)?;
                match a.first() {
                    Some(t @ V::Tensor(_)) => Ok(t.clone()),
                    _ => Ok(self.opaque(format!("{m}.{n}"))),
                }
            }
            ("collections", "OrderedDict") | ("builtins" | "__builtin__", "dict") => {
                let mut items = vec![];
                if let Some(first) = self.seq(&args)?.first() {
                    for pair in self.seq(first).unwrap_or_default() {
                        let kv = self.seq(&pair)?;
                        if kv.len() == 2 {
                            items.push((kv[0].clone(), kv[1].clone()));
                        }
                    }
                }
                Ok(self.alloc(Container::Dict(items)))
            }
            ("torch", "Size") | ("builtins" | "__builtin__", "tuple") => {
                let a = self.seq(&args)?;
                let items = match a.first() {
                    Some(x) => self.seq(x)?,
                    None => vec![],
                };
                Ok(self.alloc(Container::Tuple(items)))
            }
            ("builtins" | "__builtin__", "set" | "frozenset" | "list") => {
                let a = self.seq(&args)?;
                let items = match a.first() {
                    Some(x) => self.seq(x).unwrap_or_default(),
                    None => vec![],
                };
                Ok(self.alloc(Container::List(items)))
            }
            // protocol 2 pickles bytes as _codecs.encode(str, "latin1"); the bytes are not needed
            ("_codecs", "encode") => Ok(V::Bytes),
            ("builtins" | "__builtin__", "bytearray" | "bytes") => Ok(V::Bytes),
            _ => Ok(self.opaque(format!("{m}.{n}"))),
        }
    }

    fn opaque(&mut self, class: String) -> V {
        if self.opaque.len() < 8 && !self.opaque.contains(&class) {
            self.opaque.push(class.clone());
        }
        self.alloc(Container::Opaque {
            class,
            items: vec![],
        })
    }

    fn persistent_load(&mut self, pid: V) -> Result<V> {
        let a = self.seq(&pid)?;
        let tag = match a.first() {
            Some(V::Str(s)) => s.clone(),
            _ => return Err(self.err("persistent id without a 'storage' tag")),
        };
        if &*tag != "storage" || a.len() < 5 {
            return Err(self.err(format!("unsupported persistent id `{tag}`")));
        }
        let kind = match &a[1] {
            V::Global(_, n) => storage_kind(n).ok_or_else(|| {
                anyhow!(
                    "{}: storage type `{n}` is not supported",
                    self.path.display()
                )
            })?,
            V::Dtype(k) => *k,
            other => return Err(self.err(format!("storage type is {}", self.describe(other)))),
        };
        let key = match &a[2] {
            V::Str(s) => s.to_string(),
            other => return Err(self.err(format!("storage key is {}", self.describe(other)))),
        };
        if key.is_empty() || key.contains('/') || key.contains("..") {
            return Err(self.err(format!("storage key `{key}` is not a plain name")));
        }
        let numel = self.int_of(&a[4])?;
        if numel < 0 {
            return Err(self.err("negative storage size"));
        }
        Ok(V::Storage(Rc::new(Storage {
            kind,
            key,
            numel: numel as u64,
        })))
    }

    fn set_items(&mut self, target: &V, items: Vec<(V, V)>) -> Result<()> {
        match target {
            V::Ref(i) => match &mut self.arena[*i] {
                Container::Dict(d) | Container::Opaque { items: d, .. } => {
                    d.extend(items);
                    Ok(())
                }
                _ => Err(self.err("SETITEMS on a value that is not a dict")),
            },
            _ => Err(self.err("SETITEMS on a value that is not a dict")),
        }
    }

    fn append(&mut self, target: &V, items: Vec<V>) -> Result<()> {
        match target {
            V::Ref(i) => match &mut self.arena[*i] {
                Container::List(l) => {
                    l.extend(items);
                    Ok(())
                }
                Container::Opaque { .. } => Ok(()),
                _ => Err(self.err("APPEND on a value that is not a list")),
            },
            _ => Err(self.err("APPEND on a value that is not a list")),
        }
    }

    /// Runs the pickle to STOP and returns its value.
    fn run(&mut self) -> Result<V> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(self.err(format!("pickle protocol {proto}")));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.stack.push(V::None),
                0x88 => self.stack.push(V::Bool(true)),
                0x89 => self.stack.push(V::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.stack.push(V::Int(v as i64))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(V::Int(v as i64))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(V::Int(v as i64))
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let b = self.take(n)?;
                    self.stack.push(long_value(b));
                }
                b'I' | b'L' => {
                    let l = self.line()?;
                    let s = std::str::from_utf8(l).map_err(|_| self.err("bad INT"))?;
                    let s = s.trim_end_matches('L');
                    self.stack.push(match s {
                        "00" => V::Bool(false),
                        "01" => V::Bool(true),
                        _ => s.parse::<i64>().map(V::Int).unwrap_or(V::BigInt),
                    });
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(V::Float)
                }
                b'F' => {
                    let l = self.line()?;
                    let v = std::str::from_utf8(l)
                        .ok()
                        .and_then(|s| s.parse::<f64>().ok());
                    v.ok_or_else(|| self.err("bad FLOAT"))?;
                    self.stack.push(V::Float)
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as usize,
                        0x8c => self.u8()? as usize,
                        _ => self.len_u64()?,
                    };
                    let b = self.take(n)?;
                    let s = self.utf8(b)?;
                    self.stack.push(V::Str(s))
                }
                b'V' => {
                    // raw-unicode-escape text; checkpoints do not use it for names that matter
                    let l = self.line()?;
                    let s = String::from_utf8_lossy(l);
                    self.stack.push(V::Str(Rc::from(&*s)))
                }
                b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'T' | b'B' => self.u32()? as usize,
                        b'U' | b'C' => self.u8()? as usize,
                        _ => self.len_u64()?,
                    };
                    let b = self.take(n)?;
                    self.stack.push(match op {
                        // py2 str: text for our purposes (names)
                        b'T' | b'U' => V::Str(Rc::from(&*String::from_utf8_lossy(b))),
                        _ => V::Bytes,
                    })
                }
                b'S' => {
                    let l = self.line()?;
                    let s = String::from_utf8_lossy(l);
                    let s = s.trim_matches(|c| c == '\'' || c == '"');
                    self.stack.push(V::Str(Rc::from(s)))
                }
                b')' => self.push_new(Container::Tuple(vec![])),
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push_new(Container::Tuple(items))
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_new(Container::Tuple(items))
                }
                b']' => self.push_new(Container::List(vec![])),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push_new(Container::List(items))
                }
                b'}' => self.push_new(Container::Dict(vec![])),
                b'd' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.err("DICT with an odd number of items"));
                    }
                    let pairs = pairs(items);
                    self.push_new(Container::Dict(pairs))
                }
                0x8f => self.push_new(Container::List(vec![])),
                0x90 => {
                    let items = self.pop_mark()?;
                    let t = self.top()?.clone();
                    self.append(&t, items)?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push_new(Container::List(items))
                }
                b'a' => {
                    let x = self.pop()?;
                    let t = self.top()?.clone();
                    self.append(&t, vec![x])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let t = self.top()?.clone();
                    self.append(&t, items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let t = self.top()?.clone();
                    self.set_items(&t, vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.err("SETITEMS with an odd number of items"));
                    }
                    let t = self.top()?.clone();
                    self.set_items(&t, pairs(items))?;
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?.clone();
                    self.stack.push(t)
                }
                b'p' => {
                    let l = self.line()?;
                    let i = std::str::from_utf8(l)
                        .ok()
                        .and_then(|s| s.parse::<u32>().ok());
                    self.memo_put(i.ok_or_else(|| self.err("bad PUT index"))?)?
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                0x94 => {
                    let i =
                        u32::try_from(self.memo.len()).map_err(|_| self.err("memo too large"))?;
                    self.memo_put(i)?
                }
                b'g' => {
                    let l = self.line()?;
                    let i = std::str::from_utf8(l)
                        .ok()
                        .and_then(|s| s.parse::<u32>().ok());
                    let v = self.memo_get(i.ok_or_else(|| self.err("bad GET index"))?)?;
                    self.stack.push(v)
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    let v = self.memo_get(i)?;
                    self.stack.push(v)
                }
                b'j' => {
                    let i = self.u32()?;
                    let v = self.memo_get(i)?;
                    self.stack.push(v)
                }
                b'c' => {
                    let m = self.line()?;
                    let n = self.line()?;
                    let (m, n) = (self.utf8(m)?, self.utf8(n)?);
                    let g = self.global(m, n)?;
                    self.stack.push(g)
                }
                0x93 => {
                    let n = self.pop()?;
                    let m = self.pop()?;
                    let (V::Str(m), V::Str(n)) = (m, n) else {
                        return Err(self.err("STACK_GLOBAL needs two strings"));
                    };
                    let g = self.global(m, n)?;
                    self.stack.push(g)
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.call(f, args)?;
                    self.stack.push(v)
                }
                0x81 => {
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    let name = self.describe(&cls);
                    let v = self.opaque(name);
                    self.stack.push(v)
                }
                0x92 => {
                    let _kw = self.pop()?;
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    let name = self.describe(&cls);
                    let v = self.opaque(name);
                    self.stack.push(v)
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err(self.err("OBJ without a class"));
                    }
                    let cls = items.remove(0);
                    let name = self.describe(&cls);
                    let v = self.opaque(name);
                    self.stack.push(v)
                }
                b'i' => {
                    let m = self.line()?;
                    let n = self.line()?;
                    let (m, n) = (self.utf8(m)?, self.utf8(n)?);
                    self.global(m.clone(), n.clone())?;
                    self.pop_mark()?;
                    let v = self.opaque(format!("{m}.{n}"));
                    self.stack.push(v)
                }
                b'b' => {
                    // BUILD: state is applied to dicts (as __setstate__-less dict update) and
                    // dropped for everything else.
                    let state = self.pop()?;
                    let t = self.top()?.clone();
                    if let (V::Ref(ti), V::Ref(si)) = (&t, &state) {
                        if let Container::Dict(items) = &self.arena[*si] {
                            let items = items.clone();
                            if let Container::Opaque { items: d, .. } = &mut self.arena[*ti] {
                                d.extend(items);
                            }
                        }
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.stack.push(v)
                }
                b'P' => return Err(self.err("text persistent ids are not used by torch.save")),
                0x82..=0x84 => return Err(self.err("extension registry codes are not supported")),
                0x97 | 0x98 => return Err(self.err("out-of-band buffers are not supported")),
                other => return Err(self.err(format!("unknown opcode 0x{other:02x}"))),
            }
        }
    }

    /// The entries of a dict value (an opaque object's state dict included); None otherwise.
    fn dict_items(&self, v: &V) -> Option<&Vec<(V, V)>> {
        match v {
            V::Ref(i) => match &self.arena[*i] {
                Container::Dict(d) | Container::Opaque { items: d, .. } => Some(d),
                _ => None,
            },
            _ => None,
        }
    }

    /// `str: str` entries of a dict value.
    fn string_items(&self, v: &V) -> HashMap<String, String> {
        let items = self.dict_items(v).into_iter().flatten();
        items
            .filter_map(|(k, v)| match (k, v) {
                (V::Str(k), V::Str(v)) => Some((k.to_string(), v.to_string())),
                _ => None,
            })
            .collect()
    }

    /// `str: int` entries of a dict value.
    fn int_items(&self, v: &V) -> HashMap<String, i64> {
        let items = self.dict_items(v).into_iter().flatten();
        items
            .filter_map(|(k, v)| match (k, v) {
                (V::Str(k), V::Int(v)) => Some((k.to_string(), *v)),
                _ => None,
            })
            .collect()
    }

    fn has_str_key(&self, v: &V, key: &str) -> bool {
        let mut items = self.dict_items(v).into_iter().flatten();
        items.any(|(k, _)| matches!(k, V::Str(s) if &**s == key))
    }

    /// The tensors of `top["state_dict"]` (or of `top`), in the pickle's order.
    fn state_dict_of(&self, top: &V) -> Result<Vec<(String, Rc<TensorV>)>> {
        let p = self.path.display();
        let dict_items = |v: &V| self.dict_items(v);
        let Some(items) = dict_items(top) else {
            bail!(
                "{p}: the checkpoint holds {}, not a dict of tensors",
                self.describe(top)
            );
        };
        let sd = items
            .iter()
            .rev() // a repeated key: the last one wins, as in a Python dict
            .find(|(k, _)| matches!(k, V::Str(s) if &**s == "state_dict"))
            .map(|(_, v)| v);
        let items = match sd {
            Some(v) => dict_items(v).with_context(|| {
                format!("{p}: `state_dict` holds {}, not a dict", self.describe(v))
            })?,
            None => items,
        };
        let mut out: Vec<(String, Rc<TensorV>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for (k, v) in items {
            if let (V::Str(k), V::Tensor(t)) = (k, v) {
                match index.get(&**k) {
                    Some(&i) => out[i].1 = t.clone(),
                    None => {
                        index.insert(k.to_string(), out.len());
                        out.push((k.to_string(), t.clone()));
                    }
                }
            }
        }
        if out.is_empty() {
            bail!("{p}: the checkpoint holds no tensors (neither in `state_dict` nor at the top level)");
        }
        Ok(out)
    }
}

fn pairs(items: Vec<V>) -> Vec<(V, V)> {
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    out
}

/// A little-endian two's-complement integer of LONG1/LONG4.
fn long_value(b: &[u8]) -> V {
    if b.is_empty() {
        return V::Int(0);
    }
    if b.len() > 8 {
        return V::BigInt;
    }
    let mut buf = if b[b.len() - 1] & 0x80 != 0 {
        [0xffu8; 8]
    } else {
        [0u8; 8]
    };
    buf[..b.len()].copy_from_slice(b);
    V::Int(i64::from_le_bytes(buf))
}

// ---------------------------------------------------------------------------------------------
// Writing: what `torch.save(state_dict, path)` writes for a dict of dense CPU tensors.

/// `torch.save(OrderedDict(tensors), path)` in torch's zip format (pickle protocol 2, one
/// uncompressed 64-byte-aligned `data/<i>` entry per tensor), written atomically. Readable by
/// `torch.load(..., weights_only=True)`: it names only `collections.OrderedDict`,
/// `torch._utils._rebuild_tensor_v2` and `torch.*Storage`.
pub fn write_state_dict(path: &Path, tensors: &[(String, tch::Tensor)]) -> Result<()> {
    write_pickle(path, tensors, None)
}

/// What sd-scripts' `save_stable_diffusion_checkpoint` writes to a `.ckpt`:
/// `torch.save({"state_dict": {...}, "epoch": e, "global_step": s})`, the state dict a plain dict.
pub fn write_checkpoint(
    path: &Path,
    tensors: &[(String, tch::Tensor)],
    epoch: i64,
    global_step: i64,
) -> Result<()> {
    write_pickle(path, tensors, Some((epoch, global_step)))
}

fn write_pickle(
    path: &Path,
    tensors: &[(String, tch::Tensor)],
    wrap: Option<(i64, i64)>,
) -> Result<()> {
    use std::io::Write;
    let archive = path
        .file_stem()
        .map(|s| {
            s.to_string_lossy().replace(
                |c: char| !c.is_ascii_alphanumeric() && c != '_' && c != '-',
                "_",
            )
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "archive".into());
    let mut pkl = PickleWriter::default();
    pkl.bytes(&[0x80, 2]); // PROTO 2
    if wrap.is_some() {
        pkl.bytes(b"}("); // EMPTY_DICT, MARK
        pkl.str("state_dict");
        pkl.bytes(b"}("); // the state dict: a plain dict, MARK
    } else {
        pkl.global("collections", "OrderedDict");
        pkl.bytes(b")R("); // () REDUCE, MARK
    }
    let mut blobs: Vec<Vec<u8>> = Vec::with_capacity(tensors.len());
    for (i, (name, t)) in tensors.iter().enumerate() {
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let Some(storage) = storage_class(t.kind()) else {
            bail!(
                "{}: tensor `{name}` has dtype {:?}, which cannot be written",
                path.display(),
                t.kind()
            );
        };
        let numel = t.numel();
        let mut data = vec![0u8; numel * elem_size(t.kind())];
        if numel > 0 {
            t.f_copy_data_u8(&mut data, numel)
                .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
        }
        blobs.push(data);
        let shape = t.size();
        let mut stride = vec![1i64; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1].max(1);
        }
        pkl.str(name);
        pkl.global("torch._utils", "_rebuild_tensor_v2");
        pkl.bytes(b"((");
        pkl.str("storage");
        pkl.global("torch", storage);
        pkl.str(&i.to_string());
        pkl.str("cpu");
        pkl.int(numel as i64);
        pkl.bytes(b"tQ"); // the persistent id tuple, BINPERSID
        pkl.int(0); // storage offset
        pkl.ints(&shape);
        pkl.ints(&stride);
        pkl.bytes(&[0x89]); // requires_grad False
        pkl.global("collections", "OrderedDict");
        pkl.bytes(b")R"); // backward hooks
        pkl.bytes(b"tR"); // the arguments tuple, REDUCE
    }
    pkl.bytes(b"u"); // SETITEMS
    if let Some((epoch, step)) = wrap {
        pkl.str("epoch");
        pkl.int(epoch);
        pkl.str("global_step");
        pkl.int(step);
        pkl.bytes(b"u"); // SETITEMS of the outer dict
    }
    pkl.bytes(b"."); // STOP

    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::FileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(blobs.iter().any(|b| b.len() as u64 >= 0xffff_ffff));
    let mut entry = |name: String, bytes: &[u8]| -> Result<()> {
        zip.start_file_aligned(name, opts, 64)
            .map_err(|e| anyhow!("{}: zip: {e}", path.display()))?;
        zip.write_all(bytes)?;
        Ok(())
    };
    entry(format!("{archive}/data.pkl"), &pkl.0)?;
    entry(format!("{archive}/byteorder"), b"little")?;
    for (i, b) in blobs.iter().enumerate() {
        entry(format!("{archive}/data/{i}"), b)?;
    }
    entry(format!("{archive}/version"), b"3\n")?;
    let buf = zip
        .finish()
        .map_err(|e| anyhow!("{}: zip: {e}", path.display()))?
        .into_inner();
    crate::io::write_bytes_atomic(path, &buf)
}

#[derive(Default)]
struct PickleWriter(Vec<u8>);

impl PickleWriter {
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.bytes(module.as_bytes());
        self.0.push(b'\n');
        self.bytes(name.as_bytes());
        self.0.push(b'\n');
    }
    fn str(&mut self, s: &str) {
        self.0.push(b'X');
        self.bytes(&(s.len() as u32).to_le_bytes());
        self.bytes(s.as_bytes());
    }
    fn int(&mut self, v: i64) {
        match i32::try_from(v) {
            Ok(x) => {
                self.0.push(b'J');
                self.bytes(&x.to_le_bytes());
            }
            Err(_) => {
                self.bytes(&[0x8a, 8]);
                self.bytes(&v.to_le_bytes());
            }
        }
    }
    fn ints(&mut self, v: &[i64]) {
        self.0.push(b'(');
        for &x in v {
            self.int(x);
        }
        self.0.push(b't');
    }
}
