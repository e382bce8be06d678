//! sd-scripts' text conditioning for SD1/SD2: captions → token windows → CLIP hidden states
//! (spec: sdscripts_cli_data.md §3.13, sdscripts_model_math.md §1.2; sd-scripts
//! `strategy_base.py::TokenizeStrategy._get_input_ids`, `strategy_sd.py::SdTextEncodingStrategy`).
//!
//! With `--max_token_length` 150/225 a caption is tokenized to L = max_token_length + 2 and cut
//! into n = L/75 windows of 77 (`[BOS] + 75 ids + [last id]`), each encoded on its own, and the
//! states spliced back to 75n + 2 positions. Which rule applies follows the tokenizer, as in
//! sd-scripts (`pad_token_id == eos_token_id` ⇒ v1): the SD2 tokenizer (pad id 0) gets the
//! window-end fix-ups. sd-scripts' SD2 *encoding* fix-up (copy the next pad state over an EOS at
//! a window start) compares a token id with the string `"<|endoftext|>"`, which is never true in
//! PyTorch, so it never fires; both versions therefore splice states the same way here.
use super::clip::ClipTextModel;
use super::recompute::Tape;
use super::tokenizer::{ClipTokenizer, PadToken, BOS_ID, EOS_ID, MODEL_MAX_LENGTH};
use anyhow::{bail, Result};
use tch::{Device, Tensor};

/// Positions a window adds to the spliced sequence (77 minus BOS and EOS).
const WINDOW_BODY: usize = MODEL_MAX_LENGTH - 2;

/// The tokenized length for `--max_token_length` (None → 77, else max_token_length + 2), with
/// the value checked: it must be a multiple of 75.
pub fn tokenized_length(max_token_length: Option<usize>) -> Result<usize> {
    match max_token_length {
        None => Ok(MODEL_MAX_LENGTH),
        Some(m) if m > 0 && m % WINDOW_BODY == 0 => Ok(m + 2),
        Some(m) => bail!(
            "--max_token_length {m} is not supported: use 75, 150 or 225 (a multiple of 75 tokens)"
        ),
    }
}

/// The (n, 77) token windows of one caption, as sd-scripts' `_get_input_ids`.
pub fn caption_windows(
    tok: &ClipTokenizer,
    caption: &str,
    max_token_length: Option<usize>,
) -> Result<Vec<Vec<i64>>> {
    let l = tokenized_length(max_token_length)?;
    let pad = tok.pad_token();
    let ids = tok.tokenize(caption, l, pad);
    if l <= MODEL_MAX_LENGTH {
        return Ok(vec![ids]);
    }
    Ok(windows_of(&ids, pad))
}

/// Cuts a tokenized sequence of length L > 77 into its 77-token windows (sd-scripts'
/// `_get_input_ids`, v1 and v2 branches).
fn windows_of(ids: &[i64], pad: PadToken) -> Vec<Vec<i64>> {
    let l = ids.len();
    let mut out = Vec::new();
    let mut i = 1;
    while i < l - MODEL_MAX_LENGTH + 2 {
        let mut w = Vec::with_capacity(MODEL_MAX_LENGTH);
        w.push(ids[0]);
        w.extend_from_slice(&ids[i..i + WINDOW_BODY]);
        w.push(ids[l - 1]);
        if pad == PadToken::Zero {
            // SD2: a window cut in the middle of the text ends with EOS; a window that starts
            // in the padding gets BOS EOS PAD... (sd-scripts' v2 branch)
            let p = pad.id();
            if w[MODEL_MAX_LENGTH - 2] != EOS_ID && w[MODEL_MAX_LENGTH - 2] != p {
                w[MODEL_MAX_LENGTH - 1] = EOS_ID;
            }
            if w[1] == p {
                w[1] = EOS_ID;
            }
        }
        debug_assert_eq!(w[0], BOS_ID);
        out.push(w);
        i += WINDOW_BODY;
    }
    out
}

/// Tokenizes a batch of captions: int64 (B, n, 77) on `device`, n = 1 without
/// `--max_token_length`, else max_token_length / 75.
pub fn tokenize_captions<S: AsRef<str>>(
    tok: &ClipTokenizer,
    captions: &[S],
    max_token_length: Option<usize>,
    device: Device,
) -> Result<Tensor> {
    if captions.is_empty() {
        bail!("tokenize_captions: empty batch");
    }
    let mut flat = Vec::new();
    let mut n = 0;
    for c in captions {
        let w = caption_windows(tok, c.as_ref(), max_token_length)?;
        n = w.len();
        for win in w {
            flat.extend(win);
        }
    }
    Ok(Tensor::from_slice(&flat)
        .view([captions.len() as i64, n as i64, MODEL_MAX_LENGTH as i64])
        .to_device(device))
}

