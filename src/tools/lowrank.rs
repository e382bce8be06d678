//! Low-rank re-factoring of full weight deltas, as sd-scripts' SVD tools do it: the delta of a
//! LoRA module (`up @ down`, conv kernels flattened), its singular value decomposition, the rank
//! rules of `resize_lora.py --dynamic_method`, and the quantile clamp of `svd_merge_lora.py` /
//! `extract_lora_from_models.py`.
//!
//! `svd_merge_lora` and `extract_lora_from_models` take the SVD of the full delta exactly as the
//! scripts do (full matrices, the same LAPACK call), so their factors match bit for bit — the
//! quantile clamp depends on every value, and bf16/fp16 saves would amplify any rounding
//! difference. `resize_lora` only ever decomposes a product `up @ down` of rank r: it factors
//! the two thin factors by QR and decomposes the r×r core ([`pair_svd`]), which is the same SVD
//! to float rounding at a small fraction of the time and memory (the 1280×11520 conv deltas of
//! SD1.5 take seconds each as a full SVD, milliseconds this way).
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// Singular values at or below this count as a zero matrix (`resize_lora.MIN_SV`).
const MIN_SV: f64 = 1e-6;

/// `resize_lora.py --dynamic_method`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dynamic {
    /// Keep singular values above `S[0] / param`.
    SvRatio(f64),
    /// Keep the smallest rank whose Frobenius norm fraction reaches `param`.
    SvFro(f64),
    /// Keep the smallest rank whose sum-of-singular-values fraction reaches `param`.
    SvCumulative(f64),
}

impl Dynamic {
    pub fn parse(method: &str, param: f64) -> Result<Self> {
        Ok(match method {
            "sv_ratio" => Dynamic::SvRatio(param),
            "sv_fro" => Dynamic::SvFro(param),
            "sv_cumulative" => Dynamic::SvCumulative(param),
            m => bail!("--dynamic_method={m}: expected sv_ratio, sv_fro or sv_cumulative"),
        })
    }
}

/// A delta as a 2-D matrix: Linear as is, a 1×1 conv squeezed, a k×k conv flattened to
/// [out, in·k·k]. Returns the matrix and the kernel size (None for Linear).
pub fn as_matrix(delta: &Tensor) -> (Tensor, Option<(i64, i64)>) {
    let s = delta.size();
    if s.len() == 4 {
        (delta.reshape([s[0], -1]), Some((s[2], s[3])))
    } else {
        (delta.shallow_clone(), None)
    }
}

/// `torch.linalg.svd(m)` with full matrices, in float32: (U, S, Vh).
pub fn svd(m: &Tensor) -> (Tensor, Tensor, Tensor) {
    let m = if m.kind() == Kind::Float {
        m.shallow_clone()
    } else {
        m.to_kind(Kind::Float)
    };
    // torch.svd(some=False) is linalg_svd(full_matrices=True) returning V = Vh^T; tch's own
    // linalg_svd always passes a `driver` string, which libtorch accepts on CUDA only
    let (u, s, v) = m.svd(false, true);
    (u, s, v.transpose(0, 1))
}

/// The SVD of `up @ down` (up [out, r], down [r, in], flattened) from thin QRs of the factors
/// and the SVD of the small core: U [out, k], S padded with zeros to min(out, in) singular
/// values as the full decomposition has them, Vh [k, in].
pub fn pair_svd(up: &Tensor, down: &Tensor) -> (Tensor, Tensor, Tensor) {
    // in float64: the thin QRs and the core are cheap, and the result then matches the full
    // float32 decomposition to its own rounding
    let up = up.to_kind(Kind::Double);
    let down = down.to_kind(Kind::Double);
    let (out, inn) = (up.size()[0], down.size()[1]);
    let (qa, ra) = Tensor::linalg_qr(&up, "reduced");
    let (qb, rb) = Tensor::linalg_qr(&down.transpose(0, 1), "reduced");
    let core = ra.matmul(&rb.transpose(0, 1));
    let (uc, sc, vc) = core.svd(true, true);
    let u = qa.matmul(&uc).to_kind(Kind::Float);
    let vh = vc
        .transpose(0, 1)
        .matmul(&qb.transpose(0, 1))
        .to_kind(Kind::Float);
    let sc = sc.to_kind(Kind::Float);
    let n = out.min(inn);
    let k = sc.size()[0];
    let s = if k < n {
        Tensor::cat(&[sc, Tensor::zeros([n - k], (Kind::Float, up.device()))], 0)
    } else {
        sc.narrow(0, 0, n)
    };
    (u, s, vh)
}

/// The first `rank` components as LoRA factors: up = U·diag(S) [out, r], down = Vh [r, in].
/// Components beyond those U and Vh hold (zero singular values) come out as zeros.
pub fn truncate(u: &Tensor, s: &Tensor, vh: &Tensor, rank: i64) -> (Tensor, Tensor) {
    let have = u.size()[1].min(vh.size()[0]).min(s.size()[0]);
    let k = rank.min(have);
    let mut up = u.narrow(1, 0, k) * s.narrow(0, 0, k).unsqueeze(0);
    let mut down = vh.narrow(0, 0, k);
    if k < rank {
        let (o, i) = (up.size()[0], down.size()[1]);
        let opts = (up.kind(), up.device());
        up = Tensor::cat(&[up, Tensor::zeros([o, rank - k], opts)], 1);
        down = Tensor::cat(&[down, Tensor::zeros([rank - k, i], opts)], 0);
    }
    (up, down)
}

