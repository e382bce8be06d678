#!/usr/bin/env python
"""PyTorch/diffusers side of `scripts/bench models`: the same step as examples/unet_step.rs.

usage: bench_unet.py DIR MODEL PIXELS MODE [REPEAT]
  DIR/MODEL.config.json + DIR/MODEL.weights.safetensors (scripts/make_unet_fixtures.py)
  MODE: forward | plain (forward + backward into rank-4 LoRA-like adapters on the 192
        Transformer2D Linear/1x1-conv layers, added with forward hooks)
Prints one line in the same format as unet_step.
"""
import json
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def main():
    d, model, pixels, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    repeat = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    with open(f"{d}/{model}.config.json") as f:
        cfg = json.load(f)
    unet = UNet2DConditionModel.from_config(cfg)
    unet.load_state_dict(load_file(f"{d}/{model}.weights.safetensors"))
    unet.requires_grad_(False).eval()
    torch.manual_seed(0)
    params = []
    for name, m in unet.named_modules():
        if ".attentions." not in "." + name or not any(name.endswith("." + t) for t in TARGETS):
            continue
        if isinstance(m, torch.nn.Linear):
            down = (torch.randn(4, m.in_features) * 0.01).requires_grad_(True)
            up = (torch.randn(m.out_features, 4) * 0.01).requires_grad_(True)
            fn = lambda x, dn=down, u=up: torch.nn.functional.linear(torch.nn.functional.linear(x, dn), u)
        elif isinstance(m, torch.nn.Conv2d):
            down = (torch.randn(4, m.in_channels, 1, 1) * 0.01).requires_grad_(True)
            up = (torch.randn(m.out_channels, 4, 1, 1) * 0.01).requires_grad_(True)
            fn = lambda x, dn=down, u=up: torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, dn), u)
        else:
            continue
        m.register_forward_hook(lambda mod, inp, out, fn=fn: out + fn(inp[0]))
        params += [down, up]
    lat = pixels // 8
    sample = torch.randn(1, cfg["in_channels"], lat, lat)
    t = torch.tensor([500])
    ctx = torch.randn(1, 77, cfg["cross_attention_dim"])
    target = torch.randn(1, cfg["out_channels"], lat, lat)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        if mode == "forward":
            with torch.no_grad():
                unet(sample, t, ctx)
        elif mode == "plain":
            out = unet(sample, t, ctx).sample
            ((out - target) ** 2).mean().backward()
        else:
            sys.exit(f"unknown mode {mode}")
        times.append(time.perf_counter() - t0)
    times.sort()
    print(
        f"diffusers_step model={model} pixels={pixels} mode={mode} adapters={len(params) // 2} "
        f"best_s={times[0]:.3f} median_s={times[len(times) // 2]:.3f} threads={torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()
