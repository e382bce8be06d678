#!/usr/bin/env python
"""Records how sd-scripts' base-model loading consumes the global torch CPU generator.

sd-scripts seeds torch (accelerate `set_seed`) at the top of `NetworkTrainer.train`, then builds
the U-Net, VAE and text encoder with PyTorch's default random init before loading the checkpoint
into them; the LoRA init and the timesteps come from the generator state that leaves
(spec: sdscripts_cli_data.md §6.3). sdlora replays those fills (`sdlora::train::rng_replay`);
this script produces what the replay must match, by running sd-scripts' own code:

  for each case (a model file/folder, --v2 or not) and each seed:
    set_seed(seed)                                  accelerate's, as train() calls it
    prepare_accelerator(args)                       as train() does, before loading
    NetworkTrainer().load_target_model(args, fp32, accelerator)
    record torch.rand(16)                           the generator state after loading

and once per case, under a TorchDispatchMode, the list of every generator-consuming aten op
(tagged `nondeterministic_seeded`) on CPU tensors: op, shape, dtype and its arguments. That
trace is checked here (replaying it on scratch tensors from the seed must give the same
`rand(16)`, so nothing was missed) and stored so the Rust test can diff its plan op by op.

Output: tests/fixtures/rng_replay.json (small; `rand16` as float32 bit patterns).

Usage (full-size models: hold the big-memory lock, peak ~9 GB):
  flock /tmp/sdlora-bigmem.lock python scripts/make_rng_replay_fixture.py \
      --case sd15_single=/tmp/ref/sd15/model.safetensors \
      --case sd15_diffusers=/tmp/ref/sd15/diffusers \
      --case sd21_single=v2:/tmp/rng/sd21/model.safetensors \
      --case sd21_diffusers=v2:/tmp/rng/sd21/diffusers \
      [--seeds 0,42,1234] [--out tests/fixtures/rng_replay.json]
Environment: SDSCRIPTS_DIR (default /tmp/sd-scripts), SDSCRIPTS_EXTRA (extra site dir with
sd-scripts' pinned packages, default /tmp/sdscripts-extra, used when it exists). Models come from
scripts/make_sd_checkpoint.py --config sd15|sd21.
"""
import argparse
import json
import os
import struct
import sys
import tempfile
import time

SDSCRIPTS_DIR = os.environ.get("SDSCRIPTS_DIR", "/tmp/sd-scripts")
SDSCRIPTS_EXTRA = os.environ.get("SDSCRIPTS_EXTRA", "/tmp/sdscripts-extra")
for p in (SDSCRIPTS_DIR, SDSCRIPTS_EXTRA):
    if os.path.isdir(p) and p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64", torch.int64: "i64"}


def f32_bits(t):
    return [struct.unpack("<I", struct.pack("<f", float(x)))[0] for x in t.tolist()]


class RngTrace(TorchDispatchMode):
    """Logs every aten op that draws from a generator (torch tags them `nondeterministic_seeded`)."""

    def __init__(self):
        super().__init__()
        self.cpu = []
        self.other_devices = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags:
            t = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if t is None:
                raise RuntimeError(f"unexpected generator op without a tensor self: {func} {args} {kwargs}")
            if kwargs.get("generator") is not None:
                raise RuntimeError(f"{func} uses an explicit generator; the trace assumes the global one")
            if t.device.type == "cpu":
                if not t.is_contiguous():
                    raise RuntimeError(f"{func} on a non-contiguous tensor: a scratch-buffer replay would differ")
                scalars = [a for a in args[1:] if isinstance(a, (int, float))]
                # Compact entry: [op, dtype, shape, scalar args].
                self.cpu.append([func.overloadpacket.__name__, DTYPE_NAMES.get(t.dtype, str(t.dtype)), list(t.shape), scalars])
            else:
                self.other_devices += 1
        return func(*args, **kwargs)


def replay_trace(trace, seed):
    """Re-issues the traced fills on fresh scratch tensors; the generator must end where sd-scripts left it."""
    torch.manual_seed(seed)
    inv = {v: k for k, v in DTYPE_NAMES.items()}
    for op, dtype, shape, scalars in trace:
        buf = torch.empty(shape, dtype=inv[dtype])
        getattr(buf, op)(*scalars)
    return torch.rand(16)


