#!/usr/bin/env python3
"""Reference outputs of transformers' CLIPTextModel for tests/clip.rs.

Builds a CLIPTextModel with seeded random weights (every parameter perturbed, so LayerNorm
affine terms and biases are exercised) and writes into OUT_DIR:

* config.json        the transformers text_encoder/config.json
* weights.safetensors  transformers parameter names (+ the position_ids buffer, which the
                       loader must drop, as sd-scripts' checkpoint conversion does)
* ref.safetensors    input_ids (B, 77) with real tokenizer ids padded as SD1 (EOS) and SD2 (0);
                     last_hidden_state and clip_skip=2 outputs for both; the loss weight R and the
                     gradients of sum(last_hidden_state * R) w.r.t. every q/k/v/out_proj/fc1/fc2
                     weight; long-prompt windows and spliced states for max_token_length 150/225,
                     SD1 and SD2 tokenizers, clip_skip None and 2, computed with sd-scripts'
                     splicing rules re-written below.
* meta.json          captions and the list of long-prompt cases

Usage: make_clip_fixtures.py OUT_DIR [--config tiny|sd1|sd2] [--seed N] [--check-sdscripts DIR]

--check-sdscripts DIR: also import sd-scripts' own SdTokenizeStrategy / SdTextEncodingStrategy
from a checkout (DIR, plus its dependencies on PYTHONPATH) and assert that the re-written rules
below give identical windows and states (no sd-scripts code is copied here).
"""
import argparse
import json
import os
import re
import sys

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clip_oracle_tokenizer import load_tokenizers  # noqa: E402

# Mirrors ClipTextConfig::{tiny, sd1, sd2} in src/models/config.rs.
CONFIGS = {
    "tiny": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4, hidden_act="quick_gelu"),
    "sd1": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"),
    "sd2": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"),
}

CAPTIONS = [
    "zunko, 1girl, solo, skirt, one eye closed",
    "a photo of an astronaut riding a horse on mars, highly detailed, (masterpiece:1.2), 8k! wow!",
    "",
]


def long_captions():
    tags = [f"tag{i} {w}" for i, w in enumerate(["red", "blue", "green hair", "smile", "sky", "tree", "cat ears"] * 30)]
    return [
        "short caption, 1girl",
        ", ".join(tags[:40]),  # ~120 tokens: 2 windows used
        ", ".join(tags[:120]),  # > 225 tokens: truncated
        ", ".join(tags[:25]) + "!",  # ~75 tokens: ends close to a window border
    ]


# ---- sd-scripts' long-prompt rules (strategy_base._get_input_ids, strategy_sd.encode_tokens) ----
def sdscripts_windows(tokenizer, ids, max_length):
    mml = tokenizer.model_max_length
    if max_length <= mml:
        return ids.unsqueeze(0)
    windows = []
    for i in range(1, max_length - mml + 2, mml - 2):
        w = torch.cat([ids[:1], ids[i : i + mml - 2], ids[-1:]])
        if tokenizer.pad_token_id != tokenizer.eos_token_id:  # v2 fix-ups
            if w[-2] != tokenizer.eos_token_id and w[-2] != tokenizer.pad_token_id:
                w[-1] = tokenizer.eos_token_id
            if w[1] == tokenizer.pad_token_id:
                w[1] = tokenizer.eos_token_id
        windows.append(w)
    return torch.stack(windows)


