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
    Ok(out)
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