/// Encodes (B, n, 77) token windows into the UNet context: (B, 77, hidden) for n = 1, else the
/// spliced (B, 75n + 2, hidden): BOS state of window 0, positions 1..=75 of every window, and the
/// last state of the last window.
pub fn encode_tokens(te: &ClipTextModel, ids: &Tensor, clip_skip: Option<i64>) -> Tensor {
    encode_tokens_with_tape(te, ids, clip_skip, None)
}

/// [`encode_tokens`] with the text encoder's layers checkpointed on `tape` (when given).
pub fn encode_tokens_with_tape<'a>(
    te: &'a ClipTextModel,
    ids: &Tensor,
    clip_skip: Option<i64>,
    tape: Option<&Tape<'a>>,
) -> Tensor {
    let (b, n, s) = ids.size3().expect("token windows must be (B, n, 77)");
    assert_eq!(
        s, MODEL_MAX_LENGTH as i64,
        "token windows must have 77 positions"
    );
    let h = te.forward_with_tape(&ids.reshape([b * n, s]), clip_skip, tape);
    let hidden = h.size()[2];
    let h = h.reshape([b, n * s, hidden]);
    if n == 1 {
        return h;
    }
    let body = WINDOW_BODY as i64;
    let mut parts = vec![h.narrow(1, 0, 1)];
    for k in 0..n {
        parts.push(h.narrow(1, k * s + 1, body));
    }
    parts.push(h.narrow(1, n * s - 1, 1));
    Tensor::cat(&parts, 1)
}

/// Captions straight to the UNet context (tokenize + encode) on the text encoder's device.
pub fn encode_captions<S: AsRef<str>>(
    tok: &ClipTokenizer,
    te: &ClipTextModel,
    captions: &[S],
    max_token_length: Option<usize>,
    clip_skip: Option<i64>,
) -> Result<Tensor> {
    te.check_clip_skip(clip_skip)?;
    let ids = tokenize_captions(tok, captions, max_token_length, te.token_embedding.device())?;
    Ok(encode_tokens(te, &ids, clip_skip))
}

/// sd-scripts' `--weighted_captions` parser (A1111 syntax, `TokenizeStrategy._get_weighted_input_ids`
/// → `parse_prompt_attention`): `(x)` ×1.1, `[x]` ÷1.1, `(x:w)` ×w, `\(` `\)` `\[` `\]` `\\`
/// literals; unclosed brackets apply to the rest; adjacent runs of equal weight are merged.
pub fn parse_prompt_attention(text: &str) -> Result<Vec<(String, f64)>> {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    // same alternatives, same order as sd-scripts' `_re_attention` (leftmost-first)
    let re = RE.get_or_init(|| {
        regex::Regex::new(
            r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|\]|[^\\()\[\]:]+|:",
        )
        .unwrap()
    });
    const ROUND: f64 = 1.1;
    let square = 1.0 / 1.1;
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut squares: Vec<usize> = Vec::new();
    fn multiply(res: &mut [(String, f64)], from: usize, m: f64) {
        for r in &mut res[from..] {
            r.1 *= m;
        }
    }
    for caps in re.captures_iter(text) {
        let m = caps.get(0).unwrap().as_str();
        let weight = caps.get(1).map(|w| w.as_str());
        if let Some(lit) = m.strip_prefix('\\') {
            res.push((lit.to_string(), 1.0));
        } else if m == "(" {
            round.push(res.len());
        } else if m == "[" {
            squares.push(res.len());
        } else if let (Some(w), false) = (weight, round.is_empty()) {
            let w: f64 = w.parse().map_err(|_| {
                anyhow::anyhow!("weighted caption {text:?}: `{w}` is not a number (in `{m}`)")
            })?;
            let from = round.pop().unwrap();
            multiply(&mut res, from, w);
        } else if m == ")" && !round.is_empty() {
            let from = round.pop().unwrap();
            multiply(&mut res, from, ROUND);
        } else if m == "]" && !squares.is_empty() {
            let from = squares.pop().unwrap();
            multiply(&mut res, from, square);
        } else {
            res.push((m.to_string(), 1.0));
        }
    }
    for from in round {
        multiply(&mut res, from, ROUND);
    }
    for from in squares {
        multiply(&mut res, from, square);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    let mut i = 0;
    while i + 1 < res.len() {
        if res[i].1 == res[i + 1].1 {
            let next = res.remove(i + 1);
            res[i].0.push_str(&next.0);
        } else {
            i += 1;
        }
    }
    Ok(res)
}

