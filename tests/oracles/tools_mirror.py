#!/usr/bin/env python3
"""Test oracle for sdlora's LoRA tools: an independent torch re-statement of what sd-scripts'
(48d368fa) networks/resize_lora.py, svd_merge_lora.py, merge_lora.py and
extract_lora_from_models.py (SD1/SD2) write, working directly on state dicts so that it runs on
any model size (sd-scripts itself only loads full-size SD1/SD2 checkpoints and is not in CI).

    tools_mirror.py resize_lora --model IN --save_to OUT --new_rank R [--new_conv_rank R]
        [--save_precision float|fp16|bf16] [--dynamic_method sv_ratio|sv_fro|sv_cumulative
        --dynamic_param X] [--verbose]
    tools_mirror.py svd_merge_lora --models A B.. --ratios a b.. --save_to OUT --new_rank R
        [--new_conv_rank R] [--precision P] [--save_precision P] [--no_metadata] [--lbws J..]
    tools_mirror.py merge_lora --models A B.. --ratios a b.. --save_to OUT [--concat] [--shuffle]
        [--precision P] [--save_precision P] [--no_metadata]
    tools_mirror.py merge_lora --sd_model CKPT --models A.. --ratios a.. --save_to OUT [--v2]
        [--precision P] [--save_precision P] [--no_metadata]
    tools_mirror.py extract_lora_from_models --model_org A --model_tuned B --save_to OUT
        [--dim R] [--conv_dim R] [--clamp_quantile Q] [--min_diff D] [--v2] [--v_parameterization]
        [--load_precision P] [--save_precision P] [--no_metadata]

The flags are sd-scripts' own (same defaults); --device is accepted and ignored. Inputs may be
.safetensors or .ckpt/.pt; outputs are written in the format of --save_to's extension, as
sd-scripts does. `modelspec.implementation_version` is written as "tools_mirror" (sd-scripts
writes "sd-scripts/<git hash>", sdlora "sdlora/<version>"); `modelspec.date` is the local time.

Checkpoint-level tools (merge into a checkpoint, extract) map kohya module names to LDM
single-file keys themselves instead of building diffusers/transformers models:
  lora_unet_<diffusers module path, . -> _>  <->  model.diffusion_model.<LDM path>
  lora_te_text_model_encoder_layers_N_...    <->  SD1 cond_stage_model.transformer.text_model.*,
      SD2 cond_stage_model.model.transformer.resblocks.N.* (q/k/v = row thirds of in_proj_weight)
SD2 text towers: sd-scripts keeps 23 of OpenCLIP's 24 blocks (it skips `.resblocks.23.`); this
mirror generalises that to "all but the last block", so tiny-v2 files work the same way.

Validated against the real sd-scripts scripts (same torch 2.11 CPU build, same machine), with
tests/oracles/compare_tools.py; inputs from tests/oracles/make_tool_fixtures.py (tiny module
names unless noted). "bit-identical": every tensor equal (max relative difference 0.0), same
dtypes, and all metadata equal including sshs_* hashes, except modelspec.date and
modelspec.implementation_version:
  resize_lora: a (--new_rank 2 --new_conv_rank 4 --verbose), b (--new_rank 16 above the input
    rank, fp16 save), c (fp16 in, int64 alphas; sv_ratio 4, bf16 save, --verbose), d (bf16 in,
    missing alphas; sv_fro 0.9 --new_conv_rank 3 --verbose; sv_cumulative 0.5), a.ckpt -> .ckpt:
    all bit-identical, --verbose stdout byte-identical.
  svd_merge_lora: a+b+d ratios 0.7 -0.4 1.1 --new_rank 6 --new_conv_rank 3 bf16 save; c+a with
    12-entry --lbws; b with a 26-entry --lbws; a.ckpt+c --no_metadata fp16 save: bit-identical.
    The lbw block index was also checked against sd-scripts' get_lbw_block_index for every
    sd1/sd2 module name and some SDXL names.
  merge_lora (LoRA+LoRA): a+c ratios 0.7 -0.5; a+e --concat --precision fp16 --save_precision
    bf16; a.ckpt+e -> .ckpt; d --precision fp16: bit-identical. c+a --shuffle: same deltas
    (compare --svd: 3e-17; the permutation is unseeded in both).
  merge_lora into a checkpoint: SD1.5-shaped fp16 single file (make_sd_checkpoint.py --config
    sd15 --seed 1 --fp16 --no-diffusers) + sd1 fixtures a+c (70 modules: linear, 1x1 and 3x3
    conv, TE), ratios 0.8 -0.6, --save_precision fp16 -> .safetensors: 1135 tensors
    bit-identical, same metadata. SD2.1-shaped fp16 .ckpt (--config sd21 --seed 3 --ckpt) + sd2
    fixtures a+c (q/k/v rows of in_proj_weight included), --v2 --save_precision bf16 -> .ckpt:
    1232 tensors bit-identical, same dtypes (1214 bf16; resblocks.23.* stay fp16,
    text_projection / logit_scale / schedule buffers stay float32), epoch 0 / global_step 0.
  extract_lora_from_models: sd15 fp16 seeds 1 -> 2, --dim 4: 264 modules (72 text encoder,
    192 UNet), 792 tensors bit-identical (float32, alpha float32 4.0), same metadata incl. sshs_*.
    (--conv_dim on full-size models was not run: sd-scripts' full-matrix SVDs of the 3x3 convs
    take too long on 2 cores; the conv path shares svd_factors with svd_merge_lora and the module
    set was checked against scripts/lora_module_list.py for tiny / tiny-v2.)
  Module-name map: lora_targets() of tiny and tiny-v2 single files equals
  scripts/lora_module_list.py's tiny_conv list (227 names, same weight shapes).
"""
import argparse
import datetime
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

