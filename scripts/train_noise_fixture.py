#!/usr/bin/env python3
"""Writes tests/fixtures/train/noise.json: one training step's noise, timesteps, noisy latents,
target and loss as sd-scripts computes them (train_util.get_noise_noisy_latents_and_timesteps,
custom_train_functions, NetworkTrainer.process_batch; spec sdscripts_model_math.md §4) with
diffusers' DDPMScheduler, for a toy differentiable "UNet" pred = noisy·s + 0.1·t/1000, on the
CPU generator seeded with torch.manual_seed, including d loss / d s.

Usage: scripts/train_noise_fixture.py
"""
import json
import math
import os
import random

import torch
from diffusers import DDPMScheduler

SHAPE = (2, 4, 6, 4)


def scheduler(zero_terminal_snr):
    s = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False)
    ac = s.alphas_cumprod
    s.all_snr = (torch.sqrt(ac) / torch.sqrt(1.0 - ac)) ** 2
    if zero_terminal_snr:
        # sd-scripts' fix_noise_scheduler_betas_for_zero_terminal_snr (all_snr is not refreshed)
        betas = s.betas
        alphas_bar_sqrt = (1 - betas).cumprod(0).sqrt()
        a0 = alphas_bar_sqrt[0].clone()
        aT = alphas_bar_sqrt[-1].clone()
        alphas_bar_sqrt -= aT
        alphas_bar_sqrt *= a0 / (a0 - aT)
        alphas_bar = alphas_bar_sqrt**2
        alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
        betas = 1 - alphas
        s.betas = betas
        s.alphas = 1.0 - betas
        s.alphas_cumprod = torch.cumprod(s.alphas, dim=0)
    return s


def pyramid(noise, iterations, discount, rnd):
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = rnd() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def huber_c(c, t, sched):
    if c.get("loss_type", "l2") not in ("huber", "smooth_l1"):
        return None
    hs, hc, sc = c.get("huber_schedule", "snr"), c.get("huber_c", 0.1), c.get("huber_scale", 1.0)
    if hs == "exponential":
        alpha = -math.log(hc) / 1000
        return torch.exp(-alpha * t) * sc
    if hs == "snr":
        ac = torch.index_select(sched.alphas_cumprod, 0, t)
        sig = ((1.0 - ac) / ac) ** 0.5
        return (1 - hc) / (1 + sig) ** 2 + hc
    return torch.full((t.shape[0],), hc * sc)


def cond_loss(pred, target, lt, hc):
    if lt == "l2":
        return torch.nn.functional.mse_loss(pred, target, reduction="none")
    if lt == "l1":
        return torch.nn.functional.l1_loss(pred, target, reduction="none")
    hc = hc.view(-1, 1, 1, 1)
    if lt == "huber":
        return 2 * hc * (torch.sqrt((pred - target) ** 2 + hc**2) - hc)
    return 2 * (torch.sqrt((pred - target) ** 2 + hc**2) - hc)


def snr_of(sched, t):
    return torch.stack([sched.all_snr[i] for i in t])


