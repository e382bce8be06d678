#!/usr/bin/env python3
"""PyTorch reference for one sdlora training step with a LoRA (issue: sdlora train, "step math
against a PyTorch reference step"): a tiny SD UNet and CLIP text encoder with seeded random
weights (diffusers / transformers), sd-scripts' LoRAModule forward (org(x) + up(down(x)) * scale,
spec sdscripts_model_math.md §3.3) patched onto every module of a LoRA file sdlora wrote, and
sd-scripts' process_batch (spec §4): text conditioning, noise from torch.randn_like after
torch.manual_seed(seed), --noise_offset, timesteps by torch.randint, DDPMScheduler.add_noise,
epsilon or v-prediction target, per-sample MSE × loss weights, --min_snr_gamma, mean; then
loss.backward() for the gradient of every lora_down / lora_up.

    train_step_reference.py OUTDIR LORA.safetensors

Writes OUTDIR/unet.safetensors, te.safetensors, unet_config.json (the weights), inputs.safetensors
(latents, input_ids (B, 1, 77), loss_weights), cases.json ([{name, seed, config, loss,
timesteps}]) and grads.safetensors ("<case>/<lora key>" → gradient).
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_module_list as oracle  # noqa: E402

CASES = [
    dict(name="eps", seed=11),
    dict(name="v_pred", seed=12, v_parameterization=True),
    dict(name="eps_min_snr_offset_prior", seed=13, min_snr_gamma=5.0, noise_offset=0.1, loss_weights=[1.0, 0.5]),
    dict(name="v_pred_min_snr_offset", seed=14, v_parameterization=True, min_snr_gamma=5.0, noise_offset=0.1),
    dict(name="eps_timestep_range", seed=15, min_timestep=100, max_timestep=900),
]


def patch_lora(te, unet, lora):
    """sd-scripts' LoRAModule.forward on each target: org_forward(x) + lora_up(lora_down(x)) * scale."""
    params = {}
    for root, prefix, targets in ((te, "lora_te", oracle.TE_TARGETS), (unet, "lora_unet", oracle.UNET_TARGETS)):
        for name, child, _ in oracle.lora_targets(root, prefix, targets, None):
            down = torch.nn.Parameter(lora[f"{name}.lora_down.weight"].float().clone())
            up = torch.nn.Parameter(lora[f"{name}.lora_up.weight"].float().clone())
            scale = float(lora[f"{name}.alpha"]) / down.shape[0]
            params[f"{name}.lora_down.weight"] = down
            params[f"{name}.lora_up.weight"] = up
            org = child.forward
            if down.dim() == 4:
                conv = child

                def fwd(x, org=org, down=down, up=up, scale=scale, conv=conv):
                    h = F.conv2d(x, down, None, conv.stride, conv.padding)
                    return org(x) + F.conv2d(h, up) * scale
            else:

                def fwd(x, org=org, down=down, up=up, scale=scale):
                    return org(x) + F.linear(F.linear(x, down), up) * scale

            child.forward = fwd
    return params


def main():
    out, lora_path = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    te, unet = oracle.build("tiny", "cpu")
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, out / "unet.safetensors")
    save_file({k: v.contiguous() for k, v in te.state_dict().items()}, out / "te.safetensors")
    (out / "unet_config.json").write_text(json.dumps(dict(unet.config)))
    te.train()
    unet.train()
    for p in list(te.parameters()) + list(unet.parameters()):
        p.requires_grad_(False)
    params = patch_lora(te, unet, load_file(lora_path))

    g = torch.Generator().manual_seed(3)
    inputs = {
        # already × 0.18215 (what the loop hands to process_batch)
        "latents": torch.randn(2, 4, 8, 8, generator=g) * 0.8 + 0.05,
        "input_ids": torch.randint(0, 49408, (2, 1, 77), generator=g),
    }
    save_file(inputs, out / "inputs.safetensors")
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, clip_sample=False)
    ac = sched.alphas_cumprod
    all_snr = (torch.sqrt(ac) / torch.sqrt(1.0 - ac)) ** 2

    cases, grads = [], {}
    latents = inputs["latents"]
    for c in CASES:
        for p in params.values():
            p.grad = None
        weights = torch.tensor(c.get("loss_weights", [1.0, 1.0]))
        # get_hidden_states for max_token_length None: (B, 1, 77) → (B, 77) → last_hidden_state
        ids = inputs["input_ids"].reshape(-1, 77)
        ctx = te(ids)[0]
        torch.manual_seed(c["seed"])
        noise = torch.randn_like(latents)
        if c.get("noise_offset"):
            noise = noise + c["noise_offset"] * torch.randn((latents.shape[0], latents.shape[1], 1, 1))
        t = torch.randint(c.get("min_timestep", 0), c.get("max_timestep", 1000), (latents.shape[0],)).long()
        noisy = sched.add_noise(latents, noise, t)
        noisy.requires_grad_(True)
        pred = unet(noisy, t, ctx).sample
        v = c.get("v_parameterization", False)
        target = sched.get_velocity(latents, noise, t) if v else noise
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean([1, 2, 3]) * weights
        if c.get("min_snr_gamma"):
            snr = torch.stack([all_snr[i] for i in t])
            m = torch.minimum(snr, torch.full_like(snr, c["min_snr_gamma"]))
            loss = loss * (m / (snr + 1) if v else m / snr).float()
        loss = loss.mean()
        loss.backward()
        for k, p in params.items():
            grads[f"{c['name']}/{k}"] = p.grad.detach().clone().contiguous()
        cases.append(dict(c, loss=loss.item(), timesteps=t.tolist()))
        print(f"{c['name']}: loss {loss.item():.6f} timesteps {t.tolist()}")
    save_file(grads, out / "grads.safetensors")
    (out / "cases.json").write_text(json.dumps(cases, indent=1))


if __name__ == "__main__":
    main()