IMPLEMENTATION_VERSION = "tools_mirror"
MIN_SV = 1e-6  # resize_lora: a module whose largest singular value is at most this gets rank 1


def str_to_dtype(p):
    return {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(p)


def is_safetensors(path):
    return os.path.splitext(path)[1].lower() == ".safetensors"


def read_metadata(path):
    if not is_safetensors(path):
        return {}
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def load_lora(path, dtype):
    """Every tensor converted to `dtype` (int64 alphas included), as all four scripts load."""
    sd = load_file(path) if is_safetensors(path) else torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in sd.items()}


def save(path, sd, metadata):
    if is_safetensors(path):
        save_file(sd, path, metadata)
    else:
        torch.save(sd, path)


def sshs_hashes(sd, metadata):
    """sd-webui-additional-networks' hashes over the safetensors serialisation of `sd` with only
    the ss_* metadata (train_util.precalculate_safetensors_hashes)."""
    data = safetensors.torch.save(sd, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + n:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def modelspec(v2, v_param, sdxl, lora, title, merged_from=None, is_sd_ckpt=None):
    """sai_model_spec.build_metadata for the SD1/SD2/SDXL cases these tools use."""
    arch = "stable-diffusion-xl-v1-base" if sdxl else (
        ("stable-diffusion-v2-768-v" if v_param else "stable-diffusion-v2-512") if v2 else "stable-diffusion-v1")
    if lora:
        arch += "/lora"
    if not lora and is_sd_ckpt is None:
        is_sd_ckpt = True
    impl = "https://github.com/Stability-AI/generative-models" if (lora and sdxl) or is_sd_ckpt else "diffusers"
    reso = "1024x1024" if sdxl else ("768x768" if v2 and v_param else "512x512")
    meta = {
        "modelspec.architecture": arch,
        "modelspec.implementation": impl,
        "modelspec.title": title,
        "modelspec.resolution": reso,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.date": datetime.datetime.fromtimestamp(int(time.time())).isoformat(),
        "modelspec.prediction_type": "v" if v_param else "epsilon",
        "modelspec.implementation_version": IMPLEMENTATION_VERSION,
    }
    if merged_from is not None:
        meta["modelspec.merged_from"] = merged_from
    return meta


def merged_from(paths):
    """Each input's modelspec.title, else its file stem, joined by ", "."""
    return ", ".join(read_metadata(p).get("modelspec.title") or os.path.splitext(os.path.basename(p))[0]
                     for p in paths)


def title_of(path):
    return os.path.splitext(os.path.basename(path))[0]


def minimum_network_metadata(v2, base_model, dims, alphas, network_args):
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": dims, "ss_network_alpha": alphas}
    if v2 is not None:
        meta["ss_v2"] = v2
    if base_model is not None:
        meta["ss_base_model_version"] = base_model
    if network_args is not None:
        meta["ss_network_args"] = json.dumps(network_args)
    return meta


def first_ss(metas):
    """ss_v2 / ss_base_model_version of the merged LoRA: the first input that has each (strings)."""
    v2 = next((m["ss_v2"] for m in metas if "ss_v2" in m), None)
    base = next((m["ss_base_model_version"] for m in metas if "ss_base_model_version" in m), None)
    return v2, base


# ---------------------------------------------------------------------------------------------
# resize_lora

DOWN_UP_FORMATS = [("lora_down", "lora_up"), ("lora_A", "lora_B"), ("down", "up")]


def rank_by_method(S, method, param):
    """The dynamic rank index (before resize_lora's +1), clamped to [1, len(S)-1]."""
    if method == "sv_ratio":
        idx = int(torch.sum(S > S[0] / param).item())
    elif method == "sv_cumulative":
        idx = int(torch.searchsorted(torch.cumsum(S, dim=0) / float(torch.sum(S)), param)) + 1
    else:  # sv_fro
        sq = S.pow(2)
        idx = int(torch.searchsorted(torch.cumsum(sq, dim=0) / float(torch.sum(sq)), param**2)) + 1
    return max(1, min(idx, len(S) - 1))


def resize_module(full, rank, method, param, scale):
    """SVD of the float32 full delta (flattened to 2-D), rank rule, and the verbose figures."""
    U, S, Vh = torch.linalg.svd(full.reshape(full.shape[0], -1))
    new_rank = rank_by_method(S, method, param) + 1 if method else rank
    if S[0] <= MIN_SV:
        new_rank = 1
    elif new_rank > rank:
        new_rank = rank
    new_alpha = float(scale * new_rank)
    sq = S.pow(2)
    info = dict(
        new_rank=new_rank,
        new_alpha=new_alpha,
        sum_retained=torch.sum(torch.abs(S[:new_rank])) / torch.sum(torch.abs(S)),
        fro_retained=float(torch.sqrt(torch.sum(sq[:new_rank])) / torch.sqrt(torch.sum(sq))),
        max_ratio=S[0] / S[new_rank - 1],
    )
    up = U[:, :new_rank] @ torch.diag(S[:new_rank])
    down = Vh[:new_rank, :]
    return up, down, info


def cmd_resize(argv):
    ap = argparse.ArgumentParser(prog="tools_mirror.py resize_lora")
    ap.add_argument("--save_precision", default=None, choices=[None, "float", "fp16", "bf16"])
    ap.add_argument("--new_rank", type=int, default=4)
    ap.add_argument("--new_conv_rank", type=int, default=None)
    ap.add_argument("--save_to")
    ap.add_argument("--model")
    ap.add_argument("--device")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--dynamic_method", default=None, choices=[None, "sv_ratio", "sv_fro", "sv_cumulative"])
    ap.add_argument("--dynamic_param", type=float, default=None)
    a = ap.parse_args(argv)
    if a.save_to is None or not a.save_to.endswith((".ckpt", ".pt", ".pth", ".safetensors")):
        raise SystemExit("--save_to must be a .ckpt, .pt, .pth or .safetensors file")
    conv_rank = a.new_conv_rank if a.new_conv_rank is not None else a.new_rank
    if a.dynamic_method and not a.dynamic_param:
        raise SystemExit("If using dynamic_method, then dynamic_param is required")
    save_dtype = str_to_dtype(a.save_precision) or torch.float32

    sd = load_lora(a.model, torch.float32)  # always resized in float32
    metadata = dict(read_metadata(a.model)) if is_safetensors(a.model) else {}
    out = dict(sd)
    max_old_rank, new_alpha = None, None
    verbose_str, fro_list = "\n", []
    with torch.no_grad():
        for key, down in sd.items():  # file order: ss_network_alpha comes from the last module
            parts = key.split(".")
            found = None
            for d, u in DOWN_UP_FORMATS:
                if len(parts) >= 2 and parts[-2] == d:
                    found = (".".join(parts[:-2]), "." + d, "." + u, "." + parts[-1])
                    break
                if parts[-1] == d:
                    found = (".".join(parts[:-1]), "." + d, "." + u, "")
                    break
            if found is None:
                continue
            block, dn, un, wn = found
            up = sd.get(block + un + wn)
            if up is None:
                continue
            alpha = sd.get(block + ".alpha")
            old_rank = down.shape[0]
            max_old_rank = max(max_old_rank or 0, old_rank)
            scale = 1.0 if alpha is None else alpha / old_rank  # a float32 0-d tensor
            conv = down.dim() == 4
            full = up.reshape(up.shape[0], -1) @ down.reshape(old_rank, -1)
            new_up, new_down, info = resize_module(full, conv_rank if conv else a.new_rank,
                                                   a.dynamic_method, a.dynamic_param, scale)
            r = info["new_rank"]
            if conv:
                new_down = new_down.reshape(r, *down.shape[1:])
                new_up = new_up.reshape(up.shape[0], r, 1, 1)
            if a.verbose:
                if not np.isnan(info["fro_retained"]):
                    fro_list.append(float(info["fro_retained"]))
                verbose_str += (f"{block:75} | sum(S) retained: {info['sum_retained']:.1%}, fro retained: "
                                f"{info['fro_retained']:.1%}, max(S) ratio: {info['max_ratio']:0.1f}")
            if a.verbose and a.dynamic_method:
                verbose_str += f", dynamic | dim: {r}, alpha: {info['new_alpha']}\n"
            else:
                verbose_str += "\n"
            new_alpha = info["new_alpha"]
            out[block + dn + wn] = new_down.to(save_dtype).contiguous()
            out[block + un + wn] = new_up.to(save_dtype).contiguous()
            out[block + ".alpha"] = torch.tensor(new_alpha).to(save_dtype)
    if a.verbose:
        print(verbose_str)
        print(f"Average Frobenius norm retention: {np.mean(fro_list):.2%} | std: {np.std(fro_list):0.3f}")

    comment = metadata.get("ss_training_comment", "")
    if not a.dynamic_method:
        conv_desc = "" if a.new_rank == conv_rank else f" (conv: {conv_rank})"
        metadata["ss_training_comment"] = f"dimension is resized from {max_old_rank} to {a.new_rank}{conv_desc}; {comment}"
        metadata["ss_network_dim"] = str(a.new_rank)
        metadata["ss_network_alpha"] = str(new_alpha)
    else:
        metadata["ss_training_comment"] = f"Dynamic resize with {a.dynamic_method}: {a.dynamic_param} from {max_old_rank}; {comment}"
        metadata["ss_network_dim"] = "Dynamic"
        metadata["ss_network_alpha"] = "Dynamic"
    # untouched keys (other modules' extras) were loaded as float32: cast floats to the save dtype
    out = {k: v.to(save_dtype) if v.dtype.is_floating_point and v.dtype != save_dtype else v for k, v in out.items()}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = sshs_hashes(out, metadata)
    save(a.save_to, out, metadata)


# ---------------------------------------------------------------------------------------------
# svd_merge_lora

# Which of the 26 lbw slots (BASE, IN00-IN11, MID, OUT00-OUT11) a short lbw list addresses.
LBW_SLOTS = {
    12: [0, 5, 6, 8, 9, 13, 14, 15, 16, 17, 18, 19],
    17: [0, 2, 3, 5, 6, 8, 9, 13, 17, 18, 19, 20, 21, 22, 23, 24, 25],
    20: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22],
    26: list(range(26)),
}
SDXL_LBW_LENGTHS = (12, 20)
UPDOWN_RE = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def lbw_slot(key, sdxl):
    """The 26-slot index of a LoRA key (0 = text encoder / BASE, -1 = none)."""
    if "text_model_encoder_" in key:
        return 0
    if not sdxl:
        m = UPDOWN_RE.search(key)
        if m:
            ud, i, kind, j = m[1], int(m[2]), m[3], int(m[4])
            if ud == "down":
                if kind in ("resnets", "attentions"):
                    return 2 + 3 * i + j
                if kind == "downsamplers":
                    return 1 + 3 * (i + 1)
                return -1
            if kind in ("resnets", "attentions"):
                return 14 + 3 * i + j
            if kind == "upsamplers":
                return 14 + 3 * i + 2
            return -1
        return 13 if "mid_block_" in key else -1
    if not key.startswith("lora_unet_"):
        return -1
    name = key[len("lora_unet_"):]
    if name.startswith(("time_embed_", "label_emb_")):
        return 1
    if name.startswith("input_blocks_"):
        return 1 + int(name.split("_")[2])
    if name.startswith("middle_block_"):
        return 13
    if name.startswith("output_blocks_"):
        return 14 + int(name.split("_")[2])
    return 23 if name.startswith("out_") else -1


