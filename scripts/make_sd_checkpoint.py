#!/usr/bin/env python
"""Builds a random-weight (seeded) Stable Diffusion model and writes it in the two forms users have:

  DIR/diffusers/         a Diffusers folder (unet/, text_encoder/, vae/, scheduler/, model_index.json)
                         written by diffusers/transformers `save_pretrained`
  DIR/model.safetensors  an LDM ("original Stable Diffusion") single-file checkpoint
  DIR/model.ckpt         (with --ckpt) the same state dict as a torch pickle

Configs: `tiny` (matches sdlora's UNetConfig::tiny(), ClipTextConfig::tiny(), VaeConfig::tiny()),
`tiny-v2` (the same sizes in the SD2 layout: Linear projections, upcast_attention, GELU text
encoder written as an OpenCLIP tower),
`sd15` (SD1.5 shapes) and `sd21` (SD2.1-768 shapes: linear projections, upcast_attention,
23-layer GELU OpenCLIP text tower of width 1024).

The Diffusers -> LDM key conversion is this script's own (the inverse of
sdscripts_model_math.md §2.2-§2.4); `--verify` checks it by converting the written file back with
diffusers' own single-file converters and comparing every tensor with the Diffusers state dict.

Usage:
  python scripts/make_sd_checkpoint.py --config tiny --seed 0 --out DIR [--fp16] [--ema] [--ckpt]
      [--old-clip-keys] [--no-diffusers] [--verify] [--test-variants]
Full-size configs need several GB of RAM: run them under `flock /tmp/sdlora-bigmem.lock`.
"""
import argparse
import json
import os
import re
import sys

import torch

# Attention head counts are not recorded in LDM single files; sdlora infers them with the SD1/SD2
# rule (SD1: 8 heads per level, CLIP head dim 64; SD2: head dim 64). Configs that break the rule
# (tiny) put the real counts into the safetensors metadata under these keys.
META_UNET_HEADS = "sdlora.unet_num_heads"
META_CLIP_HEADS = "sdlora.clip_num_heads"

SD1_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
)
SD1_CLIP = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
SD_VAE = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)