/// Shapes factors of a flattened delta back into a LoRA pair of the delta's layer type.
pub fn to_lora_shapes(
    up: Tensor,
    down: Tensor,
    kernel: Option<(i64, i64)>,
    in_dim: i64,
) -> (Tensor, Tensor) {
    match kernel {
        None => (up, down),
        Some((kh, kw)) => {
            let r = down.size()[0];
            let out = up.size()[0];
            (
                up.reshape([out, r, 1, 1]),
                down.reshape([r, in_dim, kh, kw]),
            )
        }
    }
}

/// `svd_merge_lora` / `extract_lora_from_models`: both factors clamped to ±the `q` quantile of
/// all their values together.
pub fn clamp_quantile(up: &Tensor, down: &Tensor, q: f64) -> (Tensor, Tensor) {
    let dist = Tensor::cat(&[up.flatten(0, -1), down.flatten(0, -1)], 0);
    let hi = dist.quantile_scalar(q, None::<i64>, false, "linear");
    let lo = hi.neg();
    (
        up.clamp_tensor(Some(&lo), Some(&hi)),
        down.clamp_tensor(Some(&lo), Some(&hi)),
    )
}

/// What `resize_lora.rank_resize` reports for one module.
#[derive(Debug, Clone)]
pub struct RankChoice {
    pub new_rank: i64,
    /// `float(scale * new_rank)`.
    pub new_alpha: f64,
    pub sum_retained: f64,
    pub fro_retained: f64,
    pub max_ratio: f64,
}

/// How the module's scale `alpha / rank` is held: a float32 tensor when the file has an alpha
/// (so `scale * new_rank` is float32 arithmetic), else the Python float 1.0.
#[derive(Debug, Clone, Copy)]
pub enum Scale {
    F32(f32),
    One,
}

impl Scale {
    fn times(self, rank: i64) -> f64 {
        match self {
            Scale::F32(s) => (s * rank as f32) as f64,
            Scale::One => rank as f64,
        }
    }
}

fn f(t: &Tensor) -> f64 {
    t.double_value(&[])
}

/// `searchsorted(sorted, target)` as torch does with a Python float (float32 comparison).
fn searchsorted(sorted: &Tensor, target: f64) -> i64 {
    Tensor::searchsorted_scalar(sorted, target, false, false, "left", None::<&Tensor>)
        .int64_value(&[])
}

/// `resize_lora.rank_resize`: the new rank for singular values `s` (float32, descending) under
/// `max_rank` and the dynamic rule, the alpha that keeps the module's scale, and the retained
/// norms the verbose report prints.
pub fn rank_resize(
    s: &Tensor,
    max_rank: i64,
    dynamic: Option<Dynamic>,
    scale: Scale,
) -> RankChoice {
    let n = s.size()[0];
    let clamp_index = |i: i64| i.min(n - 1).max(1);
    let mut new_rank = match dynamic {
        None => max_rank,
        // The index rules already add one; rank_resize adds another (kept as sd-scripts has it).
        Some(Dynamic::SvRatio(p)) => {
            let min_sv = s.get(0) / p;
            clamp_index(s.gt_tensor(&min_sv).sum(Kind::Int64).int64_value(&[])) + 1
        }
        Some(Dynamic::SvCumulative(p)) => {
            let total = f(&s.sum(Kind::Float));
            let cum = s.cumsum(0, Kind::Float) / total;
            clamp_index(searchsorted(&cum, p) + 1) + 1
        }
        Some(Dynamic::SvFro(p)) => {
            let sq = s.pow_tensor_scalar(2);
            let total = f(&sq.sum(Kind::Float));
            let cum = sq.cumsum(0, Kind::Float) / total;
            clamp_index(searchsorted(&cum, p * p) + 1) + 1
        }
    };
    if f(&s.get(0)) <= MIN_SV {
        new_rank = 1;
    } else if new_rank > max_rank {
        new_rank = max_rank;
    }
    let new_alpha = scale.times(new_rank);
    let s_sum = s.abs().sum(Kind::Float);
    let s_rank = s.narrow(0, 0, new_rank.min(n)).abs().sum(Kind::Float);
    let sq = s.pow_tensor_scalar(2);
    let s_fro = sq.sum(Kind::Float).sqrt();
    let s_red_fro = sq.narrow(0, 0, new_rank.min(n)).sum(Kind::Float).sqrt();
    let idx = (new_rank - 1).min(n - 1);
    RankChoice {
        new_rank,
        new_alpha,
        sum_retained: f(&(s_rank / s_sum)),
        fro_retained: f(&(s_red_fro / s_fro)),
        max_ratio: f(&(s.get(0) / s.get(idx))),
    }
}
