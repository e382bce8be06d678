#!/usr/bin/env python
"""Reference outputs of a Diffusers Stable Diffusion folder (as written by make_sd_checkpoint.py),
computed by diffusers/transformers in fp32 on CPU, for tests/checkpoint_models.rs: the checkpoint,
loaded by sdlora from either form into its own UNet / CLIP / VAE, must reproduce them.

Writes OUT (safetensors) with
  input_ids (B, 77) int64, clip_last (last_hidden_state), clip_skip2 (final LN of hidden_states[-2])
  sample (B, 4, h, w), timesteps (B,) int64, unet_out (UNet(sample, t, clip_last))
  image (B, 3, H, W), vae_mean, vae_logvar, vae_decoded (decode(vae_mean))

Usage: python scripts/make_checkpoint_outputs.py --model DIR/diffusers --out FILE [--seed 0]
"""
import argparse
import os

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    torch.set_grad_enabled(False)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(args.model, "unet")).float().eval()
    te = CLIPTextModel.from_pretrained(os.path.join(args.model, "text_encoder")).float().eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(args.model, "vae")).float().eval()

    g = torch.Generator().manual_seed(args.seed)
    b, n = 2, te.config.max_position_embeddings
    ids = torch.randint(1, 49400, (b, n), generator=g)
    ids[:, 0] = 49406
    ids[0, 7:] = 49407  # a short prompt padded with EOS, and a full-length one
    ids[1, -1] = 49407
    out = te(ids, output_hidden_states=True)
    clip_last = out.last_hidden_state
    clip_skip2 = te.text_model.final_layer_norm(out.hidden_states[-2])

    f = 2 ** (len(vae.config.block_out_channels) - 1)
    size = 16
    image = torch.rand((b, 3, size, size), generator=g) * 2 - 1
    dist = vae.encode(image).latent_dist
    decoded = vae.decode(dist.mean).sample

    sample = torch.randn((b, unet.config.in_channels, size // f, size // f), generator=g)
    timesteps = torch.tensor([10, 700], dtype=torch.int64)
    unet_out = unet(sample, timesteps, clip_last).sample

    t = {
        "input_ids": ids,
        "clip_last": clip_last,
        "clip_skip2": clip_skip2,
        "sample": sample,
        "timesteps": timesteps,
        "unet_out": unet_out,
        "image": image,
        "vae_mean": dist.mean,
        "vae_logvar": dist.logvar,
        "vae_decoded": decoded,
    }
    save_file({k: v.contiguous() for k, v in t.items()}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
