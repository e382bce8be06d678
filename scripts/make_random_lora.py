#!/usr/bin/env python3
"""Writes a random-weight (seeded) LoRA in kohya-ss/sd-scripts' `networks.lora` layout: the module
names and shapes of SD1.5 (or SD2) that scripts/lora_module_list.py derives from the diffusers /
transformers module trees, `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`,
and the ss_* / modelspec.* metadata a trained LoRA carries.

    make_random_lora.py OUT.safetensors [--case sd1_conv] [--rank R] [--conv-rank C] [--alpha A]
        [--conv-alpha A] [--seed S] [--fp16] [--title T] [--comment TEXT]

Cases: sd1, sd1_conv, sd2, sd2_conv (as in lora_module_list.py; "_conv": 3x3 convolutions of
ResnetBlock2D / Downsample2D / Upsample2D get rank --conv-rank). Linear and 1x1 convolution
modules get rank --rank.

The weights are not a trained LoRA's, but they are shaped like one for the tools that take a
LoRA apart (resize_lora, svd_merge_lora): each module's ΔW = up @ down has a decaying singular
spectrum, s_k ≈ σ·exp(-k/τ) with τ drawn per module, so dynamic rank selection (sv_ratio,
sv_fro, sv_cumulative) gives different ranks for different modules. A few modules are zero
(up = 0, like an untrained module), as happens in real files.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lora_module_list  # noqa: E402


def modules(case, rank, conv_rank, alpha, conv_alpha):
    base = case.replace("_conv", "")
    te, unet = lora_module_list.build(base, "meta")
    conv = case.endswith("_conv")
    return lora_module_list.module_list(te, unet, conv_rank if conv else None, conv_alpha if conv else None,
                                        network_dim=rank, network_alpha=alpha)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--case", default="sd1_conv", choices=["sd1", "sd1_conv", "sd2", "sd2_conv"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--conv-rank", type=int, default=None, help="default: --rank")
    ap.add_argument("--alpha", type=float, default=None, help="default: rank / 2")
    ap.add_argument("--conv-alpha", type=float, default=None, help="default: conv rank / 2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp16", action="store_true", help="store weights and alphas as fp16")
    ap.add_argument("--zero-every", type=int, default=97, help="every N-th module has up = 0 (0: none)")
    ap.add_argument("--title", default=None, help="modelspec.title (default: OUT's stem)")
    ap.add_argument("--comment", default=None, help="ss_training_comment")
    a = ap.parse_args()

    conv_rank = a.conv_rank or a.rank
    alpha = a.alpha if a.alpha is not None else a.rank / 2
    conv_alpha = a.conv_alpha if a.conv_alpha is not None else conv_rank / 2
    dtype = torch.float16 if a.fp16 else torch.float32
    gen = torch.Generator().manual_seed(a.seed)

    sd = {}
    mods = modules(a.case, a.rank, conv_rank, alpha, conv_alpha)
    for i, m in enumerate(mods):
        down_shape, up_shape = m["down"], m["up"]
        r = down_shape[0]
        fan_in = math.prod(down_shape[1:])
        # rows of down: random directions of norm ~1 (kaiming-like scale)
        down = torch.randn(down_shape, generator=gen) / math.sqrt(fan_in)
        # columns of up: decaying magnitudes, per-module decay length and overall size
        tau = float(torch.empty(1).uniform_(0.08, 0.6, generator=gen)) * r
        sigma = float(torch.empty(1).uniform_(0.5, 2.0, generator=gen)) * 1e-2
        decay = sigma * torch.exp(-torch.arange(r, dtype=torch.float32) / tau)
        up = torch.randn(up_shape, generator=gen)
        shape = [1, r] + [1] * (len(up_shape) - 2)
        up = up * decay.reshape(shape)
        if a.zero_every and i % a.zero_every == a.zero_every - 1:
            up.zero_()
        sd[f"{m['name']}.lora_down.weight"] = down.to(dtype).contiguous()
        sd[f"{m['name']}.lora_up.weight"] = up.to(dtype).contiguous()
        # sd-scripts saves alpha as a 0-d tensor of the save dtype
        sd[f"{m['name']}.alpha"] = torch.tensor(float(m["alpha"])).to(dtype)

    v2 = a.case.startswith("sd2")
    conv = a.case.endswith("_conv")
    title = a.title or os.path.splitext(os.path.basename(a.out))[0]
    now = time.time()
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(a.rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)}) if conv else "null",
        "ss_v2": str(v2),
        "ss_base_model_version": "sd_v2" if v2 else "sd_v1",
        "ss_sd_model_name": "v2-1_768-ema-pruned.safetensors" if v2 else "v1-5-pruned-emaonly.safetensors",
        "ss_training_comment": a.comment if a.comment is not None else f"random LoRA (seed {a.seed})",
        "ss_learning_rate": "0.0001",
        "ss_unet_lr": "0.0001",
        "ss_text_encoder_lr": "5e-05",
        "ss_max_train_steps": "1600",
        "ss_num_epochs": "10",
        "ss_epoch": "10",
        "ss_mixed_precision": "fp16" if a.fp16 else "no",
        "ss_save_precision": "fp16" if a.fp16 else "float",
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_seed": str(a.seed),
        "ss_training_started_at": str(now - 3600),
        "ss_training_finished_at": str(now),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ("stable-diffusion-v2-768-v" if v2 else "stable-diffusion-v1") + "/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": "768x768" if v2 else "512x512",
        "modelspec.prediction_type": "v" if v2 else "epsilon",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    save_file(sd, a.out, metadata=meta)
    print(f"wrote {a.out}: {len(mods)} modules, rank {a.rank}" + (f", conv rank {conv_rank}" if conv else "")
          + f", alpha {alpha}" + (f"/{conv_alpha}" if conv else "") + f", {dtype}")


if __name__ == "__main__":
    main()
