//! Recompute-style gradient checkpointing (spec: sdscripts_model_math.md §6) without a custom
//! autograd Function, which tch does not offer.
//!
//! During the forward pass a checkpointed segment runs under no-grad and its output is handed on
//! as a fresh leaf that requires grad, so the autograd graph kept alive is only the small "outer"
//! graph between segments. [`Tape::backward`] back-propagates the loss into those leaves, then
//! walks the segments in reverse: each is recomputed with grad from detached copies of its
//! inputs, `(segment(x) · grad_out).sum()` is back-propagated (this fills the .grad of the
//! trainable leaves inside, e.g. LoRA weights), and the inputs' gradients are pushed into the
//! outer graph. Afterwards every leaf holds the gradient plain `loss.backward()` would give.
//!
//! Random draws inside a segment (LoRA dropout) would differ between the no-grad forward and the
//! recomputation, giving gradients of a different mask than the forward used. tch cannot save and
//! restore generator states, so a tape made with [`Tape::with_rng_replay`] instead reseeds the
//! generators (CPU and CUDA) with a seed drawn per segment, before the segment in the forward and
//! again before its recomputation. This changes the random stream after each segment (still
//! deterministic for a given seed), so it is opt-in: only for adapters that draw random numbers.
//!
//! One tape can span several models (text encoder then UNet): entries are processed in exact
//! reverse registration order, so a tensor crossing from one model to the next is fully
//! back-propagated before the segments that produced it are recomputed.
use anyhow::{anyhow, Result};
use std::cell::RefCell;
use tch::{Device, Kind, Tensor};

type SegmentFn<'a> = Box<dyn Fn(&[Tensor]) -> Tensor + 'a>;

enum Entry<'a> {
    /// A checkpointed segment: its inputs (with their outer graph), its output leaf, and how to
    /// recompute it.
    Segment {
        inputs: Vec<Tensor>,
        output: Tensor,
        autocast: bool,
        /// Seed the segment ran under (RNG replay only).
        seed: Option<i64>,
        f: SegmentFn<'a>,
    },
    /// A tensor shared by many segments (text conditioning, time embedding) replaced by one leaf,
    /// so its producer's graph is traversed once, with the summed gradient.
    Alias { source: Tensor, leaf: Tensor },
}

/// Records checkpointed segments during a forward pass; see the module docs.
/// Closures borrow the model for `'a`.
#[derive(Default)]
pub struct Tape<'a> {
    entries: RefCell<Vec<Entry<'a>>>,
    rng_replay: bool,
}

/// A seed drawn from the global CPU generator.
fn draw_seed() -> i64 {
    tch::no_grad(|| Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]))
}

fn grad_enabled() -> bool {
    // at_grad_set_enabled returns the previous mode; set it back immediately.
    unsafe {
        let prev = torch_sys::at_grad_set_enabled(1);
        torch_sys::at_grad_set_enabled(prev);
        prev != 0
    }
}

/// Whether CUDA autocast is active for work on `device`. Probed with a 1×1 matmul rather than
/// `at::autocast::is_enabled`, which libtorch 2.x warns about on every call; CPU work is never
/// autocast by tch.
fn autocast_enabled(device: Device) -> bool {
    if !device.is_cuda() {
        return false;
    }
    tch::no_grad(|| {
        let a = Tensor::ones([1, 1], (Kind::Float, device));
        a.matmul(&a).kind() != Kind::Float
    })
}

fn last_torch_error() -> Option<String> {
    let p = unsafe { torch_sys::get_and_reset_last_err() };
    if p.is_null() {
        return None;
    }
    let s = unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned();
    unsafe { libc::free(p as *mut libc::c_void) };
    Some(s)
}

/// `t.backward(retain_graph=True)`: tch's `backward` always frees the graph, but the outer graph
/// is reached again from later (earlier-registered) segments.
pub fn backward_retain(t: &Tensor) -> Result<()> {
    // at_backward takes a mutable pointer but does not modify the handle.
    let mut t = t.shallow_clone();
    unsafe { torch_sys::at_backward(t.as_mut_ptr(), 1, 0) };
    match last_torch_error() {
        Some(e) => Err(anyhow!("backward failed: {e}")),
        None => Ok(()),
    }
}

/// Adds `grad` to the gradient flowing into `t` (like `t.backward(grad, retain_graph=True)`).
fn push_grad(t: &Tensor, grad: &Tensor) -> Result<()> {
    backward_retain(&(t * grad.to_kind(t.kind())).sum(t.kind()))
}

