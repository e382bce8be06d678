"""sdlora's LoRA files in the consumers' loaders (spec: peers.md §4).

The files are written by the Rust test `export_for_python` (tests/lora_network.rs); this test
runs it through cargo, then loads the files with diffusers (StableDiffusionPipeline built from
random tiny weights, load_lora_weights) and checks that every module loads, nothing is missing or
unexpected, and each weight delta diffusers applies equals up·down·alpha/rank from the file. It
also recomputes sd-scripts' sshs hashes with Python's safetensors and checks Python float repr.
"""
import hashlib
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import lora_module_list as oracle  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    env = dict(os.environ, SDLORA_LORA_OUT=str(out))
    env.setdefault("LIBTORCH", str(Path(torch.__file__).parent))
    r = subprocess.run(
        ["cargo", "test", "--release", "--test", "lora_network", "export_for_python", "--", "--ignored", "--exact"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def tiny_pipeline():
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    te, unet = oracle.build("tiny", "cpu")
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet, scheduler=DDPMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def kohya_to_module(model, prefix):
    """kohya module name → the model's module (sd-scripts naming: prefix + path, '.' → '_')."""
    return {f"{prefix}.{n}".replace(".", "_"): m for n, m in model.named_modules()}


DIFFUSERS_MIXED_RANK = pytest.mark.xfail(
    strict=True,
    reason="diffusers 0.32.1 loaders/peft.py::_maybe_adjust_config sets lora_alpha = rank for every module when "
    "ranks differ (conv_dim != network_dim), ignoring the file's alphas; sd-scripts' own files load the same way",
)


@pytest.mark.parametrize("name", ["tiny", "tiny_conv", "tiny_fp16", pytest.param("tiny_conv_mixed", marks=DIFFUSERS_MIXED_RANK)])
def test_diffusers_loads_with_exact_deltas(files, name):
    path = files / f"{name}.safetensors"
    sd = load_file(path)
    pipe = tiny_pipeline()
    cap = Capture()
    dlog = logging.getLogger("diffusers")
    plog = logging.getLogger("peft")
    dlog.addHandler(cap)
    plog.addHandler(cap)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(path), adapter_name="ours")
    dlog.removeHandler(cap)
    plog.removeHandler(cap)
    msgs = cap.records + [str(w.message) for w in caught]
    bad = [m for m in msgs if any(s in m.lower() for s in ("missing", "unexpected", "not loaded", "incompatible", "lora"))]
    assert not bad, bad

    names = sorted({k.split(".")[0] for k in sd})
    lookup = {**kohya_to_module(pipe.text_encoder, "lora_te"), **kohya_to_module(pipe.unet, "lora_unet")}
    worst = 0.0
    for n in names:
        layer = lookup[n]
        assert hasattr(layer, "get_delta_weight"), f"{n}: diffusers did not put a LoRA on this layer"
        got = layer.get_delta_weight("ours").double()
        down = sd[f"{n}.lora_down.weight"].double()
        up = sd[f"{n}.lora_up.weight"].double()
        rank = down.shape[0]
        alpha = sd[f"{n}.alpha"].double().item()
        want = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(got.shape) * (alpha / rank)
        rel = ((got - want).norm() / want.norm()).item()
        worst = max(worst, rel)
        assert rel <= 1e-6, f"{n}: relative error {rel}"
    wrapped = sum(1 for m in list(pipe.unet.modules()) + list(pipe.text_encoder.modules()) if hasattr(m, "get_delta_weight"))
    assert wrapped == len(names), f"diffusers wrapped {wrapped} layers, the file has {len(names)} modules"
    print(f"{name}: {len(names)} modules, worst relative delta error {worst:.2e}")


def test_sshs_hashes_match_sd_scripts_algorithm(files):
    for name in ["sd1", "sd1_nometa", "tiny", "tiny_fp16", "maxnorm_before"]:
        path = files / f"{name}.safetensors"
        with safe_open(path, "pt") as f:
            md = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        ss = {k: v for k, v in md.items() if k.startswith("ss_")}
        buf = save(tensors, ss)
        n = int.from_bytes(buf[:8], "little")
        assert md["sshs_model_hash"] == hashlib.sha256(buf[8 + n:]).hexdigest(), name
        assert md["sshs_legacy_hash"] == hashlib.sha256(buf[0x100000:0x110000]).hexdigest()[:8], name
        # and the data section of the file on disk is the hashed one
        raw = path.read_bytes()
        m = int.from_bytes(raw[:8], "little")
        assert hashlib.sha256(raw[8 + m:]).hexdigest() == md["sshs_model_hash"]
    assert (files / "sd1.safetensors").stat().st_size > 0x110000


def test_metadata_values_are_python_strings(files):
    with safe_open(files / "tiny_conv.safetensors", "pt") as f:
        md = f.metadata()
    assert md["ss_training_started_at"] == str(1_700_000_000.25)
    assert md["ss_training_finished_at"] == str(1_700_000_100.5)
    assert md["ss_learning_rate"] == str(1e-4)
    assert md["ss_network_dim"] == str(None)
    assert md["ss_network_alpha"] == str(1)
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "2", "dropout": None}
    assert md["ss_network_args"] == json.dumps({"conv_dim": "8", "conv_alpha": "2", "dropout": None})
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.resolution"] == "512x512"
    assert md["modelspec.sai_model_spec"] == "1.0.1"
    floats = json.loads((files / "floats.json").read_text())
    for bits, s in floats:
        import struct
        x = struct.unpack("<d", struct.pack("<Q", bits))[0]
        assert str(x) == s, (x, s)