CONFIGS = {
    "tiny": dict(
        version=1,
        unet=dict(
            SD1_UNET,
            sample_size=8,
            block_out_channels=[32, 64, 64],
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=[2, 4, 4],
            cross_attention_dim=32,
        ),
        clip=dict(
            SD1_CLIP,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=5,
            num_attention_heads=4,
            projection_dim=32,
        ),
        vae=dict(
            SD_VAE,
            sample_size=16,
            block_out_channels=[32, 64],
            layers_per_block=1,
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
        ),
    ),
    "sd15": dict(version=1, unet=SD1_UNET, clip=SD1_CLIP, vae=SD_VAE),
    # tiny with the SD2 layout: Linear projections, upcast_attention, GELU text encoder stored as an
    # OpenCLIP tower in the single file (for fast tests of the SD2 code paths).
    "tiny-v2": None,
    "sd21": dict(
        version=2,
        unet=dict(
            SD1_UNET,
            sample_size=96,
            attention_head_dim=[5, 10, 20, 20],
            cross_attention_dim=1024,
            use_linear_projection=True,
            upcast_attention=True,
        ),
        clip=dict(
            SD1_CLIP,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            hidden_act="gelu",
            projection_dim=512,
            # The SD2 tokenizer pads with "!" (id 0); ids here only mirror the released config.
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
        vae=dict(SD_VAE, sample_size=768),
    ),
}


CONFIGS["tiny-v2"] = dict(
    version=2,
    unet=dict(CONFIGS["tiny"]["unet"], use_linear_projection=True, upcast_attention=True),
    clip=dict(CONFIGS["tiny"]["clip"], hidden_act="gelu"),
    vae=CONFIGS["tiny"]["vae"],
)


def randomize_(model, gen):
    """Default inits leave norms at weight 1 / bias 0 (and some biases at 0): a loader that swapped
    or skipped them would still match. Perturb every parameter so each tensor is distinct."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.dim() == 1:
                p.add_(noise * 0.1)
            else:
                std = float(p.std()) if p.numel() > 1 else 0.02
                p.add_(noise * (0.1 * std + 1e-3))


def build_models(cfg, seed):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    randomize_(unet, gen)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["clip"]))
    randomize_(text_encoder, gen)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**cfg["vae"])
    randomize_(vae, gen)
    for m in (unet, text_encoder, vae):
        m.eval()
    return unet, text_encoder, vae


# ---------------------------------------------------------------------------------------------
# Diffusers -> LDM key conversion (inverse of sdscripts_model_math.md §2.2-§2.4).

UNET_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_key_to_ldm(key, ucfg):
    """One Diffusers UNet key -> its LDM key (without the `model.diffusion_model.` prefix)."""
    per_level = ucfg["layers_per_block"] + 1  # resnets per level in the LDM numbering

    def resnet(rest):
        sub, _, leaf = rest.partition(".")
        return f"{UNET_RESNET_TO_LDM[sub]}.{leaf}"

    top = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    for d, l in top.items():
        if key.startswith(d):
            return l + key[len(d):]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 1 + b * per_level + j
        return f"input_blocks.{n}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * j}.{resnet(rest)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = b * per_level + j
        return f"output_blocks.{n}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
    if m:
        b = int(m[1])
        has_attn = ucfg["up_block_types"][b].startswith("CrossAttn")
        return f"output_blocks.{b * per_level + per_level - 1}.{2 if has_attn else 1}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


def vae_key_to_ldm(key, vcfg):
    """One Diffusers AutoencoderKL key -> (LDM key without `first_stage_model.`, is_attn_linear)."""
    levels = len(vcfg["block_out_channels"])

    def resnet(rest):
        return rest.replace("conv_shortcut.", "nin_shortcut.")

    for part in ("encoder", "decoder"):
        if not key.startswith(part + "."):
            continue
        rest = key[len(part) + 1:]
        if rest.startswith("conv_norm_out."):
            return f"{part}.norm_out.{rest[len('conv_norm_out.'):]}", False
        if rest.startswith(("conv_in.", "conv_out.")):
            return key, False
        m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
        if m:
            return f"{part}.mid.block_{int(m[1]) + 1}.{resnet(m[2])}", False
        m = re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", rest)
        if m:
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[1]]
            return f"{part}.mid.attn_1.{name}.{m[2]}", m[1] != "group_norm"
        m = re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)
        if m and part == "encoder":
            return f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}", False
        m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest)
        if m and part == "encoder":
            return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
        # LDM numbers decoder levels from the lowest resolution up; Diffusers from the top down.
        m = re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)
        if m and part == "decoder":
            return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}", False
        m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest)
        if m and part == "decoder":
            return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key, False
    raise KeyError(f"no LDM name for VAE key {key}")


CLIP_LAYER_TO_OPENCLIP = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def clip_to_openclip(sd, ccfg, gen):
    """transformers CLIPTextModel state dict -> OpenCLIP text tower (`cond_stage_model.model.*`),
    q/k/v fused into `in_proj`, plus the parts SD2 files carry but do not use (the last resblock,
    text_projection, logit_scale)."""
    out = {}
    p = "cond_stage_model.model."
    out[p + "token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out[p + "positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out[p + "ln_final.weight"] = sd["text_model.final_layer_norm.weight"]
    out[p + "ln_final.bias"] = sd["text_model.final_layer_norm.bias"]
    n = ccfg["num_hidden_layers"]
    for i in range(n):
        src = f"text_model.encoder.layers.{i}."
        dst = f"{p}transformer.resblocks.{i}."
        for d, o in CLIP_LAYER_TO_OPENCLIP.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{o}.{leaf}"] = sd[f"{src}{d}.{leaf}"]
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat(
                [sd[f"{src}self_attn.{x}_proj.{leaf}"] for x in ("q", "k", "v")], dim=0
            )
    # SD2 keeps the 24th OpenCLIP block in the file; the model drops it (penultimate layer).
    last = f"{p}transformer.resblocks.{n - 1}."
    extra = f"{p}transformer.resblocks.{n}."
    for k in [k for k in out if k.startswith(last)]:
        t = out[k]
        out[extra + k[len(last):]] = torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.02
    h = ccfg["hidden_size"]
    out[p + "text_projection"] = torch.randn((h, h), generator=gen) * h**-0.5
    out[p + "logit_scale"] = torch.tensor(4.6052)
    return out


def ldm_state_dict(unet, text_encoder, vae, cfg, ema, old_clip_keys, gen):
    sd = {}
    for k, v in unet.state_dict().items():
        sd["model.diffusion_model." + unet_key_to_ldm(k, cfg["unet"])] = v
    for k, v in vae.state_dict().items():
        name, attn_linear = vae_key_to_ldm(k, cfg["vae"])
        if attn_linear and v.dim() == 2:
            v = v[:, :, None, None]  # LDM stores the mid attention's q/k/v/proj_out as 1x1 convs
        sd["first_stage_model." + name] = v
    te = text_encoder.state_dict()
    if cfg["version"] == 1:
        n_pos = cfg["clip"]["max_position_embeddings"]
        te = dict(te)
        te["text_model.embeddings.position_ids"] = torch.arange(n_pos, dtype=torch.int64)[None]
        for k, v in te.items():
            if old_clip_keys:
                k = k[len("text_model."):]
            sd["cond_stage_model.transformer." + k] = v
    else:
        te = {k: v for k, v in te.items() if not k.endswith("position_ids")}
        sd.update(clip_to_openclip(te, cfg["clip"], gen))
    if ema:
        # LDM's EMA copy flattens the module path (dots removed) under `model_ema.`.
        for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
            flat = "diffusion_model" + k[len("model.diffusion_model."):].replace(".", "")
            v = sd[k]
            sd["model_ema." + flat] = v + torch.randn(v.shape, generator=gen, dtype=v.dtype) * 0.01
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    # Diffusion schedule buffers that real LDM files carry (fp32 even in fp16 files).
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    sd["betas"] = betas.float()
    sd["alphas_cumprod"] = ac.float()
    sd["alphas_cumprod_prev"] = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]]).float()
    sd["sqrt_alphas_cumprod"] = ac.sqrt().float()
    return sd


def rule_heads(cfg):
    """What sdlora infers from shapes alone (SD1: 8 heads, CLIP head dim 64; SD2: head dim 64)."""
    ch = cfg["unet"]["block_out_channels"]
    unet = [8] * len(ch) if cfg["version"] == 1 else [c // 64 for c in ch]
    clip = cfg["clip"]["hidden_size"] // 64
    return unet, clip


def unet_heads(ucfg):
    h = ucfg.get("num_attention_heads") or ucfg["attention_head_dim"]
    return list(h) if isinstance(h, (list, tuple)) else [h] * len(ucfg["block_out_channels"])


def write_diffusers(out_dir, unet, text_encoder, vae, fp16):
    from diffusers import PNDMScheduler

    variant = "fp16" if fp16 else None
    dtype = torch.float16 if fp16 else torch.float32
    unet.to(dtype).save_pretrained(os.path.join(out_dir, "unet"), safe_serialization=True, variant=variant)
    text_encoder.to(dtype).save_pretrained(
        os.path.join(out_dir, "text_encoder"), safe_serialization=True, variant=variant
    )
    vae.to(dtype).save_pretrained(os.path.join(out_dir, "vae"), safe_serialization=True, variant=variant)
    PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    ).save_pretrained(os.path.join(out_dir, "scheduler"))
    import diffusers
    import transformers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "_transformers_version": transformers.__version__,
    }
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def verify(sd, cfg, unet, text_encoder, vae):
    """Converts the LDM state dict back with diffusers' own converters and compares."""
    from diffusers.loaders import single_file_utils as su

    def compare(what, got, want):
        missing = sorted(set(want) - set(got))
        if missing:
            raise SystemExit(f"verify {what}: diffusers' converter did not produce {missing[:5]}")
        for k, w in want.items():
            g = got[k].reshape(w.shape) if got[k].numel() == w.numel() else got[k]
            if g.shape != w.shape or not torch.equal(g.to(w.dtype), w):
                raise SystemExit(f"verify {what}: {k} differs")
        print(f"verify {what}: {len(want)} tensors equal")

    ucfg = dict(cfg["unet"])
    compare("unet", su.convert_ldm_unet_checkpoint(sd, ucfg), unet.state_dict())
    compare("vae", su.convert_ldm_vae_checkpoint(sd, dict(cfg["vae"])), vae.state_dict())
    want_te = {k: v for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}
    if cfg["version"] == 1:
        got = su.convert_ldm_clip_checkpoint(sd)
        got = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in got.items()}
    else:
        got = su.convert_open_clip_checkpoint(text_encoder, sd)
    compare("text_encoder", got, want_te)