def sdscripts_input_ids(tokenizer, text, max_length):
    ids = tokenizer(text, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt").input_ids[0]
    return sdscripts_windows(tokenizer, ids, max_length)


def sdscripts_encode(tokenizer, te, tokens, clip_skip):
    b = tokens.shape[0]
    total = tokens.shape[1] * tokens.shape[2]
    mml = tokenizer.model_max_length
    tokens = tokens.reshape(-1, mml)
    if clip_skip is None:
        h = te(tokens)[0]
    else:
        h = te(tokens, output_hidden_states=True, return_dict=True)["hidden_states"][-clip_skip]
        h = te.text_model.final_layer_norm(h)
    h = h.reshape(b, -1, h.shape[-1])
    if total == mml:
        return h
    parts = [h[:, :1]]
    for i in range(1, total, mml):
        chunk = h[:, i : i + mml - 2]
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            # sd-scripts' v2 branch compares a token id with the *string* eos_token, which
            # PyTorch answers with False: the copy below never happens (kept for fidelity).
            for j in range(len(chunk)):
                if tokens[j, 1] == tokenizer.eos_token:
                    chunk[j, 0] = chunk[j, 1]
        parts.append(chunk)
    parts.append(h[:, -1:])
    return torch.cat(parts, dim=1)


# ---- --weighted_captions (strategy_base._get_weighted_input_ids, encode_tokens_with_weights) ----
ATTN_RE = re.compile(r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|\]|[^\\()\[\]:]+|:")


def parse_attention(text):
    out, opened_round, opened_square = [], [], []

    def scale(start, factor):
        for item in out[start:]:
            item[1] *= factor

    for m in ATTN_RE.finditer(text):
        tok, w = m.group(0), m.group(1)
        if tok[0] == "\\":
            out.append([tok[1:], 1.0])
        elif tok == "(":
            opened_round.append(len(out))
        elif tok == "[":
            opened_square.append(len(out))
        elif w is not None and opened_round:
            scale(opened_round.pop(), float(w))
        elif tok == ")" and opened_round:
            scale(opened_round.pop(), 1.1)
        elif tok == "]" and opened_square:
            scale(opened_square.pop(), 1 / 1.1)
        else:
            out.append([tok, 1.0])
    for start in opened_round:
        scale(start, 1.1)
    for start in opened_square:
        scale(start, 1 / 1.1)
    if not out:
        out = [["", 1.0]]
    merged = [out[0]]
    for item in out[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged


def weighted_input_ids(tokenizer, text, max_length):
    body = max_length - 2
    ids, weights = [], []
    for seg, w in parse_attention(text):
        t = tokenizer(seg).input_ids[1:-1]
        ids += t
        weights += [w] * len(t)
        if len(ids) > body:
            break
    ids, weights = ids[:body], weights[:body]
    ids = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (body - len(ids))
    weights = torch.tensor([1.0] + weights + [1.0] * (max_length - 1 - len(weights)))
    windows = sdscripts_windows(tokenizer, torch.tensor(ids), max_length)
    if max_length <= tokenizer.model_max_length:
        return windows, weights.unsqueeze(0)
    mml = tokenizer.model_max_length
    wwin = torch.ones(windows.shape)
    for k in range(windows.shape[0]):
        wwin[k, 1 : mml - 1] = weights[1 + k * (mml - 2) : 1 + (k + 1) * (mml - 2)]
    return windows, wwin


def apply_weights(states, weights):
    if weights.shape[1] == 1:
        return states * weights[:, 0].unsqueeze(2)
    states = states.clone()
    for k in range(weights.shape[1]):
        states[:, k * 75 + 1 : k * 75 + 76] *= weights[:, k, 1:-1].unsqueeze(-1)
    return states


WEIGHTED_CAPTIONS = [
    "masterpiece, (best quality:1.3), 1girl, ((smile)), [[blurry]], (red hair:0.8)",
    "a (photo:1.2) of [a cat] \\(literal\\) and (unclosed, sky",
    "(((a house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "plain caption without weights",
    "",
    ", ".join(f"(tag{i}:1.{i % 10})" if i % 3 == 0 else f"word{i}" for i in range(90)),
]


def check_against_sdscripts(sd_dir, te, tok1, tok2, caps):
    sys.path.insert(0, sd_dir)
    from library.strategy_sd import SdTextEncodingStrategy, SdTokenizeStrategy

    n = 0
    for tok in (tok1, tok2):
        for mtl in (None, 75, 150, 225):
            # bypass __init__, which would load the tokenizer from the hub
            st = object.__new__(SdTokenizeStrategy)
            st.tokenizer = tok
            st.max_length = tok.model_max_length if mtl is None else mtl + 2
            real = st.tokenize(caps)[0]
            mine = torch.stack([sdscripts_input_ids(tok, c, st.max_length) for c in caps])
            assert torch.equal(real, mine), f"token windows differ from sd-scripts (max_token_length {mtl})"
            for skip in (None, 1, 2):
                with torch.no_grad():
                    a = SdTextEncodingStrategy(skip).encode_tokens(st, [te], [real.clone()])[0]
                    b = sdscripts_encode(tok, te, real.clone(), skip)
                assert torch.equal(a, b), f"states differ from sd-scripts (max_token_length {mtl}, clip_skip {skip})"
                n += 1
    print(f"sd-scripts strategies agree with the re-written rules: {n} combinations, {len(caps)} captions")


def check_weighted_against_sdscripts(sd_dir, te, tok1, tok2):
    sys.path.insert(0, sd_dir)
    from library.strategy_sd import SdTextEncodingStrategy, SdTokenizeStrategy

    n = 0
    for tok in (tok1, tok2):
        for mtl in (None, 150, 225):
            st = object.__new__(SdTokenizeStrategy)
            st.tokenizer = tok
            st.max_length = tok.model_max_length if mtl is None else mtl + 2
            real_ids, real_w = st.tokenize_with_weights(WEIGHTED_CAPTIONS)
            pairs = [weighted_input_ids(tok, c, st.max_length) for c in WEIGHTED_CAPTIONS]
            mine_ids = torch.stack([p[0] for p in pairs])
            mine_w = torch.stack([p[1] for p in pairs])
            assert torch.equal(real_ids[0], mine_ids), f"weighted ids differ (max_token_length {mtl})"
            assert torch.equal(real_w[0], mine_w), f"weights differ (max_token_length {mtl})"
            with torch.no_grad():
                a = SdTextEncodingStrategy(2).encode_tokens_with_weights(st, [te], real_ids, real_w)[0]
                b = apply_weights(sdscripts_encode(tok, te, mine_ids.clone(), 2), mine_w)
            assert torch.equal(a, b), f"weighted states differ (max_token_length {mtl})"
            n += 1
    print(f"sd-scripts weighted-caption path agrees with the re-written rules: {n} combinations")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-sdscripts", metavar="DIR", help="sd-scripts checkout to cross-check the splicing rules")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    cfg = CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, **CONFIGS[args.config]
    )
    te = CLIPTextModel(cfg).eval()
    with torch.no_grad():
        for name, p in te.named_parameters():
            if name.endswith("layer_norm1.weight") or name.endswith("layer_norm2.weight") or name.endswith("final_layer_norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.add_(0.01 * torch.randn_like(p))
    te.config.to_json_file(os.path.join(args.out_dir, "config.json"))
    sd = {k: v.contiguous() for k, v in te.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64).unsqueeze(0)
    save_file(sd, os.path.join(args.out_dir, "weights.safetensors"))

    tok1, tok2 = load_tokenizers()
    ref = {}
    ids1 = tok1(CAPTIONS, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    ids2 = tok2(CAPTIONS, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    ref["input_ids"] = ids1
    ref["input_ids_sd2"] = ids2
    with torch.no_grad():
        for tag, ids in (("", ids1), ("_sd2", ids2)):
            out = te(ids, output_hidden_states=True)
            ref["last_hidden" + tag] = out.last_hidden_state
            ref["skip2" + tag] = te.text_model.final_layer_norm(out.hidden_states[-2])

    # reduced precision (tiny only): the same model cast to fp16 / bf16, as with --mixed_precision
    if args.config == "tiny":
        for dt, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            te_lp = CLIPTextModel(cfg).eval()
            te_lp.load_state_dict(te.state_dict())
            te_lp = te_lp.to(dt)
            with torch.no_grad():
                out = te_lp(ids1, output_hidden_states=True)
                ref["last_hidden_" + name] = out.last_hidden_state.float()
                ref["skip2_" + name] = te_lp.text_model.final_layer_norm(out.hidden_states[-2]).float()

    # gradients of a fixed random projection of the output w.r.t. the LoRA-targeted weights
    # (tiny only: the full-size cases check the forward pass, and this keeps their memory down)
    r = torch.randn(ref["last_hidden"].shape, generator=torch.Generator().manual_seed(args.seed + 1))
    ref["loss_weight"] = r
    if args.config == "tiny":
        te.zero_grad()
        loss = (te(ids1).last_hidden_state * r).sum()
        loss.backward()
        for name, p in te.named_parameters():
            if name.endswith("_proj.weight") or name.endswith("fc1.weight") or name.endswith("fc2.weight"):
                ref["grad." + name] = p.grad.detach().clone()
        te.zero_grad(set_to_none=True)

    cases = []
    caps = long_captions()
    with torch.no_grad():
        for mtl in (150, 225):
            for ver, tok in (("sd1", tok1), ("sd2", tok2)):
                toks = torch.stack([sdscripts_input_ids(tok, c, mtl + 2) for c in caps])
                key = f"long_{mtl}_{ver}"
                ref[key + ".ids"] = toks
                for skip in (None, 2):
                    ref[f"{key}.skip{skip or 0}"] = sdscripts_encode(tok, te, toks.clone(), skip)
                cases.append({"key": key, "max_token_length": mtl, "v2": ver == "sd2"})
    wcases = []
    with torch.no_grad():
        for mtl in (None, 150, 225):
            for ver, tok in (("sd1", tok1), ("sd2", tok2)):
                L = 77 if mtl is None else mtl + 2
                pairs = [weighted_input_ids(tok, c, L) for c in WEIGHTED_CAPTIONS]
                toks = torch.stack([p[0] for p in pairs])
                ws = torch.stack([p[1] for p in pairs])
                key = f"weighted_{mtl or 0}_{ver}"
                ref[key + ".ids"] = toks
                ref[key + ".weights"] = ws
                ref[key + ".states"] = apply_weights(sdscripts_encode(tok, te, toks.clone(), 2), ws)
                wcases.append({"key": key, "max_token_length": mtl, "v2": ver == "sd2", "clip_skip": 2})

    if args.check_sdscripts:
        check_against_sdscripts(args.check_sdscripts, te, tok1, tok2, caps + CAPTIONS)
        check_weighted_against_sdscripts(args.check_sdscripts, te, tok1, tok2)
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(args.out_dir, "ref.safetensors"))
    meta = {
        "config": args.config,
        "seed": args.seed,
        "captions": CAPTIONS,
        "long_captions": caps,
        "long_cases": cases,
        "weighted_captions": WEIGHTED_CAPTIONS,
        "weighted_cases": wcases,
    }
    with open(os.path.join(args.out_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    print("wrote", args.out_dir)


if __name__ == "__main__":
    main()
