#!/usr/bin/env python3
"""Writes tests/fixtures/train/amp.json: torch.nn.utils.clip_grad_norm_ results and a
torch.amp.GradScaler run (CPU scaler, growth_interval shortened to 3) with overflowing steps:
scale after each update, whether the optimizer stepped, parameters after each step, with
accelerate's order unscale_ → clip_grad_norm_ → scaler.step → scaler.update.

Usage: scripts/train_amp_fixture.py
"""
import json
import os

import torch

SHAPES = [[4, 3], [5], [2, 2, 1, 1]]


def clip_cases():
    g = torch.Generator().manual_seed(5)
    out = []
    for scale, max_norm in [(1.0, 1.0), (10.0, 1.0), (0.01, 1.0), (3.0, 0.5)]:
        params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
        grads = [torch.randn(s, generator=g) * scale for s in SHAPES]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        out.append({
            "max_norm": max_norm,
            "grads": [gr.flatten().tolist() for gr in grads],
            "total_norm": total.item(),
            "clipped": [p.grad.flatten().tolist() for p in params],
        })
    return out


def scaler_case():
    g = torch.Generator().manual_seed(6)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    init = [p.detach().flatten().tolist() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    steps = []
    for step in range(10):
        grads = [torch.randn(s, generator=g) for s in SHAPES]
        if step in (2, 6, 7):
            grads[1][step % 5] = float("inf") if step != 7 else float("nan")
        loss = sum((p * gr).sum() for p, gr in zip(params, grads))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        total = torch.nn.utils.clip_grad_norm_(params, 1.0)
        before = [p.detach().clone() for p in params]
        scaler.step(opt)
        scaler.update()
        stepped = any(not torch.equal(b, p.detach()) for b, p in zip(before, params))
        steps.append({
            "grads": [[x if x == x and abs(x) != float("inf") else str(x) for x in gr.flatten().tolist()] for gr in grads],
            "total_norm": total.item() if torch.isfinite(total) else None,
            "scale": scaler.get_scale(),
            "stepped": stepped,
            "params": [p.detach().flatten().tolist() for p in params],
        })
    return {"init": init, "steps": steps}


def main():
    out = {"shapes": SHAPES, "clip": clip_cases(), "scaler": scaler_case()}
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train", "amp.json")
    with open(path, "w") as f:
        json.dump(out, f)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
