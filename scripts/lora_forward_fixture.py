#!/usr/bin/env python3
"""Oracle for sdlora's LoRA forward: a tiny SD UNet and CLIP text encoder with seeded random
weights (diffusers / transformers), run before and after diffusers' `load_lora_weights` of a LoRA
file sdlora wrote.

    lora_forward_fixture.py OUTDIR LORA.safetensors

Writes OUTDIR/unet.safetensors, te.safetensors (weights, diffusers/transformers names),
unet_config.json, and io.safetensors: inputs (sample, timesteps, context, input_ids) and outputs
(unet_base, unet_lora, te_base, te_lora).
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_module_list as oracle  # noqa: E402


def main():
    out, lora = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    te, unet = oracle.build("tiny", "cpu")
    te.eval()
    unet.eval()
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, out / "unet.safetensors")
    save_file({k: v.contiguous() for k, v in te.state_dict().items()}, out / "te.safetensors")
    (out / "unet_config.json").write_text(json.dumps(dict(unet.config)))
    g = torch.Generator().manual_seed(1)
    io = {
        "sample": torch.randn(2, 4, 16, 16, generator=g),
        "timesteps": torch.tensor([10, 500]),
        "context": torch.randn(2, 77, 32, generator=g),
        "input_ids": torch.randint(0, 49408, (2, 77), generator=g),
    }

    def run():
        with torch.no_grad():
            u = unet(io["sample"], io["timesteps"], io["context"]).sample
            t = te(io["input_ids"]).last_hidden_state
        return u, t

    io["unet_base"], io["te_base"] = run()
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet, scheduler=DDPMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(lora, adapter_name="sdlora")
    io["unet_lora"], io["te_lora"] = run()
    save_file({k: v.contiguous() for k, v in io.items()}, out / "io.safetensors")


if __name__ == "__main__":
    main()