impl<'a> Tape<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// A tape whose segments see the same random numbers in the recomputation as in the forward
    /// (see the module docs); use when adapters apply dropout.
    pub fn with_rng_replay() -> Self {
        Tape {
            entries: RefCell::default(),
            rng_replay: true,
        }
    }

    /// Number of recorded entries (segments and aliases).
    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.borrow().is_empty()
    }

    /// Runs `f(inputs)` as a checkpointed segment. With grad mode off (inference) it just runs `f`.
    /// `f` must be a pure function of its inputs and the (frozen or leaf) model parameters: it is
    /// called again during [`backward`](Self::backward).
    pub fn checkpoint(&self, inputs: &[&Tensor], f: impl Fn(&[Tensor]) -> Tensor + 'a) -> Tensor {
        let owned: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
        if !grad_enabled() {
            return f(&owned);
        }
        let seed = self.rng_replay.then(draw_seed);
        if let Some(s) = seed {
            tch::manual_seed(s);
        }
        let out = tch::no_grad(|| f(&owned));
        let output = out.detach().set_requires_grad(true);
        let autocast = autocast_enabled(out.device());
        self.entries.borrow_mut().push(Entry::Segment {
            inputs: owned,
            output: output.shallow_clone(),
            autocast,
            seed,
            f: Box::new(f),
        });
        output
    }

    /// Replaces a tensor that many segments read (and that may carry a graph from an earlier
    /// model) by a single leaf; its gradient is pushed back in one go during backward.
    /// Tensors that do not require grad are returned as they are.
    pub fn alias(&self, t: &Tensor) -> Tensor {
        if !grad_enabled() || !t.requires_grad() {
            return t.shallow_clone();
        }
        let leaf = t.detach().set_requires_grad(true);
        self.entries.borrow_mut().push(Entry::Alias {
            source: t.shallow_clone(),
            leaf: leaf.shallow_clone(),
        });
        leaf
    }

    /// Back-propagates `loss` through the outer graph and every recorded segment; afterwards
    /// every leaf's .grad equals that of `loss.backward()` without checkpointing. Empties the tape.
    pub fn backward(&self, loss: &Tensor) -> Result<()> {
        backward_retain(loss)?;
        // Reseeding for replay would leave the generators at the first segment's stream; continue
        // afterwards from a seed drawn now instead.
        let resume = self.rng_replay.then(draw_seed);
        let entries = std::mem::take(&mut *self.entries.borrow_mut());
        for entry in entries.into_iter().rev() {
            match entry {
                Entry::Alias { source, leaf } => {
                    let g = leaf.grad();
                    if g.defined() {
                        push_grad(&source, &g)?;
                    }
                }
                Entry::Segment {
                    inputs,
                    output,
                    autocast,
                    seed,
                    f,
                } => {
                    let g = output.grad();
                    if !g.defined() {
                        continue;
                    }
                    drop(output);
                    let detached: Vec<Tensor> = inputs
                        .iter()
                        .map(|x| x.detach().set_requires_grad(x.requires_grad()))
                        .collect();
                    if let Some(s) = seed {
                        tch::manual_seed(s);
                    }
                    let y = tch::with_grad(|| tch::autocast(autocast, || f(&detached)));
                    if !y.requires_grad() {
                        continue;
                    }
                    let s = (&y * g.to_kind(y.kind())).sum(y.kind());
                    drop(y);
                    backward_retain(&s)?;
                    drop(s);
                    for (x, xd) in inputs.iter().zip(&detached) {
                        if x.requires_grad() {
                            let gx = xd.grad();
                            if gx.defined() {
                                push_grad(x, &gx)?;
                            }
                        }
                    }
                }
            }
        }
        if let Some(s) = resume {
            tch::manual_seed(s);
        }
        Ok(())
    }
}

/// Runs `f` as a checkpointed segment on `tape`, or plainly (with autograd) without a tape.
pub fn checkpoint<'a>(
    tape: Option<&Tape<'a>>,
    inputs: &[&Tensor],
    f: impl Fn(&[Tensor]) -> Tensor + 'a,
) -> Tensor {
    match tape {
        Some(t) => t.checkpoint(inputs, f),
        None => {
            let owned: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
            f(&owned)
        }
    }
}

