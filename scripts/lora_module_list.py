#!/usr/bin/env python3
"""Oracle for sdlora's LoRA network layout: applies sd-scripts' `networks.lora` naming and
targeting rules (spec: sdscripts_model_math.md §3.1-3.2) to the diffusers UNet and transformers
CLIPTextModel module trees, in sd-scripts' module order, and writes the expected module list.

    lora_module_list.py OUT.json [--init OUT.safetensors --seed N] [--shapes DIR]

OUT.json: {"<case>": [{"name", "kind", "down", "up", "alpha", "alpha_dtype", "scale"}, ...]}
for the cases sd1, sd1_conv, sd2, sd2_conv, tiny, tiny_conv ("_conv": network_args conv_dim=8,
conv_alpha=2; defaults: network_dim 4, --network_alpha omitted → int 1).

--init: for the tiny_conv case, seeds the torch CPU generator and creates every module the way
sd-scripts' LoRAModule does (nn.Linear/nn.Conv2d constructors for down and up, then
kaiming_uniform_(down, a=sqrt(5)), zeros on up), text encoder first, and saves all lora_down
weights, so sdlora's initialisation can be compared bit for bit.

Models are built on the meta device (names and shapes only), except the tiny ones.
"""
import argparse
import json
import math

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

# sd-scripts' own UNet (library/original_unet.py) registers some children in a different order
# than diffusers; named_modules() order decides LoRA creation order (and RNG use). Children listed
# here come first, in this order; others keep diffusers' order after them.
SD_SCRIPTS_CHILD_ORDER = {
    # mid_block is assigned after up_blocks exist (spec §2.1 registration quirk)
    "UNet2DConditionModel": ["conv_in", "time_proj", "time_embedding", "down_blocks", "up_blocks", "mid_block"],
    # attn1, ff, attn2, then the norms
    "BasicTransformerBlock": ["attn1", "ff", "attn2", "norm1", "norm2", "norm3"],
    "CrossAttnDownBlock2D": ["attentions", "resnets", "downsamplers"],
    "CrossAttnUpBlock2D": ["attentions", "resnets", "upsamplers"],
    "UNetMidBlock2DCrossAttn": ["attentions", "resnets"],
    "Transformer2DModel": ["norm", "proj_in", "transformer_blocks", "proj_out"],
    "ResnetBlock2D": ["norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut"],
}

UNET_TARGETS = ["Transformer2DModel"]
UNET_TARGETS_CONV3X3 = ["ResnetBlock2D", "Downsample2D", "Upsample2D"]
TE_TARGETS = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]


def sd_named_modules(module, prefix=""):
    yield prefix, module
    children = list(module.named_children())
    order = SD_SCRIPTS_CHILD_ORDER.get(type(module).__name__)
    if order:
        rank = {n: i for i, n in enumerate(order)}
        children.sort(key=lambda nc: rank.get(nc[0], len(order)))
    for name, child in children:
        yield from sd_named_modules(child, f"{prefix}.{name}" if prefix else name)


def unet_config(case):
    base = dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=8,
        cross_attention_dim=768,
        norm_num_groups=32,
    )
    if case == "sd2":
        base.update(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
    if case == "tiny":
        # mirrors src/models/config.rs UNetConfig::tiny()
        base.update(
            block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4, 4),
            cross_attention_dim=32,
        )
    return base


def clip_config(case):
    if case == "sd1":
        return CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              hidden_act="quick_gelu", max_position_embeddings=77)
    if case == "sd2":
        # sd-scripts builds SD2's text encoder with 23 of OpenCLIP ViT-H's 24 layers
        return CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                              hidden_act="gelu", max_position_embeddings=77)
    return CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
                          hidden_act="quick_gelu", max_position_embeddings=77)


def build(case, device):
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(case))
        te = CLIPTextModel(clip_config(case))
    return te, unet


