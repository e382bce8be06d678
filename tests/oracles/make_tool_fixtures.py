#!/usr/bin/env python3
"""Writes small random LoRA files for testing the LoRA tools (resize_lora, svd_merge_lora,
merge_lora, extract_lora_from_models) against tests/oracles/tools_mirror.py.

    make_tool_fixtures.py OUT_DIR [--case tiny|sd1|sd2] [--seed N] [--modules N]

Module names and shapes come from scripts/lora_module_list.py (sd-scripts' networks.lora targets
for the case, `<case>_conv` list: Linear, 1x1 conv and 3x3 conv modules), so the files apply to
the matching checkpoints from scripts/make_sd_checkpoint.py (tiny / tiny-v2 / sd15 / sd21).
--modules N keeps only every k-th module (about N of them) to make full-size cases cheap.

Files (kohya layout `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`):
  a.safetensors  rank 4 (3x3 conv: 8), fp32, alpha float32 (2.0 linear / 4.0 conv),
                 full training metadata incl. modelspec.title
  b.safetensors  rank 8 (3x3 conv: 8), fp32, alpha float32 varying per module (module set: every
                 other module), one module with an all-zero up (a zero delta)
  c.safetensors  rank 4 (3x3 conv: 8) like a (same shapes, so LoRA+LoRA merge works), fp16,
                 alpha int64 (= rank for some modules, 1 for others), metadata without a title
  d.safetensors  rank 16 (3x3 conv: 4), bf16, alpha float32, three modules without an alpha key
                 (old LoRAs: scale 1), ss_network_dim "Dynamic"
  a.ckpt         a.safetensors' tensors as a torch pickle (no metadata)
  e.safetensors  rank 4 like a, fp32, a subset of modules (for LoRA+LoRA merges of a and e)
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import lora_module_list as lml  # noqa: E402


def modules_for(case):
    te, unet = lml.build(case, "cpu" if case == "tiny" else "meta")
    # conv_dim only decides which modules exist; the ranks are chosen per file below
    return lml.module_list(te, unet, 8, 1.0)


def make_lora(mods, rank, conv_rank, gen, dtype, alpha_fn, drop_alpha=(), zero=()):
    sd = {}
    for i, m in enumerate(mods):
        name, kind = m["name"], m["kind"]
        r = conv_rank if kind == "conv3x3" else rank
        down = [r] + m["down"][1:]
        up = [m["up"][0], r] + m["up"][2:]
        # scaled like trained LoRAs: small, non-trivial products
        sd[name + ".lora_down.weight"] = (torch.randn(down, generator=gen) * 0.1).to(dtype)
        u = torch.randn(up, generator=gen) * 0.05
        if name in zero:
            u.zero_()
        sd[name + ".lora_up.weight"] = u.to(dtype)
        if name not in drop_alpha:
            sd[name + ".alpha"] = alpha_fn(i, kind, r)
    return sd


def training_metadata(case, dim, alpha, conv_dim, conv_alpha, title=None):
    v2 = case == "sd2"
    meta = {
        "ss_session_id": "1234567890",
        "ss_training_started_at": "1700000000.0",
        "ss_output_name": "fixture",
        "ss_learning_rate": "0.0001",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({"conv_dim": str(conv_dim), "conv_alpha": str(conv_alpha)}),
        "ss_v2": str(v2),
        "ss_base_model_version": "sd_v2" if v2 else "sd_v1",
        "ss_training_comment": "fixture comment",
        "sshs_model_hash": "stale",
        "sshs_legacy_hash": "stale",
    }
    if title:
        meta["modelspec.title"] = title
        meta["modelspec.sai_model_spec"] = "1.0.1"
        meta["modelspec.architecture"] = "stable-diffusion-v1/lora"
    return meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--case", default="tiny", choices=["tiny", "sd1", "sd2"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modules", type=int, default=0, help="keep about N modules (0: all)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    mods = modules_for(a.case)
    if a.modules:
        # keep every kind represented: pick evenly from each kind
        kept = []
        for kind in ("linear", "conv1x1", "conv3x3"):
            of_kind = [m for m in mods if m["kind"] == kind]
            step = max(1, len(of_kind) * 3 // max(a.modules, 1))
            kept += of_kind[::step]
        mods = [m for m in mods if m in kept]
    gen = torch.Generator().manual_seed(a.seed)
    f32 = lambda v: torch.tensor(float(v), dtype=torch.float32)  # noqa: E731

    sd_a = make_lora(mods, 4, 8, gen, torch.float32, lambda i, k, r: f32(4.0 if k == "conv3x3" else 2.0))
    save_file(sd_a, os.path.join(a.out, "a.safetensors"), training_metadata(a.case, 4, 2.0, 8, 4.0, "lora A"))
    torch.save(sd_a, os.path.join(a.out, "a.ckpt"))

    half = mods[::2]
    sd_b = make_lora(half, 8, 8, gen, torch.float32, lambda i, k, r: f32(1.0 + (i % 4)),
                     zero={half[1]["name"]})
    save_file(sd_b, os.path.join(a.out, "b.safetensors"), training_metadata(a.case, 8, 1.0, 8, 1.0))

    sd_c = make_lora(mods, 4, 8, gen, torch.float16,
                     lambda i, k, r: torch.tensor(r if i % 2 else 1, dtype=torch.int64))
    save_file(sd_c, os.path.join(a.out, "c.safetensors"), training_metadata(a.case, 4, 1, 8, 1))

    drop = {m["name"] for m in mods[1:4]}
    sd_d = make_lora(mods, 16, 4, gen, torch.bfloat16, lambda i, k, r: f32(r / 2), drop_alpha=drop)
    meta_d = training_metadata(a.case, "Dynamic", "Dynamic", 4, 2.0)
    save_file(sd_d, os.path.join(a.out, "d.safetensors"), meta_d)

    sd_e = make_lora(mods[: max(2, len(mods) // 3)], 4, 8, gen, torch.float32,
                     lambda i, k, r: f32(4.0 if k == "conv3x3" else 2.0))
    save_file(sd_e, os.path.join(a.out, "e.safetensors"), training_metadata(a.case, 4, 2.0, 8, 4.0, "lora E"))
    print(f"wrote {len(mods)}-module fixtures ({a.case}) to {a.out}")


if __name__ == "__main__":
    main()