/// [`Tape::alias`] when a tape is given, else the tensor itself.
pub fn alias(tape: Option<&Tape<'_>>, t: &Tensor) -> Tensor {
    match tape {
        Some(tape) => tape.alias(t),
        None => t.shallow_clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).abs().max().double_value(&[]);
        d / b.abs().max().double_value(&[]).max(1e-12)
    }

    struct Net {
        w_enc: Tensor,
        lora_enc: Tensor,
        ws: Vec<Tensor>,
        loras: Vec<Tensor>,
        outer: Tensor,
        x0: Tensor,
        ids: Tensor,
        target: Tensor,
    }

    /// A chain of segments with a skip connection, a shared conditioning tensor produced by an
    /// earlier checkpointed "model", trainable leaves inside segments and outside.
    fn run<'a>(n: &'a Net, tape: Option<&Tape<'a>>) -> Tensor {
        let enc = |xs: &[Tensor]| (xs[0].matmul(&n.w_enc) + xs[0].matmul(&n.lora_enc)).tanh();
        let ctx = checkpoint(tape, &[&n.ids], enc);
        let ctx = checkpoint(tape, &[&ctx], enc) * 2.0;
        let ctx = alias(tape, &ctx);
        let mut h = n.x0.shallow_clone();
        let mut skips = vec![];
        for i in 0..3 {
            let (w, l) = (&n.ws[i], &n.loras[i]);
            h = checkpoint(tape, &[&h, &ctx], move |xs: &[Tensor]| {
                (xs[0].matmul(w) + xs[0].matmul(l) + &xs[1]).sin()
            });
            skips.push(h.shallow_clone());
            h = h.matmul(&n.outer);
        }
        h += skips[0].shallow_clone() * 0.5;
        (h - &n.target).square().mean(Kind::Float)
    }

    /// Checkpointed grads equal plain autograd grads.
    #[test]
    fn matches_plain_backward() {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        let n = Net {
            w_enc: Tensor::randn([6, 6], opts) * 0.3,
            lora_enc: (Tensor::randn([6, 6], opts) * 0.1).set_requires_grad(true),
            ws: (0..3).map(|_| Tensor::randn([6, 6], opts) * 0.3).collect(),
            loras: (0..3)
                .map(|_| (Tensor::randn([6, 6], opts) * 0.1).set_requires_grad(true))
                .collect(),
            outer: (Tensor::randn([6, 6], opts) * 0.3).set_requires_grad(true),
            x0: Tensor::randn([4, 6], opts).set_requires_grad(true),
            ids: Tensor::randn([4, 6], opts),
            target: Tensor::randn([4, 6], opts),
        };
        let params: Vec<&Tensor> = n
            .loras
            .iter()
            .chain([&n.lora_enc, &n.outer, &n.x0])
            .collect();
        let loss = run(&n, None);
        loss.backward();
        let plain: Vec<Tensor> = params.iter().map(|p| p.grad().copy()).collect();
        for p in &params {
            let _ = p.grad().zero_();
        }
        let tape = Tape::new();
        let loss2 = run(&n, Some(&tape));
        assert_eq!(tape.len(), 6);
        tape.backward(&loss2).unwrap();
        assert!(tape.is_empty());
        assert!((loss.double_value(&[]) - loss2.double_value(&[])).abs() < 1e-7);
        for (p, g) in params.iter().zip(&plain) {
            let e = rel_err(&p.grad(), g);
            assert!(e < 1e-6, "relative grad error {e}");
        }
    }

    /// A dropout segment: loss = w · Σ(dropout(x)·c) is linear in the scalar leaf w, so the true
    /// gradient is loss / w. With RNG replay the recomputation sees the forward's mask.
    #[test]
    fn rng_replay_reuses_dropout_masks() {
        let opts = (Kind::Float, Device::Cpu);
        tch::manual_seed(3);
        let x = Tensor::randn([1000], opts);
        let c = Tensor::randn([1000], opts);
        let w = Tensor::from_slice(&[1.5f32]).set_requires_grad(true);
        let mut mismatch = 0.0;
        for replay in [true, false] {
            let tape = if replay {
                Tape::with_rng_replay()
            } else {
                Tape::new()
            };
            let y = tape.checkpoint(&[&x], |xs: &[Tensor]| xs[0].dropout(0.5, true) * &w);
            let loss = (y * &c).sum(Kind::Float);
            tape.backward(&loss).unwrap();
            let g = w.grad().double_value(&[0]);
            let expected = loss.double_value(&[]) / 1.5;
            let e = (g - expected).abs() / expected.abs();
            if replay {
                assert!(e < 1e-5, "replayed dropout mask differs: {g} vs {expected}");
            } else {
                mismatch = e;
            }
            let _ = w.grad().zero_();
        }
        // Without replay the masks differ: the test above would catch a replay that did nothing.
        assert!(mismatch > 1e-3, "{mismatch}");
    }

    #[test]
    fn inference_records_nothing() {
        let tape = Tape::new();
        let x = Tensor::ones([2], (Kind::Float, Device::Cpu));
        let y = tch::no_grad(|| tape.checkpoint(&[&x], |xs: &[Tensor]| &xs[0] * 2.0));
        assert!(tape.is_empty());
        assert_eq!(y.double_value(&[0]), 2.0);
    }
}
