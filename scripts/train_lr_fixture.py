#!/usr/bin/env python3
"""Writes tests/fixtures/train/lr.json: learning rates of transformers' schedulers (as
sd-scripts' get_scheduler_fix passes their arguments) at 20+ points per schedule, for two
parameter groups, via torch's LambdaLR stepping.

Usage: scripts/train_lr_fixture.py
"""
import json
import os

import torch
from transformers.optimization import SchedulerType, TYPE_TO_SCHEDULER_FUNCTION


def int_or_float(value):
    # sd-scripts' --lr_warmup_steps type
    if value.endswith("%"):
        return float(value[:-1]) / 100.0
    f = float(value)
    return int(value) if f >= 1 else f


def run(name, warmup_arg, max_train_steps, num_cycles, power, learning_rate, group_lrs):
    p = [torch.nn.Parameter(torch.zeros(1)) for _ in group_lrs]
    opt = torch.optim.AdamW([{"params": [q], "lr": lr} for q, lr in zip(p, group_lrs)], lr=learning_rate)
    total = max_train_steps
    w = int_or_float(warmup_arg)
    warmup = int(w * total) if isinstance(w, float) else w
    st = SchedulerType(name)
    fn = TYPE_TO_SCHEDULER_FUNCTION[st]
    if st == SchedulerType.CONSTANT:
        sched = fn(opt)
    elif st == SchedulerType.CONSTANT_WITH_WARMUP:
        sched = fn(opt, num_warmup_steps=warmup)
    elif st == SchedulerType.COSINE_WITH_RESTARTS:
        sched = fn(opt, num_warmup_steps=warmup, num_training_steps=total, num_cycles=num_cycles)
    elif st == SchedulerType.POLYNOMIAL:
        sched = fn(opt, num_warmup_steps=warmup, num_training_steps=total, power=power)
    else:
        sched = fn(opt, num_warmup_steps=warmup, num_training_steps=total)
    # 20+ points spread over [0, total + 2] (beyond the end too), always including 0, W, T
    points = sorted(set([0, 1, warmup, max(warmup - 1, 0), total, total + 2] + [round(i * (total + 2) / 19) for i in range(20)]))
    lrs = {}
    step = 0
    for target in points:
        while step < target:
            opt.step()
            sched.step()
            step += 1
        lrs[str(target)] = [g["lr"] for g in opt.param_groups]
    return {
        "name": name,
        "warmup_arg": warmup_arg,
        "max_train_steps": max_train_steps,
        "num_cycles": num_cycles,
        "power": power,
        "learning_rate": learning_rate,
        "group_lrs": group_lrs,
        "lrs": lrs,
    }


def main():
    cases = []
    for name in ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]:
        for warmup in (["0"] if name == "constant" else ["0", "10", "0.25", "5%"]):
            for total in [97, 600]:
                cases.append(run(name, warmup, total, 3 if name == "cosine_with_restarts" else 1, 2.0 if warmup == "10" else 1.0, 1e-4, [5e-5, 1e-4]))
    out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train", "lr.json")
    with open(out, "w") as f:
        json.dump(cases, f)
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
