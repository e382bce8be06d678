//! Blockwise 8-bit AdamW with the numerics of bitsandbytes' `bnb.optim.AdamW8bit` (version 0.44
//! or later, block size 256), built from libtorch tensor ops so no bitsandbytes (and no CUDA build
//! of it) is needed. The target is the CUDA kernel `kOptimizerStatic8bit2StateBlockwise`, i.e.
//! what people train with; bnb's CPU backend is a different algorithm (spec: adamw8bit.md §6).
//!
//! Every step is a fixed sequence of whole-tensor ops (no per-element Rust loop), so it runs on
//! CPU and CUDA alike. The op order of each floating-point expression follows the kernel (and the
//! Python reference `adamw8bit_ref.py`) one rounding at a time, which is what makes the stored
//! codes bit-exact.
use super::common::{Optimizer, ParamGroup};
use super::optimizer_args::{kwargs_repr, parse_kwargs, PyValue};
use anyhow::{anyhow, bail, ensure, Result};
use std::collections::{HashMap, HashSet};
use tch::{Device, Kind, Tensor};

/// Elements per quantization block of the 8-bit states (bnb >= 0.44.0; it was 2048 before).
/// spec: adamw8bit.md §0, §2.1
pub const BLOCK: i64 = 256;
/// Module path + class name, as sd-scripts records it in `ss_optimizer`.
pub const CLASS_NAME: &str = "bitsandbytes.optim.adamw.AdamW8bit";
/// Index of the smallest positive code of the signed map. The kernel's idle lanes of a partial
/// last block load this byte for state1 (spec §2.1, tail-block padding).
const SIGNED_PAD_CODE: i64 = 128;
/// Index of +0.0 in the signed map; codes below it are negative (spec §1, layout of qmap1).
const SIGNED_ZERO_CODE: i64 = 127;

/// Hyper-parameters of `bnb.optim.AdamW8bit` (spec §4). `Default` gives bitsandbytes' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW8bitConfig {
    /// Default learning rate of every group (sd-scripts passes `--learning_rate`).
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    /// Decoupled, multiplicative decay applied after the Adam step (spec §3, step 6).
    pub weight_decay: f64,
    /// Tensors with fewer elements keep float32 states (spec §3.1). Strict less-than.
    pub min_8bit_size: i64,
}

impl Default for AdamW8bitConfig {
    fn default() -> Self {
        AdamW8bitConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
            min_8bit_size: 4096,
        }
    }
}

