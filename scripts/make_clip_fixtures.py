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

Usage: make_clip_fixtures.py OUT_DIR [--config tiny|sd1|sd2] [--seed N]
"""
import argparse
import json
import os
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
def sdscripts_input_ids(tokenizer, text, max_length):
    ids = tokenizer(text, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt").input_ids[0]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
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
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(args.out_dir, "ref.safetensors"))
    meta = {"config": args.config, "seed": args.seed, "captions": CAPTIONS, "long_captions": caps, "long_cases": cases}
    with open(os.path.join(args.out_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    print("wrote", args.out_dir)


if __name__ == "__main__":
    main()