def cmd_svd_merge(argv):
    ap = argparse.ArgumentParser(prog="tools_mirror.py svd_merge_lora")
    ap.add_argument("--save_precision", default=None, choices=[None, "float", "fp16", "bf16"])
    ap.add_argument("--precision", default="float", choices=["float", "fp16", "bf16"])
    ap.add_argument("--save_to")
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--ratios", type=float, nargs="*")
    ap.add_argument("--lbws", nargs="*")
    ap.add_argument("--new_rank", type=int, default=4)
    ap.add_argument("--new_conv_rank", type=int, default=None)
    ap.add_argument("--device")
    ap.add_argument("--no_metadata", action="store_true")
    a = ap.parse_args(argv)
    assert len(a.models) == len(a.ratios), "number of models must be equal to number of ratios"
    lbws = [json.loads(x) for x in a.lbws] if a.lbws else []
    if lbws:
        assert len(lbws) == len(a.models)
        assert len({len(x) for x in lbws}) == 1 and len(lbws[0]) in LBW_SLOTS
    sdxl_lbw = bool(lbws) and len(lbws[0]) in SDXL_LBW_LENGTHS
    slots = LBW_SLOTS[len(lbws[0])] if lbws else []
    merge_dtype = str_to_dtype(a.precision)
    save_dtype = str_to_dtype(a.save_precision) or merge_dtype
    conv_rank = a.new_conv_rank if a.new_conv_rank is not None else a.new_rank

    merged, metas = {}, []
    for path, ratio, lbw in itertools.zip_longest(a.models, a.ratios, lbws):
        sd = load_lora(path, merge_dtype)
        metas.append(read_metadata(path))
        if lbw:
            weights26 = [1] * 26
            for i, w in zip(slots, lbw):
                weights26[i] = w
        for key in list(sd):
            if "lora_down" not in key:
                continue
            name = key[: key.rfind(".lora_down")]
            down, up = sd[key], sd[name + ".lora_up.weight"]
            rank = down.shape[0]
            conv = down.dim() == 4
            weight = merged.get(name)
            if weight is None:
                weight = torch.zeros((up.shape[0], down.shape[1], *down.shape[2:]), dtype=merge_dtype)
            scale = sd.get(name + ".alpha", rank) / rank  # tensor in the merge dtype (float if no alpha)
            if lbw:
                slot = lbw_slot(key, sdxl_lbw)
                if slot in slots:
                    scale *= weights26[slot]
            if not conv:
                weight = weight + ratio * (up @ down) * scale
            elif down.shape[2:4] == (1, 1):
                weight = weight + ratio * (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
            else:
                # a 3x3 kernel composed with the 1x1 up: conv2d of the down kernels by up
                weight = weight + ratio * torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale
            merged[name] = weight

    out = {}
    with torch.no_grad():
        for name, mat in merged.items():
            conv = mat.dim() == 4
            ks = mat.shape[2:4] if conv else None
            conv3 = conv and ks != (1, 1)
            out_dim, in_dim = mat.shape[0:2]
            if conv:
                mat = mat.flatten(start_dim=1) if conv3 else mat.squeeze()
            r = min(conv_rank if conv3 else a.new_rank, in_dim, out_dim)
            up, down = svd_factors(mat, r, 0.99)
            if conv:
                up = up.reshape(out_dim, r, 1, 1)
                down = down.reshape(r, in_dim, ks[0], ks[1])
            out[name + ".lora_up.weight"] = up.contiguous()
            out[name + ".lora_down.weight"] = down.contiguous()
            out[name + ".alpha"] = torch.tensor(r)  # int64, and it stays int64 (only floats are cast)

    v2, base = first_ss(metas)
    metadata = minimum_network_metadata(v2, base, f"{a.new_rank}", f"{a.new_rank}",
                                        {"conv_dim": conv_rank, "conv_alpha": conv_rank})
    out = {k: v.to(save_dtype) if v.dtype.is_floating_point and v.dtype != save_dtype else v for k, v in out.items()}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = sshs_hashes(out, metadata)
    if not a.no_metadata:
        sdxl = base is not None and base.lower().startswith("sdxl")
        is_v2 = v2 == "True"
        metadata.update(modelspec(is_v2, is_v2, sdxl, True, title_of(a.save_to), merged_from(a.models)))
    save(a.save_to, out, metadata)


def svd_factors(mat, r, quantile):
    """Rank-r SVD factors (up = U*S, down = Vh), both clamped to +-quantile(|all entries|)."""
    U, S, Vh = torch.linalg.svd(mat)
    U = U[:, :r] @ torch.diag(S[:r])
    Vh = Vh[:r, :]
    hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), quantile)
    return U.clamp(-hi, hi), Vh.clamp(-hi, hi)


