#!/usr/bin/env python3
"""End-to-end reference for the text encoder of a checkpoint written by make_sd_checkpoint.py:
loads DIR/diffusers/text_encoder with transformers (CLIPTextModel.from_pretrained), tokenizes
fixed captions with the SD1 tokenizer, or the SD2 one with --v2, at
max_token_length 150 with sd-scripts' rules, and writes DIR/clip_ref.safetensors:
ids (B, 2, 77) and the spliced states for clip_skip None (`skip0`) and 2 (`skip2`).

Usage: clip_checkpoint_reference.py DIR [--v2]"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clip_oracle_tokenizer import load_tokenizers  # noqa: E402
from make_clip_fixtures import sdscripts_encode, sdscripts_input_ids  # noqa: E402

CAPTIONS = [
    "zunko, 1girl, solo, skirt, one eye closed",
    "a very long caption, " * 30 + "the end!",
]


def main():
    d = sys.argv[1]
    te = CLIPTextModel.from_pretrained(os.path.join(d, "diffusers", "text_encoder")).eval()
    v2 = "--v2" in sys.argv[2:]
    tok = load_tokenizers()[1 if v2 else 0]
    ids = torch.stack([sdscripts_input_ids(tok, c, 152) for c in CAPTIONS])
    ref = {"ids": ids}
    with torch.no_grad():
        for skip in (None, 2):
            ref[f"skip{skip or 0}"] = sdscripts_encode(tok, te, ids.clone(), skip)
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(d, "clip_ref.safetensors"))
    with open(os.path.join(d, "clip_ref.json"), "w") as f:
        json.dump({"v2": v2, "captions": CAPTIONS}, f)


if __name__ == "__main__":
    main()