def run(c):
    sched = scheduler(c.get("zero_terminal_snr", False))
    g = torch.Generator().manual_seed(99)
    latents = torch.randn(SHAPE, generator=g) * 0.8 + 0.1
    weights = torch.tensor(c.get("loss_weights", [1.0, 1.0]))
    pr = random.Random(c["seed"])
    py_values = [pr.random() for _ in range(8)]
    it = iter(py_values)
    v = c.get("v_parameterization", False)
    torch.manual_seed(c["seed"])
    noise = torch.randn_like(latents)
    if c.get("noise_offset"):
        off = torch.rand(1) * c["noise_offset"] if c.get("noise_offset_random_strength") else c["noise_offset"]
        if c.get("adaptive_noise_scale") is not None:
            m = torch.abs(latents.mean(dim=(2, 3), keepdim=True))
            off = torch.clamp(off + c["adaptive_noise_scale"] * m, 0.0, None)
        noise = noise + off * torch.randn((latents.shape[0], latents.shape[1], 1, 1))
    if c.get("multires_noise_iterations"):
        noise = pyramid(noise, c["multires_noise_iterations"], c.get("multires_noise_discount", 0.3), lambda: next(it))
    min_t = c.get("min_timestep") or 0
    max_t = c.get("max_timestep") if c.get("max_timestep") is not None else 1000
    if min_t < max_t:
        t = torch.randint(min_t, max_t, (latents.shape[0],), device="cpu")
    else:
        t = torch.full((latents.shape[0],), max_t, device="cpu")
    t = t.long()
    if c.get("ip_noise_gamma"):
        st = torch.rand(1) * c["ip_noise_gamma"] if c.get("ip_noise_gamma_random_strength") else c["ip_noise_gamma"]
        noisy = sched.add_noise(latents, noise + st * torch.randn_like(latents), t)
    else:
        noisy = sched.add_noise(latents, noise, t)
    s = torch.nn.Parameter(torch.tensor(0.9))
    pred = noisy * s + (t.float() / 1000).view(-1, 1, 1, 1) * 0.1
    target = sched.get_velocity(latents, noise, t) if v else noise
    loss = cond_loss(pred.float(), target.float(), c.get("loss_type", "l2"), huber_c(c, t, sched))
    loss = loss.mean(dim=[1, 2, 3]) * weights
    if c.get("min_snr_gamma"):
        snr = snr_of(sched, t)
        m = torch.minimum(snr, torch.full_like(snr, c["min_snr_gamma"]))
        loss = loss * (torch.div(m, snr + 1) if v else torch.div(m, snr)).float()
    if c.get("scale_v_pred_loss_like_noise_pred"):
        snr = torch.minimum(snr_of(sched, t), torch.ones(2) * 1000)
        loss = loss * (snr / (snr + 1))
    if c.get("v_pred_like_loss"):
        snr = torch.minimum(snr_of(sched, t), torch.ones(2) * 1000)
        loss = loss + loss / (snr / (snr + 1)) * c["v_pred_like_loss"]
    if c.get("debiased_estimation_loss"):
        snr = torch.minimum(snr_of(sched, t), torch.ones(2) * 1000)
        loss = (1 / (snr + 1) if v else 1 / torch.sqrt(snr)) * loss
    per_sample = loss.detach().clone()
    loss = loss.mean()
    loss.backward()
    fl = lambda x: x.detach().flatten().tolist()
    return {
        "config": c,
        "latents": fl(latents),
        "loss_weights": weights.tolist(),
        "py_random": py_values,
        "timesteps": t.tolist(),
        "noise": fl(noise),
        "noisy_latents": fl(noisy),
        "target": fl(target),
        "per_sample": fl(per_sample),
        "loss": loss.item(),
        "grad_s": s.grad.item(),
    }


def main():
    cases = [
        {"name": "eps_default", "seed": 1},
        {"name": "v_param", "seed": 2, "v_parameterization": True},
        {"name": "prior_loss_weight", "seed": 3, "loss_weights": [1.0, 0.5]},
        {"name": "noise_offset", "seed": 4, "noise_offset": 0.1},
        {"name": "noise_offset_random_adaptive", "seed": 5, "noise_offset": 0.1, "noise_offset_random_strength": True, "adaptive_noise_scale": 0.05},
        {"name": "multires", "seed": 6, "multires_noise_iterations": 6, "multires_noise_discount": 0.3},
        {"name": "multires_offset", "seed": 7, "multires_noise_iterations": 2, "multires_noise_discount": 0.5, "noise_offset": 0.05},
        {"name": "ip_noise_gamma", "seed": 8, "ip_noise_gamma": 0.1},
        {"name": "ip_noise_gamma_random", "seed": 9, "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True},
        {"name": "min_snr_eps", "seed": 10, "min_snr_gamma": 5.0},
        {"name": "min_snr_v", "seed": 11, "min_snr_gamma": 5.0, "v_parameterization": True},
        {"name": "scale_v_pred", "seed": 12, "v_parameterization": True, "scale_v_pred_loss_like_noise_pred": True},
        {"name": "v_pred_like", "seed": 13, "v_pred_like_loss": 0.2},
        {"name": "debiased_eps", "seed": 14, "debiased_estimation_loss": True},
        {"name": "debiased_v", "seed": 15, "debiased_estimation_loss": True, "v_parameterization": True},
        {"name": "timestep_range", "seed": 16, "min_timestep": 100, "max_timestep": 200},
        {"name": "timestep_fixed", "seed": 17, "min_timestep": 500, "max_timestep": 500},
        {"name": "zero_terminal_snr", "seed": 18, "zero_terminal_snr": True, "v_parameterization": True, "min_snr_gamma": 5.0},
        {"name": "huber_snr", "seed": 19, "loss_type": "huber", "huber_schedule": "snr", "huber_c": 0.1},
        {"name": "huber_exponential", "seed": 20, "loss_type": "huber", "huber_schedule": "exponential", "huber_c": 0.2, "huber_scale": 1.5},
        {"name": "smooth_l1_constant", "seed": 21, "loss_type": "smooth_l1", "huber_schedule": "constant", "huber_c": 0.3},
        {"name": "l1", "seed": 22, "loss_type": "l1"},
    ]
    sched = scheduler(False)
    zt = scheduler(True)
    out = {
        "alphas_cumprod": sched.alphas_cumprod.tolist(),
        "all_snr": sched.all_snr.tolist(),
        "alphas_cumprod_zero_terminal": zt.alphas_cumprod.tolist(),
        "cases": [run(c) for c in cases],
    }
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train", "noise.json")
    with open(path, "w") as f:
        json.dump(out, f)
    print(f"wrote {len(cases)} cases to {path}")


if __name__ == "__main__":
    main()