# ---------------------------------------------------------------------------------------------
# merge_lora: LoRA + LoRA


def cmd_merge(argv):
    ap = argparse.ArgumentParser(prog="tools_mirror.py merge_lora")
    ap.add_argument("--v2", action="store_true")
    ap.add_argument("--save_precision", default=None, choices=[None, "float", "fp16", "bf16"])
    ap.add_argument("--precision", default="float", choices=["float", "fp16", "bf16"])
    ap.add_argument("--sd_model", default=None)
    ap.add_argument("--save_to")
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--ratios", type=float, nargs="*")
    ap.add_argument("--no_metadata", action="store_true")
    ap.add_argument("--concat", action="store_true")
    ap.add_argument("--shuffle", action="store_true")
    a = ap.parse_args(argv)
    assert len(a.models) == len(a.ratios), "number of models must be equal to number of ratios"
    merge_dtype = str_to_dtype(a.precision)
    save_dtype = str_to_dtype(a.save_precision) or merge_dtype
    if a.sd_model is not None:
        return merge_into_checkpoint(a, merge_dtype, save_dtype)

    merged, base_alphas, base_dims, metas = {}, {}, {}, []
    for path, ratio in zip(a.models, a.ratios):
        sd = load_lora(path, merge_dtype)
        metas.append(read_metadata(path))
        alphas, dims = {}, {}
        for key, v in sd.items():
            if "alpha" in key:
                name = key[: key.rfind(".alpha")]
                alphas[name] = float(v.detach().numpy())  # after the cast: fp16-rounded with --precision fp16
                base_alphas.setdefault(name, alphas[name])
            elif "lora_down" in key:
                name = key[: key.rfind(".lora_down")]
                dims[name] = v.shape[0]
                base_dims.setdefault(name, dims[name])
        for name, d in dims.items():
            if name not in alphas:  # no alpha key: the rank, a Python int
                alphas[name] = d
                base_alphas.setdefault(name, d)
        for key, v in sd.items():
            if "alpha" in key:
                continue
            cat_dim = (1 if "lora_up" in key else 0 if "lora_down" in key else None) if a.concat else None
            name = key[: key.rfind(".lora_")]
            # both factors get sqrt(alpha/base_alpha)*ratio; up takes its absolute value so a
            # negative ratio flips the product's sign once
            scale = math.sqrt(alphas[name] / base_alphas[name]) * ratio
            if "lora_up" in key:
                scale = abs(scale)
            if key in merged:
                assert merged[key].shape == v.shape or cat_dim is not None, "weights shape mismatch"
                merged[key] = torch.cat([merged[key], v * scale], dim=cat_dim) if cat_dim is not None else merged[key] + v * scale
            else:
                merged[key] = v * scale
    for name, alpha in base_alphas.items():
        merged[name + ".alpha"] = torch.tensor(alpha)  # float32 (int64 if it came from a rank)
        if a.shuffle:  # an unseeded permutation of the rank rows; the product is unchanged
            kd, ku = name + ".lora_down.weight", name + ".lora_up.weight"
            perm = torch.randperm(merged[kd].shape[0])
            merged[kd] = merged[kd][perm]
            merged[ku] = merged[ku][:, perm]

    def summary(values):
        uniq = list(set(values))
        return f"{uniq[0]}" if all(x == uniq[0] for x in uniq) else "Dynamic"

    v2, base = first_ss(metas)
    metadata = minimum_network_metadata(v2, base, summary(base_dims.values()), summary(base_alphas.values()), None)
    # hashes of the merge-dtype tensors (alphas float32/int64): computed *before* the save cast
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = sshs_hashes(merged, metadata)
    if not a.no_metadata:
        is_v2 = v2 == "True"
        metadata.update(modelspec(is_v2, is_v2, False, True, title_of(a.save_to), merged_from(a.models)))
    # every tensor (int64 alphas too) is cast to the save dtype
    save(a.save_to, {k: v.to(save_dtype) for k, v in merged.items()}, metadata)