impl AdamW8bitConfig {
    /// The range checks bitsandbytes' constructor makes, with the offending key named.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: String| {
            Err(anyhow!(
                "AdamW8bit: invalid {what}: {v} (set it with --optimizer_args {what}=...)"
            ))
        };
        if self.lr.is_nan() || self.lr < 0.0 {
            bail!(
                "AdamW8bit: invalid learning rate {} (--learning_rate)",
                self.lr
            );
        }
        if self.eps.is_nan() || self.eps < 0.0 {
            return bad("eps", self.eps.to_string());
        }
        let (b1, b2) = self.betas;
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            return bad("betas", format!("({b1}, {b2}); each must be in [0, 1)"));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return bad("weight_decay", self.weight_decay.to_string());
        }
        if self.min_8bit_size < 0 {
            return bad("min_8bit_size", self.min_8bit_size.to_string());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// --optimizer_args parsing
// ---------------------------------------------------------------------------------------------

/// Parses sd-scripts' `--optimizer_args` (`key=value` strings, values are Python literals, e.g.
/// `betas=0.9,0.99`, `betas=(0.9,0.99)`, `weight_decay=1e-2`) into a config with bnb's defaults
/// for everything not given. `lr` stays the default: the caller sets it from `--learning_rate`.
pub fn parse_optimizer_args(args: &[String]) -> Result<AdamW8bitConfig> {
    config_from_kwargs(&parse_kwargs(args, "--optimizer_args")?)
}

/// The AdamW8bit hyper-parameters from already parsed `--optimizer_args`; an unknown key or a
/// value bnb's blockwise AdamW8bit would not compute with is an error naming the key.
pub fn config_from_kwargs(kwargs: &[(String, PyValue)]) -> Result<AdamW8bitConfig> {
    let mut cfg = AdamW8bitConfig::default();
    for (key, lit) in kwargs {
        let ctx = || format!("--optimizer_args {key}={} for AdamW8bit", lit.repr());
        let num = |lit: &PyValue| {
            lit.as_f64()
                .ok_or_else(|| anyhow!("{}: expected a number", ctx()))
        };
        match key.as_str() {
            "betas" => match lit.as_seq() {
                Some([b1, b2]) => cfg.betas = (num(b1)?, num(b2)?),
                _ => bail!("{}: betas needs two numbers, e.g. betas=0.9,0.999", ctx()),
            },
            "eps" => cfg.eps = num(lit)?,
            "weight_decay" => cfg.weight_decay = num(lit)?,
            "min_8bit_size" => match lit {
                PyValue::Int(i) => cfg.min_8bit_size = *i,
                _ => bail!("{}: min_8bit_size must be an integer", ctx()),
            },
            // Accepted with the only value bnb's blockwise AdamW8bit computes with, so configs
            // written for bitsandbytes keep working; anything else would change the maths.
            "amsgrad" => ensure!(
                !lit.truthy(),
                "{}: amsgrad=True is not supported by bitsandbytes' AdamW8bit",
                ctx()
            ),
            "block_wise" => ensure!(
                lit.truthy(),
                "{}: only the blockwise 8-bit path exists (block_wise=True)",
                ctx()
            ),
            "percentile_clipping" => ensure!(
                num(lit)? == 100.0,
                "{}: percentile clipping is not implemented; only 100 (off) is accepted",
                ctx()
            ),
            // bnb ignores optim_bits for AdamW8bit (8 is forced) and paging only moves buffers
            // into CUDA unified memory without changing the numbers.
            "optim_bits" | "is_paged" => {}
            "lr" => bail!(
                "{}: lr is given by --learning_rate (sd-scripts would fail with 'multiple values for lr')",
                ctx()
            ),
            _ => bail!(
                "{}: unknown key '{key}'; AdamW8bit accepts betas, eps, weight_decay, min_8bit_size \
                 (and amsgrad=False, block_wise=True, percentile_clipping=100, optim_bits, is_paged)",
                ctx()
            ),
        }
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Builds the optimizer as sd-scripts' `get_optimizer` does for `--optimizer_type AdamW8bit`
/// (or `--use_8bit_adam`): `lr = --learning_rate` plus the parsed `--optimizer_args`. Returns
/// it with sd-scripts' log line.
pub fn build(
    kwargs: &[(String, PyValue)],
    groups: Vec<ParamGroup>,
    learning_rate: f64,
) -> Result<(Box<dyn Optimizer>, String)> {
    let mut cfg = config_from_kwargs(kwargs)?;
    cfg.lr = learning_rate;
    let line = format!("use 8-bit AdamW optimizer | {}", kwargs_repr(kwargs));
    Ok((Box::new(AdamW8bit::new(groups, cfg)?), line))
}

// ---------------------------------------------------------------------------------------------
// Quantization maps and the nearest-code rule
// ---------------------------------------------------------------------------------------------

/// The 256-entry dynamic code book (`create_dynamic_map(signed, 7, 8)`), float32, on the CPU.
/// Built with the same float32 tensor ops as bitsandbytes so the values are bit-identical; the
/// float64 formula would differ by 1 ulp in ~80 entries (spec §1, bit-exactness).
pub fn dynamic_map(signed: bool) -> Tensor {
    let mut parts = Vec::new();
    for e in 0..7i32 {
        // Signed: 2^e intervals per decade; unsigned uses the sign bit too: 2^(e+1).
        let k = if signed { 1i64 << e } else { 1i64 << (e + 1) };
        let b = Tensor::linspace(0.1, 1.0, k + 1, (Kind::Float, Device::Cpu));
        let mids = (b.narrow(0, 0, k) + b.narrow(0, 1, k)) / 2.0;
        // Python computes 10.0**(e-6) in float64 and rounds it to float32 once.
        let scale: f64 = format!("1e{}", e - 6).parse().expect("decimal literal");
        let v = mids * f64::from(scale as f32);
        if signed {
            parts.push(-&v);
        }
        parts.push(v);
    }
    parts.push(Tensor::from_slice(&[0f32, 1.0]));
    let code = Tensor::cat(&parts, 0);
    assert_eq!(
        code.numel(),
        256,
        "the (7, 8) dynamic map has exactly 256 values"
    );
    code.sort(0, false).0
}

/// Decision boundaries b such that #{b < x} is the kernel's nearest-code choice with ties to the
/// even index (spec §2.1): boundary k separates code k from k+1 at their float32 midpoint.
/// An x exactly on the midpoint must go up when k is odd (k+1 even), so for odd k the boundary
/// is the next float below the midpoint: x > nextdown(mid) <=> x >= mid.
fn decision_bounds(code: &[f32]) -> Vec<f32> {
    code.windows(2)
        .enumerate()
        .map(|(k, w)| {
            let mid = (w[0] + w[1]) * 0.5;
            if k % 2 == 1 {
                next_down(mid)
            } else {
                mid
            }
        })
        .collect()
}

fn next_down(x: f32) -> f32 {
    debug_assert!(x.is_finite() && x != 0.0);
    if x > 0.0 {
        f32::from_bits(x.to_bits() - 1)
    } else {
        f32::from_bits(x.to_bits() + 1)
    }
}

/// Nearest-code search as a table lookup on the float's bit pattern plus one exact comparison
/// (libtorch's `bucketize` is a scalar binary search, ~10x slower on the CPU). The raw f32 bits
/// shifted right by `shift` name a bucket, a contiguous range of floats of one sign; the shift is
/// chosen so no bucket holds more than one decision boundary, hence
/// #{b < x} = lo + (x > b[lo]) with lo = #{b < smallest float of the bucket}.
struct CodeSearch {
    lut: Tensor,
    /// The 255 boundaries followed by +inf (the lookup for lo = 255 must never count).
    bounds: Tensor,
    shift: i64,
    offset: i64,
}

impl CodeSearch {
    /// `sign_fix`: fold state1's sign fix into the table, valid for NaN-free x whose sign equals
    /// m's (absmax > 0). Then the only correction is a value with the sign bit set (negative or
    /// -0.0) that rounded to +0.0 (code 127) and must store 126; non-negative x never lands below
    /// 127. Negative buckets are capped at 126, and boundary 126 (only negative buckets read it)
    /// becomes +inf so the comparison can no longer step to 127.
    fn new(bounds: &[f32], device: Device, sign_fix: bool) -> CodeSearch {
        for shift in (8..=20).rev() {
            if let Some(mut lut) = Self::table(bounds, shift) {
                let mut ext = bounds.to_vec();
                ext.push(f32::INFINITY);
                if sign_fix {
                    let offset = 1i64 << (31 - shift);
                    let fixed = (SIGNED_ZERO_CODE - 1) as i32;
                    // Buckets below `offset` hold the floats with the sign bit set.
                    for e in &mut lut[..offset as usize] {
                        *e = (*e).min(fixed);
                    }
                    ext[fixed as usize] = f32::INFINITY;
                }
                return CodeSearch {
                    lut: Tensor::from_slice(&lut).to_device(device),
                    bounds: Tensor::from_slice(&ext).to_device(device),
                    shift,
                    offset: 1i64 << (31 - shift),
                };
            }
        }
        unreachable!("decision boundaries closer than 2^8 ulps")
    }

    /// lo per bucket, or None when some bucket would hold two boundaries.
    fn table(bounds: &[f32], shift: i64) -> Option<Vec<i32>> {
        let count_below = |v: f32| bounds.partition_point(|&b| b < v) as i32;
        let buckets = 1i64 << (32 - shift);
        let offset = 1i64 << (31 - shift);
        let mut lut = Vec::with_capacity(buckets as usize);
        for j in 0..buckets {
            let first = (((j - offset) << shift) as i32) as u32;
            let last = first + ((1u32 << shift) - 1);
            let (a, b) = (f32::from_bits(first), f32::from_bits(last));
            // Negative floats grow in magnitude with their bits, so the range is reversed.
            let (lo_v, hi_v) = if first >> 31 == 0 { (a, b) } else { (b, a) };
            // Buckets at the ends of the exponent range also hold NaNs, which never reach the
            // lookup (they are mapped to -inf first); bound the range by its non-NaN end.
            let (lo_v, hi_v) = match (lo_v.is_nan(), hi_v.is_nan()) {
                (false, false) => (lo_v, hi_v),
                (true, false) => (hi_v, hi_v),
                (false, true) => (lo_v, lo_v),
                (true, true) => {
                    lut.push(0);
                    continue;
                }
            };
            let below = count_below(lo_v);
            let inside = bounds.partition_point(|&b| b <= hi_v) as i32 - below;
            if inside > 1 {
                return None;
            }
            lut.push(below);
        }
        Some(lut)
    }

    /// int32 code indices of `x` (f32, contiguous, no NaN).
    fn search(&self, x: &Tensor) -> Tensor {
        let mut key = x
            .view_dtype(Kind::Int)
            .bitwise_right_shift_tensor_scalar(self.shift);
        let _ = key.g_add_scalar_(self.offset);
        let mut lo = self.lut.index_select(0, &key.view([-1]));
        let b = self.bounds.index_select(0, &lo);
        let _ = lo.g_add_(&x.view([-1]).gt_tensor(&b));
        lo.view(x.size().as_slice())
    }
}

/// The two code books and their nearest-code searches on one device.
pub struct CodeMaps {
    pub signed: Tensor,
    pub unsigned: Tensor,
    search_signed: CodeSearch,
    search_signed_fix: CodeSearch,
    search_unsigned: CodeSearch,
}

impl CodeMaps {
    pub fn new(device: Device) -> CodeMaps {
        let mk = |signed: bool| {
            let code = dynamic_map(signed);
            let v: Vec<f32> = Vec::<f32>::try_from(&code).expect("f32 code book");
            (code.to_device(device), decision_bounds(&v))
        };
        let (signed, bounds_signed) = mk(true);
        let (unsigned, bounds_unsigned) = mk(false);
        CodeMaps {
            signed,
            unsigned,
            search_signed: CodeSearch::new(&bounds_signed, device, false),
            search_signed_fix: CodeSearch::new(&bounds_signed, device, true),
            search_unsigned: CodeSearch::new(&bounds_unsigned, device, false),
        }
    }

    fn search(&self, signed: bool) -> &CodeSearch {
        if signed {
            &self.search_signed
        } else {
            &self.search_unsigned
        }
    }
}

/// Index of the nearest code for each normalised value `x` (f32), as int32: ties go to the even
/// index, NaN to 0, below the map to 0, above it to 255 (spec §2.1). Consumes `x` as scratch.
fn nearest_code_(mut x: Tensor, maps: &CodeMaps, signed: bool) -> Tensor {
    // NaN (0/0 for an all-zero block) must choose code 0, which is where -inf lands.
    let _ = x.nan_to_num_(f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    let x = x.contiguous();
    maps.search(signed).search(&x)
}

/// Nearest-code indices (int64) of `x` in the signed or unsigned map; the public form of the rule
/// the optimizer uses, for tests and tools.
pub fn nearest_code(x: &Tensor, maps: &CodeMaps, signed: bool) -> Tensor {
    nearest_code_(x.to_kind(Kind::Float).copy(), maps, signed).to_kind(Kind::Int64)
}

/// The standalone CUDA `quantize_blockwise` (spec §2.2): absmax per block, x = A * (1/absmax),
/// nearest code, no sign fix. Returns (uint8 codes with A's shape, f32 absmax[nblocks]).
pub fn quantize_blockwise(
    a: &Tensor,
    maps: &CodeMaps,
    signed: bool,
    blocksize: i64,
) -> (Tensor, Tensor) {
    let flat = a.to_kind(Kind::Float).reshape([-1]);
    let n = flat.numel() as i64;
    let nb = (n + blocksize - 1) / blocksize;
    let blocks = flat
        .constant_pad_nd([0, nb * blocksize - n])
        .view([nb, blocksize]);
    let absmax = blocks.abs().amax([1i64].as_slice(), false);
    let inv = absmax.reciprocal();
    let x = (blocks * inv.unsqueeze(1)).view([-1]).narrow(0, 0, n);
    let q = nearest_code_(x, maps, signed).to_kind(Kind::Uint8);
    (q.view(a.size().as_slice()), absmax)
}

/// `code[q] * absmax[i / blocksize]` as float32 with q's shape.
pub fn dequantize_blockwise(q: &Tensor, absmax: &Tensor, code: &Tensor, blocksize: i64) -> Tensor {
    let n = q.numel() as i64;
    let nb = absmax.numel() as i64;
    let vals = code
        .index_select(0, &q.reshape([-1]).to_kind(Kind::Int))
        .constant_pad_nd([0, nb * blocksize - n])
        .view([nb, blocksize]);
    (vals * absmax.unsqueeze(1))
        .view([-1])
        .narrow(0, 0, n)
        .view(q.size().as_slice())
}

// ---------------------------------------------------------------------------------------------
// The optimizer
// ---------------------------------------------------------------------------------------------

enum Moments {
    /// Codes padded to whole blocks: lanes past the tensor's end hold the bytes the kernel's idle
    /// threads read (128 for state1, 0 for state2), so the padded block max equals the kernel's.
    EightBit {
        state1: Tensor,
        state2: Tensor,
        absmax1: Tensor,
        absmax2: Tensor,
    },
    /// Float32 m and v for tensors under `min_8bit_size` (spec §3.1), flat.
    Full { m: Tensor, v: Tensor },
}

struct ParamState {
    /// Updates done on this parameter (bnb's `state["step"]`).
    step: i64,
    moments: Moments,
}

struct Slot {
    name: String,
    param: Tensor,
    numel: i64,
    state: Option<ParamState>,
}

struct Group {
    name: String,
    lr: f64,
    slots: Vec<Slot>,
    /// Set while the slots' states are views into shared buffers (see [`Batch`]).
    batches: Vec<Batch>,
}

/// Parameters of one group updated together by whole-buffer kernels. Their states are views into
/// shared flat buffers, each tensor keeping its own block padding, so one step is a few dozen
/// kernels for the group rather than ~40 per tensor: on a GPU the launches dominated (a LoRA has
/// ~500 small tensors). Every element and every 256-block sees the same arithmetic as the
/// per-tensor update, so the results are bit-identical.
struct Batch {
    eight_bit: bool,
    /// (slot index, element offset, numel, padded length) in slot order.
    members: Vec<(usize, i64, i64, i64)>,
    /// Flat state1/state2 (8-bit codes, or f32 m/v) and, for 8-bit, absmax1/absmax2.
    s1: Tensor,
    s2: Tensor,
    absmax: Option<(Tensor, Tensor)>,
    len: i64,
}

/// The kernel's per-call scalars, each an exact float32 value held as f64 (spec §3 table).
struct Scalars {
    b1: f64,
    b2: f64,
    omb1: f64,
    omb2: f64,
    step_size: f64,
    c2eps: f64,
    decay: f64,
    decay_on: bool,
}

/// `beta^t` in float32 through libtorch's own pow, the exact function the reference calls.
fn pow_f32(beta: f32, t: i64) -> f32 {
    Tensor::from_slice(&[beta])
        .pow_tensor_scalar(t)
        .double_value(&[0]) as f32
}

/// sqrt as the reference computes it: libtorch's CPU float sqrt, which goes through MKL and is
/// not correctly rounded on every CPU (on AMD EPYC, sqrt(1 - 0.95f^2) comes out 1 ulp above
/// Rust's f32::sqrt). bitsandbytes' CUDA sqrt is fast-math anyway, so the reference is the
/// target, and matching its op keeps the two bit-identical on any CPU vendor.
fn sqrt_f32(x: f32) -> f32 {
    Tensor::from_slice(&[x]).sqrt().double_value(&[0]) as f32
}

impl Scalars {
    fn new(cfg: &AdamW8bitConfig, lr: f64, step: i64, pows: &mut HashMap<i64, (f32, f32)>) -> Self {
        // Every hyper-parameter reaches the kernel as a C float and all arithmetic is float32;
        // 1 - 0.999 in f64 would be 1.3e-5 relative off omb2 (spec §3, §7 scalars).
        let (lr, b1, b2) = (lr as f32, cfg.betas.0 as f32, cfg.betas.1 as f32);
        let (eps, wd) = (cfg.eps as f32, cfg.weight_decay as f32);
        let &mut (p1, p2) = pows
            .entry(step)
            .or_insert_with(|| (pow_f32(b1, step), pow_f32(b2, step)));
        let c1 = 1.0f32 - p1;
        let c2 = sqrt_f32(1.0f32 - p2);
        let step_size = (-lr * c2) / c1;
        Scalars {
            b1: b1.into(),
            b2: b2.into(),
            omb1: (1.0f32 - b1).into(),
            omb2: (1.0f32 - b2).into(),
            step_size: step_size.into(),
            c2eps: (c2 * eps).into(),
            decay: (1.0f32 - lr * wd).into(),
            decay_on: wd > 0.0,
        }
    }
}

/// bitsandbytes-compatible blockwise 8-bit AdamW. States live on each parameter's device: uint8
/// codes for m and v plus one float32 absmax per 256 elements for each (≈2.03 bytes/parameter).
pub struct AdamW8bit {
    cfg: AdamW8bitConfig,
    groups: Vec<Group>,
    maps: Vec<(Device, CodeMaps)>,
    step_count: i64,
    general_path: bool,
}

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
    )
}

impl AdamW8bit {
    /// Groups in the trainer's order (e.g. "textencoder", "unet"), each with its current lr;
    /// `cfg.lr` is only the default for `from_tensors`. Parameters are named by their index over
    /// all groups, so state keys are `state.{i}.{field}` as torch's `state_dict()` numbers them.
    pub fn new(groups: Vec<ParamGroup>, cfg: AdamW8bitConfig) -> Result<AdamW8bit> {
        cfg.validate()?;
        let mut index = 0usize;
        let mut out = Vec::with_capacity(groups.len());
        for g in groups {
            ensure!(
                g.lr >= 0.0,
                "AdamW8bit: group '{}' has a negative learning rate {}",
                g.name,
                g.lr
            );
            let mut slots = Vec::with_capacity(g.params.len());
            for param in g.params {
                ensure!(
                    is_float(param.kind()),
                    "AdamW8bit: parameter {index} of group '{}' has kind {:?}; only floating \
                     tensors can be trained",
                    g.name,
                    param.kind()
                );
                slots.push(Slot {
                    name: index.to_string(),
                    numel: param.numel() as i64,
                    param,
                    state: None,
                });
                index += 1;
            }
            out.push(Group {
                name: g.name,
                lr: g.lr,
                slots,
                batches: Vec::new(),
            });
        }
        Ok(AdamW8bit {
            cfg,
            groups: out,
            maps: Vec::new(),
            step_count: 0,
            general_path: false,
        })
    }

    /// One group named "params" with the config's lr.
    pub fn from_tensors(params: Vec<Tensor>, cfg: AdamW8bitConfig) -> Result<AdamW8bit> {
        let lr = cfg.lr;
        AdamW8bit::new(vec![ParamGroup::new("params", params, lr)], cfg)
    }

    pub fn config(&self) -> &AdamW8bitConfig {
        &self.cfg
    }

    pub fn num_groups(&self) -> usize {
        self.groups.len()
    }

    pub fn group_name(&self, group: usize) -> &str {
        &self.groups[group].name
    }

    pub fn lr(&self, group: usize) -> f64 {
        self.groups[group].lr
    }

    /// Sets a group's learning rate; read at every step, weight decay included (spec §3).
    pub fn set_lr(&mut self, group: usize, lr: f64) {
        self.groups[group].lr = lr;
    }

    /// Always take the path that handles NaN/Inf and all-zero blocks (the one CUDA runs), even
    /// where the CPU fast paths apply; for tests that must cover both on the same data.
    #[doc(hidden)]
    pub fn force_general_path(&mut self, yes: bool) {
        self.general_path = yes;
    }

    /// Number of `step()` calls done (restored by `load_state_tensors`).
    pub fn step_count(&self) -> i64 {
        self.step_count
    }

    /// Zeroes every defined gradient. libtorch through tch cannot reset a grad to None, so unlike
    /// `zero_grad(set_to_none=True)` a parameter that got a gradient once keeps being stepped
    /// (with g = 0 if nothing flows into it again); in LoRA training every trained tensor gets a
    /// gradient each step, so the results are the same.
    pub fn zero_grad(&mut self) {
        for g in &mut self.groups {
            for s in &mut g.slots {
                s.param.zero_grad();
            }
        }
    }

    fn maps_index(&mut self, device: Device) -> usize {
        if let Some(i) = self.maps.iter().position(|(d, _)| *d == device) {
            return i;
        }
        self.maps.push((device, CodeMaps::new(device)));
        self.maps.len() - 1
    }

    fn new_state(&self, numel: i64, device: Device) -> ParamState {
        let moments = if numel < self.cfg.min_8bit_size {
            Moments::Full {
                m: Tensor::zeros([numel], (Kind::Float, device)),
                v: Tensor::zeros([numel], (Kind::Float, device)),
            }
        } else {
            let nb = (numel + BLOCK - 1) / BLOCK;
            let state1 = Tensor::zeros([nb * BLOCK], (Kind::Uint8, device));
            let _ = state1
                .narrow(0, numel, nb * BLOCK - numel)
                .fill_(SIGNED_PAD_CODE);
            Moments::EightBit {
                state1,
                state2: Tensor::zeros([nb * BLOCK], (Kind::Uint8, device)),
                absmax1: Tensor::zeros([nb], (Kind::Float, device)),
                absmax2: Tensor::zeros([nb], (Kind::Float, device)),
            }
        };
        ParamState { step: 0, moments }
    }

    /// One optimizer step over every parameter that has a gradient (parameters whose grad is
    /// undefined are skipped and their step counter does not advance, as in bnb).
    pub fn step(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let mut pows: HashMap<i64, (f32, f32)> = HashMap::new();
        for gi in 0..self.groups.len() {
            if self.batched_step(gi, &mut pows) {
                continue;
            }
            self.groups[gi].batches.clear();
            let lr = self.groups[gi].lr;
            for si in 0..self.groups[gi].slots.len() {
                let (grad, device, numel) = {
                    let s = &self.groups[gi].slots[si];
                    (s.param.grad(), s.param.device(), s.numel)
                };
                if !grad.defined() {
                    continue;
                }
                {
                    let s = &self.groups[gi].slots[si];
                    ensure!(
                        grad.size() == s.param.size() && grad.device() == device,
                        "AdamW8bit: gradient of '{}' has shape {:?} on {:?}, parameter {:?} on {:?}",
                        s.name,
                        grad.size(),
                        grad.device(),
                        s.param.size(),
                        device
                    );
                }
                if self.groups[gi].slots[si].state.is_none() {
                    let st = self.new_state(numel, device);
                    self.groups[gi].slots[si].state = Some(st);
                }
                let mi = self.maps_index(device);
                let maps = &self.maps[mi].1;
                let cfg = &self.cfg;
                let general = self.general_path;
                let slot = &mut self.groups[gi].slots[si];
                let st = slot.state.as_mut().expect("state initialised above");
                st.step += 1;
                let sc = Scalars::new(cfg, lr, st.step, &mut pows);
                match &mut st.moments {
                    Moments::Full { m, v } => update_32bit(&mut slot.param, &grad, m, v, &sc),
                    Moments::EightBit {
                        state1,
                        state2,
                        absmax1,
                        absmax2,
                    } => update_8bit(
                        &mut slot.param,
                        &grad,
                        [state1, state2],
                        [absmax1, absmax2],
                        maps,
                        &sc,
                        general,
                    ),
                }
            }
        }
        self.step_count += 1;
        Ok(())
    }

    /// The whole group in one [`Batch`] update per state kind, when every parameter has a
    /// gradient of its shape, is a contiguous float32 tensor on one device and all have done
    /// the same number of steps (the training case). Returns false to leave it to the
    /// per-tensor path.
    fn batched_step(&mut self, gi: usize, pows: &mut HashMap<i64, (f32, f32)>) -> bool {
        let g = &self.groups[gi];
        let Some(first) = g.slots.first() else {
            return false;
        };
        let device = first.param.device();
        let step = first.state.as_ref().map(|s| s.step);
        let eligible = g.slots.len() > 1
            && g.slots.iter().all(|s| {
                let grad = s.param.grad();
                grad.defined()
                    && grad.size() == s.param.size()
                    && grad.device() == device
                    && s.param.device() == device
                    && s.param.kind() == Kind::Float
                    && s.param.is_contiguous()
                    && s.state.as_ref().map(|st| st.step) == step
            });
        if !eligible {
            return false;
        }
        if self.groups[gi].batches.is_empty() {
            self.build_batches(gi, device);
        }
        let mi = self.maps_index(device);
        let maps = &self.maps[mi].1;
        let general = self.general_path;
        let g = &mut self.groups[gi];
        let step = step.unwrap_or(0) + 1;
        let sc = Scalars::new(&self.cfg, g.lr, step, pows);
        for b in &mut g.batches {
            let gflat = Tensor::zeros([b.len], (Kind::Float, device));
            let mut pflat = Tensor::zeros([b.len], (Kind::Float, device));
            for &(si, off, n, _) in &b.members {
                let p = &g.slots[si].param;
                gflat.narrow(0, off, n).copy_(&p.grad().reshape([-1]));
                pflat.narrow(0, off, n).copy_(&p.view([-1]));
            }
            if b.eight_bit {
                let (a1, a2) = b.absmax.as_mut().expect("8-bit batch has absmax");
                update_8bit(
                    &mut pflat,
                    &gflat,
                    [&mut b.s1, &mut b.s2],
                    [a1, a2],
                    maps,
                    &sc,
                    general,
                );
                for &(_, off, n, padded) in &b.members {
                    if padded > n {
                        // the kernel never stores its idle lanes (see update_8bit)
                        let _ = b.s1.narrow(0, off + n, padded - n).fill_(SIGNED_PAD_CODE);
                    }
                }
            } else {
                update_32bit(&mut pflat, &gflat, &mut b.s1, &mut b.s2, &sc);
            }
            for &(si, off, n, _) in &b.members {
                let p = &mut g.slots[si].param;
                let shape = p.size();
                p.copy_(&pflat.narrow(0, off, n).view(shape.as_slice()));
            }
        }
        for s in &mut g.slots {
            s.state.as_mut().expect("batched slots have state").step = step;
        }
        true
    }

    /// Gives every slot of group `gi` a state (fresh where it has none), then moves the states
    /// into shared buffers, one per kind (8-bit or float32), leaving views in the slots.
    fn build_batches(&mut self, gi: usize, device: Device) {
        for si in 0..self.groups[gi].slots.len() {
            if self.groups[gi].slots[si].state.is_none() {
                let st = self.new_state(self.groups[gi].slots[si].numel, device);
                self.groups[gi].slots[si].state = Some(st);
            }
        }
        let g = &mut self.groups[gi];
        let mut batches = Vec::new();
        for eight_bit in [true, false] {
            let mut members = Vec::new();
            let (mut s1s, mut s2s, mut a1s, mut a2s) = (vec![], vec![], vec![], vec![]);
            let mut off = 0i64;
            for (si, slot) in g.slots.iter().enumerate() {
                let st = slot.state.as_ref().expect("state made above");
                match (&st.moments, eight_bit) {
                    (
                        Moments::EightBit {
                            state1,
                            state2,
                            absmax1,
                            absmax2,
                        },
                        true,
                    ) => {
                        members.push((si, off, slot.numel, state1.numel() as i64));
                        off += state1.numel() as i64;
                        s1s.push(state1.shallow_clone());
                        s2s.push(state2.shallow_clone());
                        a1s.push(absmax1.shallow_clone());
                        a2s.push(absmax2.shallow_clone());
                    }
                    (Moments::Full { m, v }, false) => {
                        members.push((si, off, slot.numel, slot.numel));
                        off += slot.numel;
                        s1s.push(m.shallow_clone());
                        s2s.push(v.shallow_clone());
                    }
                    _ => {}
                }
            }
            if members.is_empty() {
                continue;
            }
            let s1 = Tensor::cat(&s1s, 0);
            let s2 = Tensor::cat(&s2s, 0);
            let absmax = eight_bit.then(|| (Tensor::cat(&a1s, 0), Tensor::cat(&a2s, 0)));
            let mut boff = 0i64;
            for &(si, off, _, padded) in &members {
                let st = g.slots[si].state.as_mut().expect("state made above");
                match &mut st.moments {
                    Moments::EightBit {
                        state1,
                        state2,
                        absmax1,
                        absmax2,
                    } => {
                        let nb = padded / BLOCK;
                        let (a1, a2) = absmax.as_ref().expect("8-bit");
                        *state1 = s1.narrow(0, off, padded);
                        *state2 = s2.narrow(0, off, padded);
                        *absmax1 = a1.narrow(0, boff, nb);
                        *absmax2 = a2.narrow(0, boff, nb);
                        boff += nb;
                    }
                    Moments::Full { m, v } => {
                        *m = s1.narrow(0, off, padded);
                        *v = s2.narrow(0, off, padded);
                    }
                }
            }
            batches.push(Batch {
                eight_bit,
                members,
                s1,
                s2,
                absmax,
                len: off,
            });
        }
        g.batches = batches;
    }

    /// Bytes held by optimizer state tensors (codes, absmax, or f32 moments) and the number of
    /// parameters that have state. The two 1 KiB code books per device are not counted.
    pub fn state_bytes(&self) -> (usize, usize) {
        let mut bytes = 0usize;
        let mut params = 0usize;
        for s in self.groups.iter().flat_map(|g| &g.slots) {
            let Some(st) = &s.state else { continue };
            params += s.numel as usize;
            let ts: Vec<&Tensor> = match &st.moments {
                Moments::EightBit {
                    state1,
                    state2,
                    absmax1,
                    absmax2,
                } => vec![state1, state2, absmax1, absmax2],
                Moments::Full { m, v } => vec![m, v],
            };
            bytes += ts
                .iter()
                .map(|t| t.numel() * t.kind().elt_size_in_bytes())
                .sum::<usize>();
        }
        (bytes, params)
    }

    /// The whole optimizer state as named CPU tensors, ready for a safetensors file. Layout per
    /// parameter follows bnb's `optimizer.state[p]`: `state.<name>.step` (i64[1]), `.state1`,
    /// `.state2` (uint8 codes with the parameter's shape, or f32 m / v below min_8bit_size),
    /// `.absmax1`, `.absmax2` (f32[ceil(n/256)]); plus `step_count` (i64[1]).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "step_count".to_string(),
            Tensor::from_slice(&[self.step_count]),
        )];
        for s in self.groups.iter().flat_map(|g| &g.slots) {
            let Some(st) = &s.state else { continue };
            let shape = s.param.size();
            let key = |f: &str| format!("state.{}.{f}", s.name);
            out.push((key("step"), Tensor::from_slice(&[st.step])));
            let exported = |t: &Tensor| {
                t.narrow(0, 0, s.numel)
                    .view(shape.as_slice())
                    .to_device(Device::Cpu)
                    .contiguous()
            };
            match &st.moments {
                Moments::EightBit {
                    state1,
                    state2,
                    absmax1,
                    absmax2,
                } => {
                    out.push((key("state1"), exported(state1)));
                    out.push((key("state2"), exported(state2)));
                    out.push((key("absmax1"), absmax1.to_device(Device::Cpu)));
                    out.push((key("absmax2"), absmax2.to_device(Device::Cpu)));
                }
                Moments::Full { m, v } => {
                    out.push((key("state1"), exported(m)));
                    out.push((key("state2"), exported(v)));
                }
            }
        }
        out
    }

    /// Restores what `state_tensors` produced (e.g. read back from a `--save_state` file). Every
    /// key must belong to a parameter of this optimizer with matching shape and kind; a parameter
    /// without keys starts fresh, as it had no state when saved.
    pub fn load_state_tensors(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        let mut by_key: HashMap<&str, &Tensor> = HashMap::new();
        for (k, t) in tensors {
            ensure!(
                by_key.insert(k.as_str(), t).is_none(),
                "AdamW8bit state: key '{k}' appears twice"
            );
        }
        let mut used: HashSet<&str> = HashSet::new();
        let step_count = match by_key.get("step_count") {
            Some(t) => scalar_i64(t, "step_count")?,
            None => bail!("AdamW8bit state: key 'step_count' is missing"),
        };
        used.insert("step_count");
        let mut new_states = Vec::new();
        for (gi, g) in self.groups.iter().enumerate() {
            for (si, s) in g.slots.iter().enumerate() {
                let step_key = format!("state.{}.step", s.name);
                let Some(step_t) = by_key.get(step_key.as_str()) else {
                    new_states.push((gi, si, None));
                    continue;
                };
                let step = scalar_i64(step_t, &step_key)?;
                used.insert(by_key.get_key_value(step_key.as_str()).expect("present").0);
                let device = s.param.device();
                let shape = s.param.size();
                let mut fetch = |field: &str, kind: Kind, shape: &[i64]| -> Result<Tensor> {
                    let k = format!("state.{}.{field}", s.name);
                    let (&kk, &t) = by_key.get_key_value(k.as_str()).ok_or_else(|| {
                        anyhow!(
                            "AdamW8bit state: key '{k}' is missing (parameter '{}')",
                            s.name
                        )
                    })?;
                    used.insert(kk);
                    ensure!(
                        t.kind() == kind && t.size() == shape,
                        "AdamW8bit state: '{k}' is {:?} {:?}, expected {kind:?} {shape:?} \
                         (was the state saved for another network or min_8bit_size?)",
                        t.kind(),
                        t.size()
                    );
                    Ok(t.reshape([-1]).to_device(device).copy())
                };
                let moments = if s.numel < self.cfg.min_8bit_size {
                    Moments::Full {
                        m: fetch("state1", Kind::Float, &shape)?,
                        v: fetch("state2", Kind::Float, &shape)?,
                    }
                } else {
                    let nb = (s.numel + BLOCK - 1) / BLOCK;
                    let pad = nb * BLOCK - s.numel;
                    let s1 = fetch("state1", Kind::Uint8, &shape)?;
                    let s2 = fetch("state2", Kind::Uint8, &shape)?;
                    let state1 = Tensor::cat(
                        &[
                            s1,
                            Tensor::full([pad], SIGNED_PAD_CODE, (Kind::Uint8, device)),
                        ],
                        0,
                    );
                    Moments::EightBit {
                        state1,
                        state2: s2.constant_pad_nd([0, pad]),
                        absmax1: fetch("absmax1", Kind::Float, &[nb])?,
                        absmax2: fetch("absmax2", Kind::Float, &[nb])?,
                    }
                };
                new_states.push((gi, si, Some(ParamState { step, moments })));
            }
        }
        if let Some(k) = by_key.keys().find(|k| !used.contains(*k)) {
            bail!(
                "AdamW8bit state: key '{k}' belongs to no parameter of this optimizer \
                 (state saved for a different network?)"
            );
        }
        for (gi, si, st) in new_states {
            self.groups[gi].slots[si].state = st;
        }
        for g in &mut self.groups {
            g.batches.clear(); // the loaded states are separate tensors again
        }
        self.step_count = step_count;
        Ok(())
    }
}

