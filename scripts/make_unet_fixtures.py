#!/usr/bin/env python
"""Reference fixtures for the Rust UNet (tests/unet.rs), computed by diffusers 0.32.1 on CPU fp32.

Usage: make_unet_fixtures.py OUT_DIR [MODEL ...]
  MODEL: tiny, tiny_sd2 (default: both), sd15, sd21 (full size, several GB of RAM and disk);
         MODEL:shapes writes only MODEL.config.json and MODEL.shapes.json ({name: shape}, built
         on the meta device: no memory), for structural tests of full-size models.

For every model MODEL it writes
  MODEL.config.json          Diffusers unet/config.json
  MODEL.weights.safetensors  seeded random weights under Diffusers names
and for every input case CASE of that model
  CASE.io.safetensors        input.sample, input.timesteps, input.encoder_hidden_states,
                             output.sample, loss.weight (loss = sum(output * loss.weight)),
                             grad.<param> for every Linear / 1x1-conv weight inside the
                             Transformer2DModels (the LoRA targets), grad.input.sample,
                             grad.input.encoder_hidden_states
"""
import json
import os
import sys

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

# Configs mirror sdlora's UNetConfig::tiny(), an SD2-style tiny variant, sd1() and sd2().
MODELS = {
    "tiny": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=[2, 4, 4],
        cross_attention_dim=32,
    ),
    "tiny_sd2": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=[2, 4, 4],
        cross_attention_dim=48,
        use_linear_projection=True,
        upcast_attention=True,
    ),
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=SD_DOWN,
        up_block_types=SD_UP,
        attention_head_dim=8,
        cross_attention_dim=768,
    ),
    "sd21": dict(
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=SD_DOWN,
        up_block_types=SD_UP,
        attention_head_dim=[5, 10, 20, 20],
        cross_attention_dim=1024,
        use_linear_projection=True,
        upcast_attention=True,
    ),
}

# (case name, model, batch, latent h, latent w, context length, timesteps)
CASES = [
    ("tiny", "tiny", 2, 32, 32, 77, [999, 17]),
    ("tiny_odd", "tiny", 1, 9, 7, 77, [500]),
    ("tiny_sd2", "tiny_sd2", 2, 16, 16, 77, [3, 640]),
    ("sd15", "sd15", 1, 8, 8, 77, [421]),
    ("sd21", "sd21", 1, 8, 8, 77, [421]),
]

LORA_TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def is_lora_target(name):
    if ".attentions." not in name or not name.endswith(".weight"):
        return False
    module = name[: -len(".weight")]
    return any(module.endswith("." + t) for t in LORA_TARGETS)


def build(model, seed):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, layers_per_block=2, norm_num_groups=32, **MODELS[model])
    with torch.no_grad():
        # Default init leaves norms at 1/0; perturb every 1-D parameter so the affine terms and
        # biases are exercised too.
        for p in unet.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return unet.eval()


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    models = sys.argv[2:] or ["tiny", "tiny_sd2"]
    for m in models:
        if m.split(":")[0] not in MODELS:
            sys.exit(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    os.makedirs(out, exist_ok=True)
    torch.set_grad_enabled(True)
    for seed, model in enumerate(models):
        if model.endswith(":shapes"):
            model = model.split(":")[0]
            with torch.device("meta"):
                unet = UNet2DConditionModel(sample_size=64, layers_per_block=2, norm_num_groups=32, **MODELS[model])
            with open(os.path.join(out, f"{model}.config.json"), "w") as f:
                f.write(unet.to_json_string())
            with open(os.path.join(out, f"{model}.shapes.json"), "w") as f:
                json.dump({k: list(v.shape) for k, v in unet.state_dict().items()}, f)
            continue
        unet = build(model, 1000 + seed)
        with open(os.path.join(out, f"{model}.config.json"), "w") as f:
            f.write(unet.to_json_string())
        weights = {k: v.contiguous() for k, v in unet.state_dict().items()}
        save_file(weights, os.path.join(out, f"{model}.weights.safetensors"))
        del weights
        # Only the LoRA targets need grads (full-size models would double their memory otherwise).
        for name, p in unet.named_parameters():
            p.requires_grad_(is_lora_target(name))
        ctx_dim = MODELS[model]["cross_attention_dim"]
        for case_idx, (case, cm, b, h, w, n_ctx, ts) in enumerate(CASES):
            if cm != model:
                continue
            g = torch.Generator().manual_seed(2000 + case_idx)
            sample = torch.randn(b, 4, h, w, generator=g).requires_grad_(True)
            ehs = torch.randn(b, n_ctx, ctx_dim, generator=g).requires_grad_(True)
            t = torch.tensor(ts, dtype=torch.int64)
            unet.zero_grad(set_to_none=True)
            pred = unet(sample, t, ehs).sample
            loss_w = torch.randn(pred.shape, generator=g)
            (pred * loss_w).sum().backward()
            tensors = {
                "input.sample": sample.detach(),
                "input.timesteps": t,
                "input.encoder_hidden_states": ehs.detach(),
                "output.sample": pred.detach(),
                "loss.weight": loss_w,
                "grad.input.sample": sample.grad,
                "grad.input.encoder_hidden_states": ehs.grad,
            }
            for name, p in unet.named_parameters():
                if is_lora_target(name):
                    tensors["grad." + name] = p.grad
            save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, f"{case}.io.safetensors"))
            print(f"{case}: output {tuple(pred.shape)}, {len(tensors) - 7} weight grads")
        del unet


if __name__ == "__main__":
    main()
