#!/usr/bin/env python3
"""Fixtures for tests/ckpt.rs: PyTorch checkpoints written by torch.save, and what torch.load
reads from them (as .safetensors, contiguous copies), plus hostile pickles that must never run.

usage: make_ckpt.py OUT_DIR [--sd-model model.safetensors]
  real.ckpt      {"state_dict": ..., "global_step", "epoch", "callbacks": objects of a class that
                 only exists while writing, "hyper_parameters": paths, bytes, sets, ...}; tensors in
                 every dtype SD files use, views with offsets, transposes, shared storages,
                 parameters, 0-dim and empty tensors
  plain.pt       a bare dict of tensors (like pytorch_model.bin)
  hostile_*.ckpt pickles that would run os.system / builtins.eval / importlib when torch.load-ed
  legacy.ckpt    the pre-1.6 (non-zip) format
  model.ckpt     --sd-model converted: {"state_dict": its tensors, lightning-style extras}
Expected tensors: NAME.expect.safetensors (torch.load of the non-hostile files).
"""
import argparse
import collections
import os
import pathlib
import sys
import types

import torch
from safetensors.torch import load_file, save_file

# a class that exists only here, under a training framework's module name
mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
sys.modules["pytorch_lightning"] = types.ModuleType("pytorch_lightning")
sys.modules["pytorch_lightning.callbacks"] = types.ModuleType("pytorch_lightning.callbacks")
sys.modules[mod.__name__] = mod


class ModelCheckpoint:
    def __init__(self):
        self.dirpath = pathlib.PosixPath("/ckpts")
        self.best_k_models = {"epoch=1.ckpt": torch.tensor(0.5)}
        self.monitor = None


ModelCheckpoint.__module__ = mod.__name__
mod.ModelCheckpoint = ModelCheckpoint


class Hostile:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def expect(out, name, sd):
    save_file({k: v.contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)},
              os.path.join(out, name + ".expect.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--sd-model")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, generator=g)
    w = torch.randn(4, 6, generator=g)
    sd = collections.OrderedDict()
    sd["f32"] = torch.randn(3, 4, generator=g)
    sd["f16"] = torch.randn(5, generator=g).half()
    sd["bf16"] = torch.randn(2, 3, generator=g).bfloat16()
    sd["f64"] = torch.randn(2, generator=g).double()
    sd["i64"] = torch.arange(4)
    sd["i32"] = torch.arange(3, dtype=torch.int32)
    sd["u8"] = torch.arange(5, dtype=torch.uint8)
    sd["bool"] = torch.tensor([True, False, True])
    sd["base"] = base
    sd["slice_with_offset"] = base[2:5]
    sd["strided"] = base[1::3]
    sd["transposed"] = w.t()
    sd["w"] = w
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0, 3)
    sd["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    sd["position_ids"] = torch.arange(77).unsqueeze(0)
    ck = {
        "state_dict": sd,
        "global_step": 1234,
        "epoch": 3,
        "pytorch-lightning_version": "1.9.0",
        "callbacks": {ModelCheckpoint: ModelCheckpoint()},
        "hyper_parameters": {"lr": 1e-4, "path": pathlib.PosixPath("/x"), "blob": b"\x00\xffabc",
                             "tags": {"a", "b"}, "big": 2**80, "neg": -7, "nested": [[[]]]},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4}]}],
    }
    torch.save(ck, os.path.join(a.out, "real.ckpt"))
    back = torch.load(os.path.join(a.out, "real.ckpt"), weights_only=False)
    expect(a.out, "real", back["state_dict"])

    plain = {"x": torch.randn(3, generator=g), "y": torch.arange(6).view(2, 3).t()}
    torch.save(plain, os.path.join(a.out, "plain.pt"))
    expect(a.out, "plain", torch.load(os.path.join(a.out, "plain.pt")))

    # a LoRA as sd-scripts' save_weights writes it for --save_model_as pt/ckpt: torch.save(state_dict)
    lora = collections.OrderedDict()
    for m, (i, o) in {"lora_unet_down_blocks_0_attentions_0_proj_in": (32, 32),
                      "lora_te_text_model_encoder_layers_0_mlp_fc1": (32, 64)}.items():
        lora[m + ".alpha"] = torch.tensor(1)
        lora[m + ".lora_down.weight"] = torch.randn(4, i, generator=g)
        lora[m + ".lora_up.weight"] = torch.randn(o, 4, generator=g).half()
    torch.save(lora, os.path.join(a.out, "lora.pt"))
    expect(a.out, "lora", torch.load(os.path.join(a.out, "lora.pt")))

    marker = os.path.join(a.out, "PWNED")
    for name, fn, arg in [("system", os.system, f"touch {marker}"),
                          ("eval", eval, f"open({marker!r}, 'w')"),
                          ("import", __import__("importlib").import_module, "antigravity")]:
        torch.save({"state_dict": {"w": torch.ones(2)}, "evil": Hostile(fn, arg)},
                   os.path.join(a.out, f"hostile_{name}.ckpt"))

    torch.save({"w": torch.ones(2)}, os.path.join(a.out, "legacy.ckpt"),
               _use_new_zipfile_serialization=False)

    if a.sd_model:
        from safetensors import safe_open
        sdm = load_file(a.sd_model)
        with safe_open(a.sd_model, "pt") as f:
            heads = {k: v for k, v in (f.metadata() or {}).items() if k.startswith("sdlora.")}
        # the tiny model's head counts ride along as top-level strings (a .ckpt's metadata)
        torch.save({"state_dict": sdm, "global_step": 5, "epoch": 1,
                    "callbacks": {ModelCheckpoint: ModelCheckpoint()}, **heads},
                   os.path.join(a.out, "model.ckpt"))


if __name__ == "__main__":
    main()