/// The trainer's optimizer contract (`common::Optimizer`); each method is the inherent one.
impl Optimizer for AdamW8bit {
    fn step(&mut self) -> Result<()> {
        AdamW8bit::step(self)
    }
    fn zero_grad(&mut self) {
        AdamW8bit::zero_grad(self)
    }
    fn set_lr(&mut self, group: usize, lr: f64) {
        AdamW8bit::set_lr(self, group, lr)
    }
    fn lr(&self, group: usize) -> f64 {
        AdamW8bit::lr(self, group)
    }
    fn num_groups(&self) -> usize {
        AdamW8bit::num_groups(self)
    }
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        AdamW8bit::state_tensors(self)
    }
    fn load_state_tensors(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        AdamW8bit::load_state_tensors(self, tensors)
    }
    fn class_name(&self) -> String {
        CLASS_NAME.to_string()
    }
}

fn scalar_i64(t: &Tensor, key: &str) -> Result<i64> {
    ensure!(
        t.kind() == Kind::Int64 && t.numel() == 1,
        "AdamW8bit state: '{key}' must be a single int64, got {:?} {:?}",
        t.kind(),
        t.size()
    );
    Ok(t.int64_value(&[0]))
}

/// Writes `new` (float32, flat) into the parameter, rounding to its kind.
fn write_param(param: &mut Tensor, new: &Tensor) {
    let shape = param.size();
    param.copy_(&new.view(shape.as_slice()));
}

