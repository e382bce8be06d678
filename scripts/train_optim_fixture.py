#!/usr/bin/env python3
"""Writes tests/fixtures/train/optim.json: parameter trajectories of torch.optim.AdamW,
torch.optim.SGD(nesterov), lion_pytorch.Lion and transformers' Adafactor over a few steps with
given gradients, two parameter groups with different lrs and an lr change mid-run.

Usage: scripts/train_optim_fixture.py  (needs torch, transformers; lion-pytorch, e.g.
`pip install --target /tmp/lionpkg --no-deps lion-pytorch==0.2.5` then PYTHONPATH=/tmp/lionpkg)
"""
import json
import os
import sys

import torch

sys.path.append("/tmp/lionpkg")
from lion_pytorch import Lion  # noqa: E402
from transformers.optimization import Adafactor  # noqa: E402

STEPS = 6
SHAPES = [[[4, 3], [5]], [[3, 2, 1, 1], [2, 6]]]  # group 0, group 1


def make_case(name, ctor, lrs, kwargs, set_lr_at=3, set_lr=None):
    g = torch.Generator().manual_seed(1234)
    groups = []
    for shapes, lr in zip(SHAPES, lrs):
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        d = {"params": params}
        if lr is not None:
            d["lr"] = lr
        groups.append(d)
    init = [[p.detach().clone().flatten().tolist() for p in gr["params"]] for gr in groups]
    opt = ctor([dict(x) for x in groups], **kwargs)
    grads, after = [], []
    for step in range(STEPS):
        if set_lr is not None and step == set_lr_at:
            for gr, lr in zip(opt.param_groups, set_lr):
                gr["lr"] = lr
        step_grads = []
        for gr in groups:
            gg = []
            for p in gr["params"]:
                gt = torch.randn(p.shape, generator=g) * (0.1 + step)
                p.grad = gt.clone()
                gg.append(gt.flatten().tolist())
            step_grads.append(gg)
        opt.step()
        opt.zero_grad(set_to_none=True)
        grads.append(step_grads)
        after.append([[p.detach().clone().flatten().tolist() for p in gr["params"]] for gr in groups])
    return {
        "name": name,
        "lrs": lrs,
        "set_lr_at": set_lr_at,
        "set_lr": set_lr,
        "shapes": SHAPES,
        "init": init,
        "grads": grads,
        "after": after,
    }


def main():
    cases = [
        # sd-scripts passes nothing but lr: torch's AdamW default weight_decay is 0.01
        ("adamw_default", torch.optim.AdamW, [1e-3, 3e-3], {"lr": 1e-3}, [], [5e-4, 2e-3]),
        ("adamw_args", torch.optim.AdamW, [1e-2, 3e-3], {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6}, ["weight_decay=0.1", "betas=0.8,0.99", "eps=1e-6"], None),
        ("adamw_amsgrad", torch.optim.AdamW, [1e-2, 3e-3], {"lr": 1e-2, "amsgrad": True}, ["amsgrad=True"], None),
        ("sgdnesterov", torch.optim.SGD, [1e-2, 5e-2], {"lr": 1e-2, "nesterov": True, "momentum": 0.9}, [], [2e-2, 1e-2]),
        ("sgdnesterov_wd", torch.optim.SGD, [1e-2, 5e-2], {"lr": 1e-2, "nesterov": True, "momentum": 0.8, "weight_decay": 0.01}, ["momentum=0.8", "weight_decay=0.01"], None),
        ("lion", Lion, [1e-4, 3e-4], {"lr": 1e-4}, [], [5e-5, 1e-4]),
        ("lion_wd", Lion, [1e-4, 3e-4], {"lr": 1e-4, "weight_decay": 0.5, "betas": (0.95, 0.98)}, ["weight_decay=0.5", "betas=(0.95,0.98)"], None),
        ("lion_decoupled", Lion, [1e-4, 3e-4], {"lr": 1e-4, "weight_decay": 1e-5, "decoupled_weight_decay": True}, ["weight_decay=1e-5", "decoupled_weight_decay=True"], None),
        # relative_step=True: lr=None, group lrs ignored (sd-scripts pops nothing but passes lr=None)
        ("adafactor_relative", Adafactor, [None, None], {"lr": None, "relative_step": True}, [], None),
        ("adafactor_warmup_init", Adafactor, [None, None], {"lr": None, "relative_step": True, "warmup_init": True, "scale_parameter": False}, ["warmup_init=True", "scale_parameter=False"], None),
        ("adafactor_fixed", Adafactor, [1e-3, 2e-3], {"lr": 1e-3, "relative_step": False, "scale_parameter": False, "beta1": 0.9, "weight_decay": 0.01}, ["relative_step=False", "scale_parameter=False", "beta1=0.9", "weight_decay=0.01"], [2e-3, 1e-3]),
        ("adafactor_fixed_scaled", Adafactor, [1e-3, 2e-3], {"lr": 1e-3, "relative_step": False, "clip_threshold": 0.5, "decay_rate": -0.5}, ["relative_step=False", "clip_threshold=0.5", "decay_rate=-0.5"], None),
    ]
    out = []
    for name, ctor, lrs, kwargs, cli_args, set_lr in cases:
        case = make_case(name, ctor, lrs, kwargs, set_lr=set_lr)
        case["optimizer_type"] = name.split("_")[0]
        case["optimizer_args"] = cli_args
        case["learning_rate"] = kwargs["lr"] if kwargs["lr"] is not None else 1e-3
        out.append(case)
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train", "optim.json")
    with open(path, "w") as f:
        json.dump({"torch": torch.__version__, "cases": out}, f)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