def lora_targets(root, prefix, targets, conv_dim):
    """Yields (name, module, dim_kind) in sd-scripts' create_modules order."""
    for name, module in sd_named_modules(root):
        if type(module).__name__ not in targets:
            continue
        for child_name, child in sd_named_modules(module):
            cls = type(child).__name__
            is_linear = cls == "Linear"
            is_conv = cls == "Conv2d"
            if not (is_linear or is_conv):
                continue
            lora_name = f"{prefix}.{name}.{child_name}".replace(".", "_")
            if is_linear or tuple(child.kernel_size) == (1, 1):
                yield lora_name, child, "linear"
            elif conv_dim is not None:
                yield lora_name, child, "conv"


def module_list(te, unet, conv_dim, conv_alpha, network_dim=4, network_alpha=1):
    unet_targets = UNET_TARGETS + (UNET_TARGETS_CONV3X3 if conv_dim is not None else [])
    out = []
    for root, prefix, targets in ((te, "lora_te", TE_TARGETS), (unet, "lora_unet", unet_targets)):
        for name, child, dk in lora_targets(root, prefix, targets, conv_dim):
            dim, alpha = (network_dim, network_alpha) if dk == "linear" else (conv_dim, conv_alpha)
            if type(child).__name__ == "Conv2d":
                kh, kw = child.kernel_size
                down = [dim, child.in_channels, kh, kw]
                up = [child.out_channels, dim, 1, 1]
                kind = f"conv{kh}x{kw}"
            else:
                down = [dim, child.in_features]
                up = [child.out_features, dim]
                kind = "linear"
            out.append(dict(name=name, kind=kind, down=down, up=up, alpha=float(alpha),
                            alpha_dtype="I64" if isinstance(alpha, int) else "F32", scale=alpha / dim))
    return out


def sd_scripts_init(te, unet, conv_dim, conv_alpha, seed):
    """lora_down of every module, drawn as sd-scripts' LoRAModule.__init__ draws them."""
    torch.manual_seed(seed)
    downs = {}
    unet_targets = UNET_TARGETS + UNET_TARGETS_CONV3X3
    for root, prefix, targets in ((te, "lora_te", TE_TARGETS), (unet, "lora_unet", unet_targets)):
        for name, child, dk in lora_targets(root, prefix, targets, conv_dim):
            dim = 4 if dk == "linear" else conv_dim
            if type(child).__name__ == "Conv2d":
                lora_down = torch.nn.Conv2d(child.in_channels, dim, child.kernel_size, child.stride, child.padding, bias=False)
                lora_up = torch.nn.Conv2d(dim, child.out_channels, (1, 1), (1, 1), bias=False)
            else:
                lora_down = torch.nn.Linear(child.in_features, dim, bias=False)
                lora_up = torch.nn.Linear(dim, child.out_features, bias=False)
            torch.nn.init.kaiming_uniform_(lora_down.weight, a=math.sqrt(5))
            torch.nn.init.zeros_(lora_up.weight)
            downs[f"{name}.lora_down.weight"] = lora_down.weight.detach().clone()
    return downs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--init")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cases", default="sd1,sd2,tiny")
    ap.add_argument("--shapes", help="also write {case}.unet.json / {case}.te.json: state_dict key -> shape")
    a = ap.parse_args()
    result = {}
    for case in a.cases.split(","):
        te, unet = build(case, "cpu" if case == "tiny" else "meta")
        result[case] = module_list(te, unet, None, None)
        if a.shapes:
            for part, model in (("unet", unet), ("te", te)):
                shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
                with open(f"{a.shapes}/{case}.{part}.json", "w") as f:
                    json.dump(shapes, f)
            with open(f"{a.shapes}/{case}.unet_config.json", "w") as f:
                json.dump(dict(unet.config), f)
        result[case + "_conv"] = module_list(te, unet, 8, 2.0)
        if case == "tiny" and a.init:
            from safetensors.torch import save_file
            save_file(sd_scripts_init(te, unet, 8, 2.0, a.seed), a.init)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=0)


if __name__ == "__main__":
    main()