def make_args(path, v2, outdir):
    import train_network

    parser = train_network.setup_parser()
    argv = [
        f"--pretrained_model_name_or_path={path}",
        "--network_module=networks.lora",
        f"--output_dir={outdir}",
        "--mixed_precision=no",
        "--seed=0",
        "--resolution=64,64",
    ]
    if v2:
        argv.append("--v2")
    args = parser.parse_args(argv)
    from library import train_util, deepspeed_utils

    # The same preparation train() runs before loading (none of it is expected to draw).
    train_util.verify_training_args(args)
    train_util.prepare_dataset_args(args, True)
    deepspeed_utils.prepare_deepspeed_args(args)
    return args


def load_like_train(args, seed):
    """set_seed -> prepare_accelerator -> load_target_model, exactly the calls train() makes."""
    import train_network
    from accelerate.utils import set_seed
    from library import train_util

    set_seed(seed)
    accelerator = train_util.prepare_accelerator(args)
    weight_dtype, _ = train_util.prepare_dtype(args)
    trainer = train_network.NetworkTrainer()
    _version, text_encoder, vae, unet = trainer.load_target_model(args, weight_dtype, accelerator)
    return text_encoder, vae, unet


def lora_first_module(text_encoder, vae, unet, network_dim=4):
    """The first LoRA module sd-scripts creates right after loading (networks.lora, defaults)."""
    from networks import lora

    net = lora.create_network(1.0, network_dim, 1, vae, text_encoder, unet)
    m = net.text_encoder_loras[0] if net.text_encoder_loras else net.unet_loras[0]
    down = m.lora_down.weight.detach().reshape(-1)[:16].clone()
    return {"name": m.lora_name, "lora_down_first16_bits": f32_bits(down), "rand16_after_bits": f32_bits(torch.rand(16))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", required=True, help="NAME=[v2:]PATH (single file or Diffusers folder)")
    ap.add_argument("--seeds", default="0,42,1234")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "rng_replay.json"))
    ap.add_argument("--lora", action="store_true", help="also record the first LoRA module's init per seed")
    opts = ap.parse_args()
    seeds = [int(s) for s in opts.seeds.split(",")]
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    import accelerate
    import diffusers
    import transformers

    cases = []
    with tempfile.TemporaryDirectory() as outdir:
        for spec in opts.case:
            name, rest = spec.split("=", 1)
            v2 = rest.startswith("v2:")
            path = rest[3:] if v2 else rest
            fmt = "single_file" if os.path.isfile(path) else "diffusers"
            args = make_args(path, v2, outdir)
            t0 = time.time()
            tracer = RngTrace()
            with tracer:
                te, vae, unet = load_like_train(args, seeds[0])
            traced_rand = torch.rand(16)
            del te, vae, unet
            print(f"{name}: {len(tracer.cpu)} CPU generator ops traced ({time.time() - t0:.1f}s)", file=sys.stderr)
            replayed = replay_trace(tracer.cpu, seeds[0])
            if not torch.equal(replayed, traced_rand):
                raise SystemExit(f"{name}: the trace is incomplete: replaying it does not reach sd-scripts' generator state")
            case = {
                "name": name,
                "format": fmt,
                "v2": v2,
                "unet_use_linear_projection_in_v2": False,
                "trace_non_cpu_ops": tracer.other_devices,
                "trace": tracer.cpu,
                "seeds": [],
            }
            for seed in seeds:
                # Plain run (no dispatch mode): the numbers the Rust replay must reproduce.
                te, vae, unet = load_like_train(args, seed)
                state = torch.get_rng_state()
                entry = {"seed": seed, "rand16_bits": f32_bits(torch.rand(16))}
                if opts.lora:
                    torch.set_rng_state(state)
                    entry["lora_first"] = lora_first_module(te, vae, unet)
                del te, vae, unet
                if seed == seeds[0] and entry["rand16_bits"] != f32_bits(traced_rand):
                    raise SystemExit(f"{name}: tracing changed the generator consumption")
                check = replay_trace(tracer.cpu, seed)
                if f32_bits(check) != entry["rand16_bits"]:
                    raise SystemExit(f"{name}: seed {seed}: trace replay differs from sd-scripts")
                case["seeds"].append(entry)
                print(f"{name}: seed {seed} ok", file=sys.stderr)
            cases.append(case)

    out = {
        "generated_by": "scripts/make_rng_replay_fixture.py",
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
        },
        "cases": cases,
    }
    tmp = opts.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp, opts.out)
    print(f"wrote {opts.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