def sd_scripts_max_norm(sd, max_norm):
    """sd-scripts LoRANetwork.apply_max_norm_regularization, on a state dict (in place)."""
    keys_scaled, norms = 0, []
    for key in [k for k in sd if "lora_down" in k and "weight" in k]:
        upk, ak = key.replace("lora_down", "lora_up"), key.replace("lora_down.weight", "alpha")
        down, up, alpha = sd[key], sd[upk], sd[ak]
        scale = alpha / down.shape[0]
        if up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
            updown = (up.squeeze(2).squeeze(2) @ down.squeeze(2).squeeze(2)).unsqueeze(2).unsqueeze(3)
        elif up.shape[2:] == (3, 3) or down.shape[2:] == (3, 3):
            updown = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            updown = up @ down
        updown *= scale
        norm = updown.norm().clamp(min=max_norm / 2)
        desired = torch.clamp(norm, max=max_norm)
        ratio = desired.cpu() / norm.cpu()
        if ratio != 1:
            keys_scaled += 1
            sd[upk] *= ratio**0.5
            sd[key] *= ratio**0.5
        norms.append((updown.norm() * ratio).item())
    return keys_scaled, sum(norms) / len(norms), max(norms)


def test_max_norm_regularization_matches_sd_scripts(files):
    sd = load_file(files / "maxnorm_before.safetensors")
    # sd-scripts iterates its state_dict in module registration order; TE first, then UNet
    order = [m["name"] for m in oracle.module_list(*oracle.build("tiny", "cpu"), 8, 2.0)]
    sd = {f"{n}.{r}": sd[f"{n}.{r}"] for n in order for r in ("alpha", "lora_down.weight", "lora_up.weight")}
    want = sd_scripts_max_norm(sd, 1.0)
    got = json.loads((files / "maxnorm.json").read_text())
    assert got[0] == want[0] and want[0] > 0
    assert abs(got[1] - want[1]) <= 1e-6 * want[1] and abs(got[2] - want[2]) <= 1e-6 * want[2], (got, want)
    after = load_file(files / "maxnorm_after.safetensors")
    for k, v in sd.items():
        torch.testing.assert_close(after[k], v, rtol=1e-6, atol=0, msg=k)


def sdlora(*args):
    exe = REPO / "target" / "release" / "sdlora"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def test_inspect_reads_other_trainers_files_and_rejects_non_loras(files, tmp_path):
    from safetensors.torch import save_file

    # A kohya-layout file as other trainers write it: fp16, no metadata, some modules without alpha.
    torch.manual_seed(0)
    sd = {}
    for i, m in enumerate(oracle.module_list(*oracle.build("tiny", "cpu"), None, None)):
        sd[m["name"] + ".lora_down.weight"] = torch.randn(m["down"]).half()
        sd[m["name"] + ".lora_up.weight"] = torch.randn(m["up"]).half()
        if i % 2 == 0:
            sd[m["name"] + ".alpha"] = torch.tensor(2.0).half()
    p = tmp_path / "other.safetensors"
    save_file(sd, p)
    r = sdlora("inspect", str(p))
    assert r.returncode == 0, r.stderr
    assert "UNet 132, text encoder 30" in r.stdout, r.stdout
    assert "none (= rank)" in r.stdout and "alpha F16" in r.stdout and "(none)" in r.stdout

    r = sdlora("inspect", str(files / "tiny_conv.safetensors"))
    assert r.returncode == 0 and "ss_network_args" in r.stdout and "modelspec.architecture" in r.stdout
    assert "sshs_model_hash" in r.stdout

    bad = {
        "loha.safetensors": ({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, "LoHa"),
        "lokr.safetensors": ({"lora_unet_x.lokr_w1": torch.zeros(2, 2)}, "LoKr"),
        "dora.safetensors": ({"lora_unet_x.dora_scale": torch.zeros(1, 2),
                              "lora_unet_x.lora_down.weight": torch.zeros(1, 2),
                              "lora_unet_x.lora_up.weight": torch.zeros(2, 1)}, "DoRA"),
        "ckpt.safetensors": ({"model.diffusion_model.out.2.weight": torch.zeros(2)}, "not a kohya-layout LoRA"),
        "peft.safetensors": ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 2)}, "diffusers/PEFT"),
    }
    for name, (tensors, word) in bad.items():
        save_file(tensors, tmp_path / name)
        r = sdlora("inspect", str(tmp_path / name))
        assert r.returncode != 0 and word in r.stderr, (name, r.stderr)


def test_dropouts_draw_like_sd_scripts(files):
    """LoRAModule.forward in training (sd-scripts): module dropout torch.rand(1) < p skips the
    module, F.dropout on the rank activations, rank dropout mask rand(B, r) > p with scale/(1-p)."""
    t = load_file(files / "dropout.safetensors")
    x, down, up, scale = t["x"], t["down"], t["up"], t["scale"].item()
    torch.manual_seed(21)
    skipped = 0
    for i in range(4):
        if torch.rand(1) < 0.3:
            want = torch.zeros_like(t[f"out{i}"])
            skipped += 1
        else:
            lx = torch.nn.functional.linear(x, down)
            lx = torch.nn.functional.dropout(lx, p=0.1)
            mask = torch.rand((lx.size(0), down.shape[0])) > 0.25
            lx = lx * mask.unsqueeze(1)
            s = scale * (1.0 / (1.0 - 0.25))
            want = torch.nn.functional.linear(lx, up) * 1.0 * s
        torch.testing.assert_close(t[f"out{i}"], want, rtol=1e-6, atol=1e-7, msg=f"forward {i}")
    assert 0 < skipped < 4, "pick a seed that exercises both branches"