# ---------------------------------------------------------------------------------------------
# LDM single-file checkpoints: key layout

TE_OLD_PREFIXES = ["cond_stage_model.transformer." + p for p in ("embeddings.", "encoder.", "final_layer_norm.")]
UNET = "model.diffusion_model."
SD1_TE = "cond_stage_model.transformer.text_model."
SD2_TE = "cond_stage_model.model."
RESNET_LDM_TO_DIFFUSERS = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
                           "skip_connection": "conv_shortcut"}
# Linear/Conv2d children of Transformer2DModel (the other targets are found by name below)
TRANSFORMER_LEAVES = re.compile(r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))")
OPENCLIP_TO_HF = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def load_checkpoint(path):
    """(state dict with old-style text encoder keys renamed, the pickle's outer dict or {})."""
    if is_safetensors(path):
        sd, outer = load_file(path), {}
    else:
        outer = torch.load(path, map_location="cpu", weights_only=True)
        if "state_dict" in outer:
            sd = outer["state_dict"]
        else:
            sd, outer = outer, {}
    # sd-scripts renames these in the dict it later saves (new names go to the end)
    for key in [k for k in sd if k.startswith(tuple(TE_OLD_PREFIXES))]:
        sd["cond_stage_model.transformer.text_model." + key[len("cond_stage_model.transformer."):]] = sd.pop(key)
    return sd, outer


