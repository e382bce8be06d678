#!/usr/bin/env python
"""Parity fixtures for sdlora's VAE (`tests/vae.rs`), computed by diffusers' AutoencoderKL, fp32 on CPU.

Writes
  OUT/vae/{config.json, diffusion_pytorch_model.safetensors}   seeded random weights (save_pretrained)
  OUT/fixture.safetensors   with
    x                images in [-1, 1], (B, 3, H, W)
    mean, logvar     latent_dist.mean / .logvar of vae.encode(x) (logvar clamped by diffusers)
    sample_seed      the torch.manual_seed used just before latent_dist.sample()
    sample           that sample (global CPU generator, as sd-scripts draws it)
    z, decoded       random latents and vae.decode(z).sample
    clamp.quant_conv.bias, clamp.mean, clamp.logvar
                     the same encode with quant_conv's logvar biases pushed to +-50, so both ends
                     of the [-30, 20] clamp are hit

Usage: python scripts/make_vae_fixtures.py --config tiny|sd --out DIR [--size 32] [--batch 2]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_sd_checkpoint import CONFIGS, randomize_  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["tiny", "sd"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=32, help="image height and width")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()

    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.set_grad_enabled(False)
    cfg = CONFIGS["tiny" if args.config == "tiny" else "sd15"]["vae"]
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**cfg).eval()
    randomize_(vae, torch.Generator().manual_seed(args.seed + 1))
    vae.save_pretrained(os.path.join(args.out, "vae"), safe_serialization=True)

    g = torch.Generator().manual_seed(args.seed + 2)
    b, s = args.batch, args.size
    x = torch.rand((b, cfg["in_channels"], s, s), generator=g) * 2 - 1
    dist = vae.encode(x).latent_dist
    seed = 1234
    torch.manual_seed(seed)
    sample = dist.sample()
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    z = torch.randn((b, cfg["latent_channels"], s // f, s // f), generator=g)
    decoded = vae.decode(z).sample

    lat = cfg["latent_channels"]
    bias = vae.quant_conv.bias.clone()
    bias[lat : lat + lat // 2] += 50.0
    bias[lat + lat // 2 :] -= 50.0
    vae.quant_conv.bias.copy_(bias)
    clamp = vae.encode(x).latent_dist
    assert clamp.logvar.max() == 20.0 and clamp.logvar.min() == -30.0, "clamp case does not clamp"

    out = {
        "x": x,
        "mean": dist.mean,
        "logvar": dist.logvar,
        "sample_seed": torch.tensor(seed, dtype=torch.int64),
        "sample": sample,
        "z": z,
        "decoded": decoded,
        "clamp.quant_conv.bias": bias,
        "clamp.mean": clamp.mean,
        "clamp.logvar": clamp.logvar,
    }
    path = os.path.join(args.out, "fixture.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