/// Token windows (n × 77 ids) and their weights (n × 77).
pub type WeightedWindows = (Vec<Vec<i64>>, Vec<Vec<f32>>);

/// `--weighted_captions`: the (n, 77) windows of one caption and their per-token weights (1 for
/// BOS/EOS/pad), as sd-scripts' `_get_input_ids(..., weighted=True)`. Each parsed segment is
/// tokenized on its own (so ftfy and the pre-tokenizer see it alone), the ids are truncated to
/// L − 2, then laid out as BOS + ids + EOS + pad and cut into windows as without weights.
pub fn caption_windows_weighted(
    tok: &ClipTokenizer,
    caption: &str,
    max_token_length: Option<usize>,
) -> Result<WeightedWindows> {
    let l = tokenized_length(max_token_length)?;
    let body = l - 2;
    let pad = tok.pad_token();
    let mut ids: Vec<i64> = Vec::new();
    let mut weights: Vec<f64> = Vec::new();
    for (seg, w) in parse_prompt_attention(caption)? {
        let t = tok.encode(&seg);
        weights.extend(std::iter::repeat_n(w, t.len()));
        ids.extend(t);
        if ids.len() > body {
            break;
        }
    }
    ids.truncate(body);
    weights.truncate(body);
    let mut full = Vec::with_capacity(l);
    full.push(BOS_ID);
    full.extend_from_slice(&ids);
    full.push(EOS_ID);
    full.resize(l, pad.id());
    // torch.tensor(list of Python floats) → float32
    let mut wfull: Vec<f32> = Vec::with_capacity(l);
    wfull.push(1.0);
    wfull.extend(weights.iter().map(|&w| w as f32));
    wfull.resize(l, 1.0);
    if l <= MODEL_MAX_LENGTH {
        return Ok((vec![full], vec![wfull]));
    }
    let windows = windows_of(&full, pad);
    let wwin = (0..windows.len())
        .map(|k| {
            let mut w = vec![1.0f32; MODEL_MAX_LENGTH];
            let i = 1 + k * WINDOW_BODY;
            w[1..1 + WINDOW_BODY].copy_from_slice(&wfull[i..i + WINDOW_BODY]);
            w
        })
        .collect();
    Ok((windows, wwin))
}

/// Batch of weighted captions: ids int64 (B, n, 77) and weights float32 (B, n, 77) on `device`.
pub fn tokenize_captions_weighted<S: AsRef<str>>(
    tok: &ClipTokenizer,
    captions: &[S],
    max_token_length: Option<usize>,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    if captions.is_empty() {
        bail!("tokenize_captions_weighted: empty batch");
    }
    let (mut ids, mut ws, mut n) = (Vec::new(), Vec::new(), 0);
    for c in captions {
        let (i, w) = caption_windows_weighted(tok, c.as_ref(), max_token_length)?;
        n = i.len();
        ids.extend(i.into_iter().flatten());
        ws.extend(w.into_iter().flatten());
    }
    let shape = [captions.len() as i64, n as i64, MODEL_MAX_LENGTH as i64];
    Ok((
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&ws).view(shape).to_device(device),
    ))
}

/// sd-scripts' `encode_tokens_with_weights` step: multiplies the encoded states by the token
/// weights (no re-normalisation). `states` (B, 77 | 75n + 2, hidden), `weights` (B, n, 77).
pub fn apply_token_weights(states: &Tensor, weights: &Tensor) -> Tensor {
    let (_, n, _) = weights.size3().expect("weights must be (B, n, 77)");
    let w = weights.to_device(states.device());
    if n == 1 {
        return states * w.squeeze_dim(1).unsqueeze(2);
    }
    let body = WINDOW_BODY as i64;
    let mut parts = vec![states.narrow(1, 0, 1)];
    for k in 0..n {
        let seg = states.narrow(1, k * body + 1, body);
        parts.push(seg * w.select(1, k).narrow(1, 1, body).unsqueeze(-1));
    }
    parts.push(states.narrow(1, n * body + 1, states.size()[1] - n * body - 1));
    Tensor::cat(&parts, 1)
}