def is_v2_layout(sd):
    return any(k.startswith(SD2_TE) for k in sd)


def sd2_text_blocks(sd):
    """Number of OpenCLIP blocks the text encoder keeps: all but the last one."""
    idx = [int(m[1]) for k in sd for m in [re.match(re.escape(SD2_TE) + r"transformer\.resblocks\.(\d+)\.", k)] if m]
    return max(idx) if idx else 0


def unet_ldm_to_diffusers(path, per_level):
    """LDM UNet module path (after model.diffusion_model.) -> diffusers module path, or None
    for modules outside sd-scripts' LoRA target blocks."""
    m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", path)
    if m:
        n, sub, rest = int(m[1]), int(m[2]), m[3]
        if n == 0:
            return None  # conv_in
        if n % per_level == 0:  # the downsampler closing a level
            return f"down_blocks.{n // per_level - 1}.downsamplers.0.conv" if rest == "op" else None
        b, j = (n - 1) // per_level, (n - 1) % per_level
        if sub == 0:
            return f"down_blocks.{b}.resnets.{j}.{RESNET_LDM_TO_DIFFUSERS[rest]}" if rest in RESNET_LDM_TO_DIFFUSERS else None
        return f"down_blocks.{b}.attentions.{j}.{rest}"
    m = re.fullmatch(r"middle_block\.(\d+)\.(.+)", path)
    if m:
        n, rest = int(m[1]), m[2]
        if n == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{n // 2}.{RESNET_LDM_TO_DIFFUSERS[rest]}" if rest in RESNET_LDM_TO_DIFFUSERS else None
    m = re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", path)
    if m:
        n, sub, rest = int(m[1]), int(m[2]), m[3]
        b, j = n // per_level, n % per_level
        if sub == 0:
            return f"up_blocks.{b}.resnets.{j}.{RESNET_LDM_TO_DIFFUSERS[rest]}" if rest in RESNET_LDM_TO_DIFFUSERS else None
        if rest == "conv":
            return f"up_blocks.{b}.upsamplers.0.conv"
        return f"up_blocks.{b}.attentions.{j}.{rest}"
    return None


def lora_targets(sd):
    """kohya module name -> (LDM weight key, row slice or None, block kind) for every module
    sd-scripts' networks.lora could target in this checkpoint. kind: "transformer" (always a
    target), "resnet"/"sampler" (targets with conv LoRA: ResnetBlock2D, Down/Upsample2D), "te"."""
    targets = {}
    ops = [int(m[1]) for k in sd for m in [re.fullmatch(re.escape(UNET) + r"input_blocks\.(\d+)\.0\.op\.weight", k)] if m]
    per_level = min(ops) if ops else 3  # resnets per level + 1 (SD: 3)
    for key in sd:
        if not (key.startswith(UNET) and key.endswith(".weight")):
            continue
        diff = unet_ldm_to_diffusers(key[len(UNET): -len(".weight")], per_level)
        if diff is None:
            continue
        if ".attentions." in diff:
            leaf = diff.split(".attentions.", 1)[1].split(".", 1)[1]
            if not TRANSFORMER_LEAVES.fullmatch(leaf):
                continue
            kind = "transformer"
        else:
            kind = "resnet" if ".resnets." in diff else "sampler"
        targets["lora_unet_" + diff.replace(".", "_")] = (key, None, kind)
    if is_v2_layout(sd):
        for i in range(sd2_text_blocks(sd)):
            p = f"{SD2_TE}transformer.resblocks.{i}."
            lora = f"lora_te_text_model_encoder_layers_{i}_"
            d = sd[p + "attn.in_proj_weight"].shape[0] // 3
            for j, x in enumerate("qkv"):
                targets[f"{lora}self_attn_{x}_proj"] = (p + "attn.in_proj_weight", slice(j * d, (j + 1) * d), "te")
            for oc, hf in OPENCLIP_TO_HF.items():
                targets[lora + hf.replace(".", "_")] = (p + oc + ".weight", None, "te")
    else:
        for key in sd:
            m = re.fullmatch(re.escape(SD1_TE) + r"encoder\.layers\.(\d+)\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight", key)
            if m:
                targets["lora_te_" + key[len("cond_stage_model.transformer."): -len(".weight")].replace(".", "_")] = (key, None, "te")
    return targets


def model_keys(sd, v2):
    """Keys sd-scripts' save_stable_diffusion_checkpoint rewrites from its models, by part
    ("unet", "te", "vae"). The others (position_ids, SD2's last block / text_projection /
    logit_scale, schedule buffers, model_ema.*, ...) are copied from the input untouched."""
    parts = {}
    n_blocks = sd2_text_blocks(sd) if v2 else 0
    for k in sd:
        if k.startswith(UNET):
            parts[k] = "unet"
        elif k.startswith("first_stage_model.") and k.split(".")[1] in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
            parts[k] = "vae"
        elif not v2 and k.startswith(SD1_TE) and not k.endswith("position_ids"):
            parts[k] = "te"
        elif v2 and k.startswith(SD2_TE):
            rest = k[len(SD2_TE):]
            m = re.match(r"transformer\.resblocks\.(\d+)\.", rest)
            if (m and int(m[1]) < n_blocks) or rest.split(".")[0] in (
                    "token_embedding", "positional_embedding", "ln_final"):
                parts[k] = "te"
    return parts


VAE_ATTN_1X1 = re.compile(r"first_stage_model\.(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


def merge_into_checkpoint(a, merge_dtype, save_dtype):
    sd, outer = load_checkpoint(a.sd_model)
    parts = model_keys(sd, a.v2)
    # The models hold float32 copies (load_state_dict into float32 modules); the UNet and text
    # encoder are then cast to the merge dtype, the VAE stays float32.
    work = {k: sd[k].to(torch.float32).to(merge_dtype if p != "vae" else torch.float32) for k, p in parts.items()}
    targets = lora_targets(sd)
    for path, ratio in zip(a.models, a.ratios):
        lsd = load_lora(path, merge_dtype)
        for key in lsd:
            if "lora_down" not in key:
                continue
            name = ".".join(key.split(".")[:-2])
            if name not in targets:
                print(f"no module found for LoRA weight: {key}", file=sys.stderr)
                continue
            ldm_key, rows, _ = targets[name]
            down, up = lsd[key], lsd[key.replace("lora_down", "lora_up")]
            rank = down.shape[0]
            scale = lsd.get(key[: key.index("lora_down")] + "alpha", rank) / rank
            weight = work[ldm_key] if rows is None else work[ldm_key][rows]
            if weight.dim() == 2:
                if up.dim() == 4:
                    up, down = up.squeeze(3).squeeze(2), down.squeeze(3).squeeze(2)
                weight = weight + ratio * (up @ down) * scale
            elif down.shape[2:4] == (1, 1):
                weight = weight + ratio * (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
            else:
                weight = weight + ratio * torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale
            if rows is None:
                work[ldm_key] = weight
            else:
                work[ldm_key] = torch.cat([work[ldm_key][: rows.start], weight, work[ldm_key][rows.stop:]])
    for k, v in work.items():
        if VAE_ATTN_1X1.fullmatch(k) and v.dim() == 2:
            v = v[:, :, None, None]  # sd-scripts always writes these as 1x1 conv kernels
        sd[k] = v.to(save_dtype)

    metadata = None
    if not a.no_metadata:
        metadata = modelspec(a.v2, a.v2, False, False, title_of(a.save_to), merged_from([a.sd_model] + a.models),
                             is_sd_ckpt=True)
    if is_safetensors(a.save_to):
        save_file(sd, a.save_to, metadata)
    else:
        epoch, step = 0, 0
        try:
            if "epoch" in outer:
                epoch += outer["epoch"]
            if "global_step" in outer:
                step += outer["global_step"]
        except Exception:
            pass
        torch.save({"state_dict": sd, "epoch": epoch, "global_step": step}, a.save_to)


# ---------------------------------------------------------------------------------------------
# extract_lora_from_models


def cmd_extract(argv):
    ap = argparse.ArgumentParser(prog="tools_mirror.py extract_lora_from_models")
    ap.add_argument("--v2", action="store_true")
    ap.add_argument("--v_parameterization", action="store_true", default=None)
    ap.add_argument("--sdxl", action="store_true")
    ap.add_argument("--load_precision", default=None, choices=[None, "float", "fp16", "bf16"])
    ap.add_argument("--save_precision", default=None, choices=[None, "float", "fp16", "bf16"])
    ap.add_argument("--model_org", required=True)
    ap.add_argument("--model_tuned", required=True)
    ap.add_argument("--save_to", required=True)
    ap.add_argument("--dim", type=int, default=4)
    ap.add_argument("--conv_dim", type=int, default=None)
    ap.add_argument("--device")
    ap.add_argument("--clamp_quantile", type=float, default=0.99)
    ap.add_argument("--min_diff", type=float, default=0.01)
    ap.add_argument("--no_metadata", action="store_true")
    a = ap.parse_args(argv)
    if a.sdxl:
        raise SystemExit("SDXL extraction is not mirrored")
    v_param = a.v2 if a.v_parameterization is None else a.v_parameterization
    load_dtype = str_to_dtype(a.load_precision) if a.load_precision else torch.float32
    save_dtype = str_to_dtype(a.save_precision)

    org, _ = load_checkpoint(a.model_org)
    tuned, _ = load_checkpoint(a.model_tuned)
    targets = lora_targets(org)

    def weight(sd, ldm_key, rows):
        w = sd[ldm_key].to(torch.float32).to(load_dtype)  # the model's copy, then --load_precision
        return w if rows is None else w[rows]

    def wanted(ldm_key, kind):
        if kind in ("te", "transformer"):
            return True
        # ResnetBlock2D / Downsample2D / Upsample2D are targets only with --conv_dim; inside
        # them Linear and 1x1 convs get --dim, 3x3 convs --conv_dim
        return a.conv_dim is not None

    te_diffs, unet_diffs = {}, {}
    for name, (ldm_key, rows, kind) in targets.items():
        if not wanted(ldm_key, kind):
            continue
        d = weight(tuned, ldm_key, rows) - weight(org, ldm_key, rows)
        (te_diffs if kind == "te" else unet_diffs)[name] = d
    # the text encoder is extracted only if some module changed by more than min_diff
    te_different = any(torch.max(torch.abs(d)) > a.min_diff for d in te_diffs.values())
    diffs = {**(te_diffs if te_different else {}), **unet_diffs}
    print(f"text encoder {'different' if te_different else 'same'}; {len(diffs)} modules", file=sys.stderr)

    out = {}
    with torch.no_grad():
        for name, mat in diffs.items():
            mat = mat.to(torch.float)
            conv = mat.dim() == 4
            ks = mat.shape[2:4] if conv else None
            conv3 = conv and ks != (1, 1)
            rank = a.dim if not conv3 or a.conv_dim is None else a.conv_dim
            out_dim, in_dim = mat.shape[0:2]
            rank = min(rank, in_dim, out_dim)
            if conv:
                mat = mat.flatten(start_dim=1) if conv3 else mat.squeeze()
            up, down = svd_factors(mat, rank, a.clamp_quantile)
            if conv:
                up = up.reshape(out_dim, rank, 1, 1)
                down = down.reshape(rank, in_dim, ks[0], ks[1])
            # saved through the float32 LoRA network: a float32 alpha (= rank), then
            # everything cast to --save_precision when given
            for suffix, t in ((".lora_up.weight", up), (".lora_down.weight", down), (".alpha", torch.tensor(float(rank)))):
                t = t.to(torch.float32)
                out[name + suffix] = (t.to(save_dtype) if save_dtype is not None else t).contiguous()

    net_kwargs = {} if a.conv_dim is None else {"conv_dim": str(a.conv_dim), "conv_alpha": str(float(a.conv_dim))}
    version = "sd" + ("_v2" if a.v2 else "_v1") + ("_v" if v_param else "")
    metadata = {
        "ss_v2": str(a.v2),
        "ss_base_model_version": version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(a.dim),
        "ss_network_alpha": str(float(a.dim)),
        "ss_network_args": json.dumps(net_kwargs),
    }
    if not a.no_metadata:
        metadata.update(modelspec(a.v2, v_param, False, True, title_of(a.save_to)))
    d = os.path.dirname(a.save_to)
    if d:
        os.makedirs(d, exist_ok=True)
    if is_safetensors(a.save_to):
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = sshs_hashes(out, metadata)
        save_file(out, a.save_to, metadata)
    else:
        torch.save(out, a.save_to)


COMMANDS = {"resize_lora": cmd_resize, "svd_merge_lora": cmd_svd_merge, "merge_lora": cmd_merge,
            "extract_lora_from_models": cmd_extract}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        raise SystemExit(f"usage: tools_mirror.py {{{'|'.join(COMMANDS)}}} FLAGS...")
    torch.set_grad_enabled(False)
    COMMANDS[sys.argv[1]](sys.argv[2:])