/// `kOptimizer32bit2State` for tensors below min_8bit_size (spec §3.1). No NaN guard there.
fn update_32bit(param: &mut Tensor, grad: &Tensor, m: &mut Tensor, v: &mut Tensor, sc: &Scalars) {
    let kind = param.kind();
    let g = grad.reshape([-1]).to_kind(Kind::Float);
    let pf = param.reshape([-1]).to_kind(Kind::Float);
    // m = m*b1 + omb1*g
    let t = &g * sc.omb1;
    let _ = m.g_mul_scalar_(sc.b1);
    let _ = m.g_add_(&t);
    // v = v*b2 + omb2*(g*g): the square first, unlike the 8-bit kernel
    let t = (&g * &g).g_mul_scalar(sc.omb2);
    let _ = v.g_mul_scalar_(sc.b2);
    let _ = v.g_add_(&t);
    let mut denom = v.sqrt();
    let _ = denom.g_add_scalar_(sc.c2eps);
    let upd = (&*m / &denom).g_mul_scalar(sc.step_size);
    let mut new = (pf + upd).to_kind(kind);
    if sc.decay_on {
        new = (new.to_kind(Kind::Float) * sc.decay).to_kind(kind);
    }
    write_param(param, &new);
}

/// `kOptimizerStatic8bit2StateBlockwise`, whole-tensor form (spec §3 steps 1-7). Works on the
/// block-padded layout [nb, 256]; the padded lanes see g = 0 and the kernel's idle-lane bytes.
fn update_8bit(
    param: &mut Tensor,
    grad: &Tensor,
    [state1, state2]: [&mut Tensor; 2],
    [absmax1, absmax2]: [&mut Tensor; 2],
    maps: &CodeMaps,
    sc: &Scalars,
    general: bool,
) {
    let kind = param.kind();
    let n = param.numel() as i64;
    let nb = absmax1.numel() as i64;
    let pad = nb * BLOCK - n;
    // On the CPU, cheap whole-tensor checks pick fast paths for the common case (all gradients
    // finite, every block max finite and positive); on CUDA such a check is a device sync, so
    // the general path, which handles every case, always runs there.
    let checks = param.device() == Device::Cpu && !general;

    let mut g = grad.reshape([-1]).to_kind(Kind::Float);
    if pad > 0 {
        g = g.constant_pad_nd([0, pad]);
    }
    let g = g.view([nb, BLOCK]);
    // Step 2: a NaN/Inf gradient resets that element's m and v and leaves p alone. A finite sum
    // proves every gradient finite (an overflowing sum only sends us to the masked path).
    let masked = !checks || !g.sum(Kind::Float).double_value(&[]).is_finite();
    let valid = masked.then(|| g.isfinite());
    let g0 = match &valid {
        Some(valid) => g.where_scalarother(valid, 0.0),
        None => g,
    };

    // Dequantize with the old absmax (one f32 multiply), then the EMAs in the kernel's op order.
    let deq = |codes: &Tensor, code: &Tensor, absmax: &Tensor| {
        code.index_select(0, &codes.to_kind(Kind::Int))
            .view([nb, BLOCK])
            .g_mul(&absmax.unsqueeze(1))
    };
    // Step 3: v = (deq*b2) + ((omb2*g)*g)
    let mut v = deq(state2, &maps.unsigned, absmax2);
    let _ = v.g_mul_scalar_(sc.b2);
    let mut t = &g0 * sc.omb2;
    let _ = t.g_mul_(&g0);
    let _ = v.g_add_(&t);
    // Step 4: m = (deq*b1) + (omb1*g)
    let mut m = deq(state1, &maps.signed, absmax1);
    let _ = m.g_mul_scalar_(sc.b1);
    t.copy_(&g0);
    let _ = t.g_mul_scalar_(sc.omb1);
    let _ = m.g_add_(&t);
    drop(t);
    drop(g0);
    if let Some(valid) = &valid {
        let invalid = valid.logical_not();
        let _ = m.masked_fill_(&invalid, 0.0);
        let _ = v.masked_fill_(&invalid, 0.0);
    }

    // Step 7 (reduction): new absmax = fmaxf-reduction of |x|, which ignores NaN. Also says
    // whether x = state / absmax is certainly NaN-free (absmax finite and > 0 in every block and
    // no NaN in the state; amax propagates NaN, so a NaN-free result proves the latter).
    let block_absmax = |x: &Tensor| {
        let fmax = || {
            x.abs()
                .nan_to_num_(-f64::from(f32::MAX), f64::INFINITY, f64::NEG_INFINITY)
                .amax([1i64].as_slice(), false)
        };
        if !checks {
            return (fmax(), false);
        }
        let a = x.abs().amax([1i64].as_slice(), false);
        let min = a.min().double_value(&[]);
        let max = a.max().double_value(&[]);
        if max.is_nan() {
            return (fmax(), false);
        }
        (a, min > 0.0 && max.is_finite())
    };
    let (new_abs1, clean1) = block_absmax(&m);
    let (new_abs2, clean2) = block_absmax(&v);

    // Steps 5-6: p' = T(p + step_size * (m / (sqrt(v) + c2eps))), then T(p' * decay).
    let mut upd = v.sqrt();
    let _ = upd.g_add_scalar_(sc.c2eps);
    let mut upd = &m / &upd;
    let _ = upd.g_mul_scalar_(sc.step_size);
    let upd = upd.view([-1]).narrow(0, 0, n);
    let contiguous_f32 = kind == Kind::Float && param.is_contiguous();
    if contiguous_f32 && valid.is_none() {
        let mut pf = param.view([-1]);
        let _ = pf.g_add_(&upd);
        if sc.decay_on {
            let _ = pf.g_mul_scalar_(sc.decay);
        }
    } else {
        let pf = param.reshape([-1]).to_kind(Kind::Float);
        let mut new = (&pf + &upd).to_kind(kind);
        if sc.decay_on {
            new = (new.to_kind(Kind::Float) * sc.decay).to_kind(kind);
        }
        if let Some(valid) = &valid {
            let valid_n = valid.view([-1]).narrow(0, 0, n);
            new = new.where_self(&valid_n, &pf.to_kind(kind));
        }
        write_param(param, &new);
    }
    drop(upd);

    // Step 7 (quantize): x = m / absmax_new, nearest code; state1 gets the sign fix.
    let q1 = if clean1 {
        let _ = m.g_div_(&new_abs1.unsqueeze(1));
        maps.search_signed_fix.search(&m)
    } else {
        let m_neg = m.signbit();
        let m_pos = m.gt(0.0);
        let _ = m.g_div_(&new_abs1.unsqueeze(1));
        let mut q1 = nearest_code_(m, maps, true);
        // If the code's sign differs from m's, move one index towards m's sign: a tiny negative
        // m rounded to +0.0 (127) becomes 126 (-5.5e-7); a +0.0 m in an all-zero block
        // (NaN -> 0) becomes 0 - 1 = 255 by uint8 wrap-around (spec §2.1, sign fix).
        let fix = q1.lt(SIGNED_ZERO_CODE).logical_xor(&m_neg);
        let mut delta = m_pos.to_kind(Kind::Int8);
        let _ = delta.g_mul_scalar_(2).g_sub_scalar_(1).g_mul_(&fix);
        let _ = q1.g_add_(&delta);
        q1
    };
    // int32 -> uint8 is a modular conversion, so -1 stores as 255.
    state1.copy_(&q1.view([-1]));
    drop(q1);
    if pad > 0 {
        // The kernel never stores its idle lanes; keep them at the byte those lanes read.
        let _ = state1.narrow(0, n, pad).fill_(SIGNED_PAD_CODE);
    }
    let _ = v.g_div_(&new_abs2.unsqueeze(1));
    let q2 = if clean2 {
        maps.search_unsigned.search(&v)
    } else {
        nearest_code_(v, maps, false)
    };
    state2.copy_(&q2.view([-1]));
    // Padded v lanes are 0 (or NaN for an all-zero block), both choose code 0: nothing to restore.
    absmax1.copy_(&new_abs1);
    absmax2.copy_(&new_abs2);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn optimizer_args_python_literals() {
        let c = parse_optimizer_args(&args(&["betas=0.9,0.99", "eps=1e-6"])).unwrap();
        assert_eq!(c.betas, (0.9, 0.99));
        assert_eq!(c.eps, 1e-6);
        assert_eq!(c.weight_decay, 0.01);
        let c = parse_optimizer_args(&args(&[
            "betas=(0.8, 0.95)",
            "weight_decay=0",
            "min_8bit_size=1_000",
        ]))
        .unwrap();
        assert_eq!(c.betas, (0.8, 0.95));
        assert_eq!(c.weight_decay, 0.0);
        assert_eq!(c.min_8bit_size, 1000);
        let c = parse_optimizer_args(&args(&["betas=[0.5,0.6]", "amsgrad=False"])).unwrap();
        assert_eq!(c.betas, (0.5, 0.6));
        assert_eq!(
            parse_optimizer_args(&[]).unwrap(),
            AdamW8bitConfig::default()
        );
    }

    #[test]
    fn optimizer_args_errors_name_the_key() {
        let e = parse_optimizer_args(&args(&["momentum=0.9"])).unwrap_err();
        assert!(format!("{e:#}").contains("unknown key 'momentum'"), "{e:#}");
        let e = parse_optimizer_args(&args(&["betas=0.9"])).unwrap_err();
        assert!(format!("{e:#}").contains("betas"), "{e:#}");
        let e = parse_optimizer_args(&args(&["eps='abc'"])).unwrap_err();
        assert!(format!("{e:#}").contains("eps='abc'"), "{e:#}");
        let e = parse_optimizer_args(&args(&["betas=1.5,0.9"])).unwrap_err();
        assert!(format!("{e:#}").contains("betas"), "{e:#}");
        let e = parse_optimizer_args(&args(&["weight_decay"])).unwrap_err();
        assert!(format!("{e:#}").contains("weight_decay"), "{e:#}");
        assert!(parse_optimizer_args(&args(&["amsgrad=True"])).is_err());
    }

    #[test]
    fn table_search_equals_binary_search() {
        tch::manual_seed(11);
        let maps = CodeMaps::new(Device::Cpu);
        for signed in [true, false] {
            let code = if signed { &maps.signed } else { &maps.unsigned };
            let c: Vec<f32> = Vec::try_from(code).unwrap();
            let bounds = decision_bounds(&c);
            let mut probe: Vec<f32> = Vec::new();
            for &b in bounds.iter().chain(&c) {
                for d in -3i32..=3 {
                    let v = f32::from_bits((b.to_bits() as i32 + d) as u32);
                    // NaN is mapped to -inf before the search
                    if !v.is_nan() {
                        probe.push(v);
                    }
                }
            }
            probe.extend([
                0.0,
                -0.0,
                1.0,
                -1.0,
                2.0,
                -2.0,
                1e-30,
                -1e-30,
                f32::INFINITY,
            ]);
            probe.extend([f32::NEG_INFINITY, f32::MAX, f32::MIN, f32::MIN_POSITIVE]);
            let x = Tensor::cat(
                &[
                    Tensor::from_slice(&probe),
                    Tensor::rand([200_000], (Kind::Float, Device::Cpu)) * 2.0 - 1.0,
                    // every binade from 1e-38 to 1e38, both signs
                    Tensor::randn([200_000], (Kind::Float, Device::Cpu))
                        * (Tensor::rand([200_000], (Kind::Float, Device::Cpu)) * 175.0 - 87.0)
                            .exp(),
                ],
                0,
            );
            let want = x.bucketize(&Tensor::from_slice(&bounds), true, false);
            let got = maps.search(signed).search(&x);
            let bad = got.ne_tensor(&want).sum(Kind::Int64).int64_value(&[]);
            assert_eq!(bad, 0, "signed={signed}: {bad} mismatches");
        }
    }

    #[test]
    fn bounds_implement_ties_to_even() {
        let maps = CodeMaps::new(Device::Cpu);
        for signed in [true, false] {
            let code = if signed { &maps.signed } else { &maps.unsigned };
            let c: Vec<f32> = Vec::try_from(code).unwrap();
            let mids: Vec<f32> = c.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
            let q = nearest_code(&Tensor::from_slice(&mids), &maps, signed);
            let q: Vec<i64> = Vec::try_from(&q).unwrap();
            for (k, &qk) in q.iter().enumerate() {
                let even = if k % 2 == 0 { k } else { k + 1 } as i64;
                assert_eq!(qk, even, "midpoint {k} (signed={signed})");
            }
            let exact = nearest_code(code, &maps, signed);
            let exact: Vec<i64> = Vec::try_from(&exact).unwrap();
            assert_eq!(exact, (0..256).collect::<Vec<i64>>());
        }
        let q = nearest_code(&Tensor::from_slice(&[f32::NAN, -2.0, 2.0]), &maps, true);
        assert_eq!(Vec::<i64>::try_from(&q).unwrap(), vec![0, 0, 255]);
    }
}
