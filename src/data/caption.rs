//! Caption processing at every access (`TU:BaseDataset.process_caption`) and the 77-token windows
//! of `--max_token_length` (`SB:TokenizeStrategy._get_input_ids`).
//! spec: sdscripts_cli_data.md §3.12, §3.13.
use super::config::SubsetParams;
use super::pyrandom::PyRandom;
use anyhow::{bail, Result};

/// The subset options that shape a caption, plus the dataset's epoch/step counters.
pub struct CaptionContext {
    pub current_epoch: i64,
    pub current_step: i64,
    pub max_train_steps: i64,
}

/// `process_caption`: prefix/suffix, dropout, wildcards, keep_tokens, shuffle, tag dropout,
/// secondary separator. Draws from `rng` exactly where sd-scripts draws.
pub fn process_caption(
    sp: &SubsetParams,
    caption: &str,
    ctx: &CaptionContext,
    rng: &mut PyRandom,
) -> String {
    let mut caption = caption.to_string();
    if let Some(p) = sp.caption_prefix.as_deref().filter(|p| !p.is_empty()) {
        caption = format!("{p} {caption}");
    }
    if let Some(s) = sp.caption_suffix.as_deref().filter(|s| !s.is_empty()) {
        caption = format!("{caption} {s}");
    }
    let rate = sp.caption_dropout_rate.get();
    let mut drop = rate > 0.0 && rng.random() < rate;
    let every = sp.caption_dropout_every_n_epochs;
    drop = drop || (every > 0 && ctx.current_epoch.rem_euclid(every) == 0);
    if drop {
        return String::new();
    }
    if sp.enable_wildcard {
        if caption.contains('\n') {
            let lines: Vec<&str> = caption.split('\n').collect();
            caption = lines[rng.choice_index(lines.len())].to_string();
        }
        caption = replace_wildcards(&caption, rng);
    } else {
        caption = caption.split('\n').next().unwrap_or("").to_string();
    }
    let tag_rate = sp.caption_tag_dropout_rate.get();
    let mut warmup_step = sp.token_warmup_step.get();
    if sp.shuffle_caption || warmup_step > 0.0 || tag_rate > 0.0 {
        let sep = sp.caption_separator.as_str();
        let split_clean = |s: &str| -> Vec<String> {
            s.split(sep)
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect()
        };
        let mut fixed: Vec<String> = vec![];
        let mut flex: Vec<String>;
        let mut fixed_suffix: Vec<String> = vec![];
        let kts = sp.keep_tokens_separator.as_str();
        if !kts.is_empty() && caption.contains(kts) {
            let (fixed_part, rest) = caption.split_once(kts).unwrap();
            let mut flex_part = rest.to_string();
            if let Some((f, suffix)) = rest.split_once(kts) {
                fixed_suffix = split_clean(suffix);
                flex_part = f.to_string();
            }
            fixed = split_clean(fixed_part);
            flex = split_clean(&flex_part);
        } else {
            let tokens: Vec<String> = caption
                .trim()
                .split(sep)
                .map(|t| t.trim().to_string())
                .collect();
            flex = tokens.clone();
            if sp.keep_tokens > 0 {
                let k = (sp.keep_tokens as usize).min(tokens.len());
                fixed = tokens[..k].to_vec();
                flex = tokens[k..].to_vec();
            }
        }
        if warmup_step < 1.0 {
            // sd-scripts overwrites the subset's value on first use; the result is the same each time.
            warmup_step = (warmup_step * ctx.max_train_steps as f64).floor();
        }
        if warmup_step != 0.0 && (ctx.current_step as f64) < warmup_step {
            let len = ((ctx.current_step as f64)
                * ((flex.len() as f64 - sp.token_warmup_min as f64) / warmup_step))
                .floor() as i64
                + sp.token_warmup_min;
            let len = py_slice_end(len, flex.len());
            flex.truncate(len);
        }
        if sp.shuffle_caption {
            rng.shuffle(&mut flex);
        }
        if tag_rate > 0.0 {
            flex.retain(|_| rng.random() >= tag_rate);
        }
        let mut all = fixed;
        all.extend(flex);
        all.extend(fixed_suffix);
        caption = all.join(", ");
    }
    if let Some(sec) = sp.secondary_separator.as_deref().filter(|s| !s.is_empty()) {
        caption = caption.replace(sec, &sp.caption_separator);
    }
    caption
}

