#!/usr/bin/env python3
"""Oracle: the `.alpha` tensors sd-scripts' train_network.py (networks.lora, 48d368fa) saves for a
command line, computed with torch and argparse themselves.

What it models, from sd-scripts' code path:
  * argparse: --network_alpha is `type=float` with the *int* default 1; --network_dim `type=int`.
  * create_network: conv_alpha from --network_args is `float(...)`, 1.0 when conv_dim is given
    without it.
  * LoRAModule: a tensor alpha becomes `alpha.detach().float().numpy()`; None or 0 becomes the
    rank (a Python int); the buffer is `torch.tensor(alpha)`.
  * --dim_from_weights: every module's alpha is the file's tensor (the rank when missing).
  * --network_weights without it: `load_state_dict` copies the file's values into the buffers
    made from the flags, keeping their dtype.
  * save_weights: every tensor `.to(dtype)` for --save_precision fp16/bf16/float.

stdin: a JSON list of cases {"argv": [...], "file_alpha": [dtype, value] | null, "conv": bool};
stdout: per case {"linear": [dtype, value], "conv": [dtype, value] | null}.
"""
import argparse
import json
import sys

import numpy as np
import torch

DTYPES = {"int64": torch.int64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def parser():
    p = argparse.ArgumentParser()
    p.add_argument("--network_alpha", type=float, default=1)
    p.add_argument("--network_dim", type=int, default=None)
    p.add_argument("--network_args", type=str, default=None, nargs="*")
    p.add_argument("--network_weights", type=str, default=None)
    p.add_argument("--dim_from_weights", action="store_true")
    p.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"])
    return p


def module_alpha(alpha, rank):
    if type(alpha) == torch.Tensor:
        alpha = alpha.detach().float().numpy()
    alpha = rank if alpha is None or alpha == 0 else alpha
    return torch.tensor(alpha)


def case(c):
    a, _ = parser().parse_known_args(c["argv"])
    kw = dict(kv.split("=", 1) for kv in (a.network_args or []))
    rank = a.network_dim if a.network_dim is not None else 4
    alpha = a.network_alpha if a.network_alpha is not None else 1.0
    conv_dim = int(kw["conv_dim"]) if "conv_dim" in kw else None
    conv_alpha = float(kw["conv_alpha"]) if "conv_alpha" in kw else (1.0 if conv_dim else None)
    file_alpha = None
    if c.get("file_alpha"):
        dt, v = c["file_alpha"]
        file_alpha = torch.tensor(v, dtype=DTYPES[dt])
    if a.dim_from_weights:
        lin = module_alpha(file_alpha, rank)
        conv = module_alpha(file_alpha, conv_dim) if c.get("conv") else None
    else:
        lin = module_alpha(alpha, rank)
        conv = module_alpha(conv_alpha, conv_dim) if conv_dim else None
        if a.network_weights and file_alpha is not None:
            lin.copy_(file_alpha)
    out_dtype = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(a.save_precision)

    def saved(t):
        if t is None:
            return None
        if out_dtype is not None:
            t = t.to(out_dtype)
        name = str(t.dtype).replace("torch.", "")
        return [name, float(t.float().item())]

    return {"linear": saved(lin), "conv": saved(conv)}


if __name__ == "__main__":
    print(json.dumps([case(c) for c in json.load(sys.stdin)]))