def emit(out, cfg, models, seed, fp16, ema, ckpt, old_clip_keys, diffusers_folder, verify_ldm, label):
    """Writes one checkpoint (both forms) of `models` into `out`. fp16 converts the models in
    place (irreversibly), so fp32 outputs must be emitted first."""
    unet, text_encoder, vae = models
    os.makedirs(out, exist_ok=True)
    if fp16:
        # Convert before building the LDM dict, which shares the parameters' storage: one fp16
        # copy of the model in memory instead of fp32 + fp16.
        for m in models:
            m.half()
    gen = torch.Generator().manual_seed(seed + 3)
    sd = ldm_state_dict(unet, text_encoder, vae, cfg, ema, old_clip_keys, gen)
    if verify_ldm:
        verify(sd, cfg, unet, text_encoder, vae)
    sd = {k: v.contiguous() for k, v in sd.items()}

    meta = {"format": "pt", "sdlora.generator": f"make_sd_checkpoint.py {label}"}
    r_unet, r_clip = rule_heads(cfg)
    if unet_heads(cfg["unet"]) != r_unet:
        meta[META_UNET_HEADS] = ",".join(str(h) for h in unet_heads(cfg["unet"]))
    if cfg["clip"]["num_attention_heads"] != r_clip:
        meta[META_CLIP_HEADS] = str(cfg["clip"]["num_attention_heads"])

    from safetensors.torch import save_file

    path = os.path.join(out, "model.safetensors")
    save_file(sd, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)
    if ckpt:
        # head counts as top-level strings: sdlora reads those as a .ckpt's metadata
        heads = {k: v for k, v in meta.items() if k in (META_UNET_HEADS, META_CLIP_HEADS)}
        torch.save({"state_dict": sd, "global_step": 0, **heads}, os.path.join(out, "model.ckpt"))
    del sd
    if diffusers_folder:
        write_diffusers(os.path.join(out, "diffusers"), unet, text_encoder, vae, fp16)
    print(f"wrote {path}" + (f" and {os.path.join(out, 'diffusers')}" if diffusers_folder else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fp16", action="store_true", help="store float tensors as fp16 (both forms)")
    ap.add_argument("--ema", action="store_true", help="add LDM `model_ema.*` keys to the single file")
    ap.add_argument("--ckpt", action="store_true", help="also write DIR/model.ckpt (torch pickle)")
    ap.add_argument(
        "--old-clip-keys",
        action="store_true",
        help="SD1 only: old LDM text-encoder keys without the `text_model.` level",
    )
    ap.add_argument("--no-diffusers", action="store_true", help="skip the Diffusers folder")
    ap.add_argument("--verify", action="store_true", help="round-trip through diffusers' converters")
    ap.add_argument(
        "--test-variants",
        action="store_true",
        help="also write, from the same weights, DIR/old_clip_keys/model.safetensors (SD1 only) and "
        "DIR/fp16_ema/{model.safetensors,diffusers} (one process instead of three, for tests)",
    )
    args = ap.parse_args()

    cfg = CONFIGS[args.config]
    if args.old_clip_keys and cfg["version"] != 1:
        sys.exit("--old-clip-keys applies to SD1 configs only")
    if args.test_variants and args.fp16:
        sys.exit("--test-variants needs an fp32 base (the fp16 variant is derived from it)")
    torch.set_grad_enabled(False)
    models = build_models(cfg, args.seed)
    label = f"--config {args.config} --seed {args.seed}"
    emit(args.out, cfg, models, args.seed, args.fp16, args.ema, args.ckpt, args.old_clip_keys,
         not args.no_diffusers, args.verify, label)
    if args.test_variants:
        if cfg["version"] == 1:
            emit(os.path.join(args.out, "old_clip_keys"), cfg, models, args.seed, False, False, False,
                 True, False, False, label + " --old-clip-keys")
        emit(os.path.join(args.out, "fp16_ema"), cfg, models, args.seed, True, True, False, False,
             True, False, label + " --fp16 --ema")


if __name__ == "__main__":
    main()