/// `lst[:n]` length for a possibly negative n.
fn py_slice_end(n: i64, len: usize) -> usize {
    if n < 0 {
        (len as i64 + n).max(0) as usize
    } else {
        (n as usize).min(len)
    }
}

/// `{a|b|c}` → one choice per group (`re.sub(r"\{([^}]+)\}", ...)`), with `{{`/`}}` escapes.
fn replace_wildcards(caption: &str, rng: &mut PyRandom) -> String {
    let mut r1 = "⦅".to_string();
    let mut r2 = "⦆".to_string();
    while caption.contains(&r1) || caption.contains(&r2) {
        r1.push('⦅');
        r2.push('⦆');
    }
    let s = caption.replace("{{", &r1).replace("}}", &r2);
    let mut out = String::new();
    let mut rest = s.as_str();
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) if close > 0 => {
                let group = &after[..close];
                let options: Vec<&str> = group.split('|').collect();
                out.push_str(options[rng.choice_index(options.len())]);
                rest = &after[close + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace(&r1, "{").replace(&r2, "}")
}

/// The CLIP tokenizer as the data pipeline needs it. Implemented by the CLIP tokenizer
/// (`models::tokenizer`); tests use a stand-in.
pub trait TextTokenizer: Send + Sync {
    /// BPE ids of `text` without BOS/EOS (after the tokenizer's own normalisation).
    fn encode(&self, text: &str) -> Vec<i64>;
    fn bos(&self) -> i64;
    fn eos(&self) -> i64;
    /// EOS (49407) for SD1's tokenizer, 0 for SD2's.
    fn pad(&self) -> i64;
}

/// `--max_token_length` → tokenizer max_length (77, 152 or 227).
pub fn max_length_for(max_token_length: Option<i64>) -> Result<usize> {
    match max_token_length {
        None | Some(75) => Ok(77),
        Some(150) => Ok(152),
        Some(225) => Ok(227),
        Some(other) => bail!("--max_token_length: {other} is not one of 75, 150, 225"),
    }
}

/// `tokenize(text, padding="max_length", truncation=True, max_length)` then the split into
/// (n, 77) windows; `v2` applies SD2's EOS/PAD fix-ups.
pub fn input_ids_windows(
    tok: &dyn TextTokenizer,
    text: &str,
    max_length: usize,
    v2: bool,
) -> Vec<[i64; 77]> {
    let mut ids = vec![tok.bos()];
    let body = tok.encode(text);
    ids.extend(body.iter().take(max_length - 2));
    ids.push(tok.eos());
    while ids.len() < max_length {
        ids.push(tok.pad());
    }
    if max_length == 77 {
        let mut w = [0i64; 77];
        w.copy_from_slice(&ids);
        return vec![w];
    }
    let mut out = Vec::new();
    let last = ids[ids.len() - 1];
    // window starts: range(1, max_length - 77 + 2, 75), i.e. 1, 76 (152) and 1, 76, 151 (227)
    let mut i = 1;
    while i < max_length - 77 + 2 {
        let mut w = [0i64; 77];
        w[0] = ids[0];
        w[1..76].copy_from_slice(&ids[i..i + 75]);
        w[76] = last;
        if v2 {
            if w[75] != tok.eos() && w[75] != tok.pad() {
                w[76] = tok.eos();
            }
            if w[1] == tok.pad() {
                w[1] = tok.eos();
            }
        }
        out.push(w);
        i += 75;
    }
    out
}

impl TextTokenizer for crate::models::tokenizer::ClipTokenizer {
    fn encode(&self, text: &str) -> Vec<i64> {
        crate::models::tokenizer::ClipTokenizer::encode(self, text)
    }
    fn bos(&self) -> i64 {
        crate::models::tokenizer::BOS_ID
    }
    fn eos(&self) -> i64 {
        crate::models::tokenizer::EOS_ID
    }
    fn pad(&self) -> i64 {
        self.pad_token().id()
    }
}
