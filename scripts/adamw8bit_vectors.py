"""Edge-case vectors for sdlora's AdamW8bit, computed with the project's CUDA-semantics reference
(/work/shared/ref/adamw8bit_ref.py, see /work/shared/spec/adamw8bit.md).

The reference file adamw8bit_ref.safetensors covers the default path; this adds what it does not:
NaN/+Inf/-Inf gradients, an all-zero block, -0.0 and tiny negative gradients (sign fix), a
partial tail block, an lr that changes every step, weight_decay 0, non-default betas/eps, a 2-D
parameter, min_8bit_size boundaries and fp16/bf16 parameters.

usage: python scripts/adamw8bit_vectors.py OUT.safetensors [--ref-dir DIR]
"""
import argparse
import os
import sys

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--ref-dir", default=os.path.join(here, "..", "..", "shared", "ref"))
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.ref_dir))
    import adamw8bit_ref as R  # noqa: E402

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1234)
    out = {}

    def case(name, shape, steps, dtype=torch.float32, lrs=None, betas=(0.9, 0.999), eps=1e-8,
             wd=1e-2, min8=4096, edit_grads=None, given=None):
        n = 1
        for s in shape:
            n *= s
        if given is None:
            p = torch.randn(shape, generator=gen).to(dtype)
            scale = torch.logspace(-4, 0, n).view(shape)
            grads = (torch.randn((steps,) + tuple(shape), generator=gen) * scale).to(dtype)
        else:
            p, grads = (t.to(dtype) for t in given)
        if edit_grads is not None:
            edit_grads(grads)
        lrs = lrs or [1e-3] * steps
        out[f"{name}.p0"] = p.clone()
        out[f"{name}.grads"] = grads.clone()
        out[f"{name}.lr"] = torch.tensor(lrs, dtype=torch.float64)
        out[f"{name}.hp"] = torch.tensor([betas[0], betas[1], eps, wd, float(min8)], dtype=torch.float64)
        st = R.init_state(p, min8)
        for t in range(steps):
            R.adamw8bit_step_(p, grads[t], st, lrs[t], betas, eps, wd)
            pre = f"{name}.step{t + 1}."
            out[pre + "p"] = p.clone()
            out[pre + "state1"] = st.state1.clone()
            out[pre + "state2"] = st.state2.clone()
            if st.eightbit:
                out[pre + "absmax1"] = st.absmax1.clone()
                out[pre + "absmax2"] = st.absmax2.clone()

    def nasty(g):
        # g: [steps, n]; n = 4396 -> 18 blocks, the last one with 44 elements
        g[1, 5] = float("nan")
        g[1, 600] = float("inf")
        g[2, 601] = float("-inf")
        g[3, 5] = float("nan")
        g[:, 768:1024] = 0.0           # block 3 all zero: 0/0 -> code 0 -> sign fix to 255
        g[:, 1024:1100] = -0.0         # -0.0 gradients: m = -0 -> code 126
        g[:, 1100:1279] = -1e-30       # tiny negatives next to a large value: they round to
        g[:, 1279] = 0.5               # +0.0 (code 127) and the sign fix stores 126
        g[0, 4352:] = 1.0              # tail block: m = 0.1 everywhere at step 1, then a gradient
        g[1, 4352:] = -0.9             # that cancels it, so every |m| falls below the idle-lane
        g[2, 4352:] = 0.0              # padding value and the padding sets the block's absmax

    case("nasty", (4396,), 5, edit_grads=nasty,
         lrs=[1e-3, 5e-4, 2e-3, 1e-2, 3e-4])
    def signs(g):
        # no all-zero block, so the CPU fast path with the sign fix folded into its table runs
        # (block 0 keeps its last 6 random gradients, so its absmax is not tiny)
        g[:, 0:100] = -0.0             # m = -0.0 -> code 126
        g[:, 100:200] = -1e-30         # tiny negative m rounds to +0.0 -> 126
        g[:, 200:250] = 1e-30          # tiny positive m stays at +0.0 (127)
        g[:, 300:400] = 0.0

    case("signfix", (4096,), 3, edit_grads=signs)
    case("betas", (64, 80), 4, betas=(0.8, 0.95), eps=1e-6, wd=0.1, lrs=[1e-2, 2e-2, 5e-3, 1e-3])
    case("nowd", (4097,), 3, wd=0.0)
    case("exact4096", (4096,), 3)
    case("small4095", (4095,), 3)
    case("min8small", (300,), 3, min8=256)  # 8-bit path with a custom threshold, one tail block
    case("fp16", (5000,), 3, dtype=torch.float16)
    case("bf16", (4500,), 3, dtype=torch.bfloat16, lrs=[1e-2, 1e-2, 1e-2])
    case("smallbf16", (1000,), 3, dtype=torch.bfloat16, lrs=[1e-2, 1e-2, 1e-2])

    # The stored reference inputs, re-run with the local torch (the file was made with 2.13).
    from safetensors.torch import load_file
    ref = load_file(os.path.join(os.path.abspath(a.ref_dir), "adamw8bit_ref.safetensors"))
    for dtype, n in ((torch.float32, 5000), (torch.bfloat16, 5000), (torch.float32, 1000)):
        tag = str(dtype).split(".")[-1]
        case(f"file_{tag}_n{n}", (n,), 3, dtype=dtype,
             given=(ref["adam_p0"][:n].clone(), ref["adam_grads"][:, :n].clone()))

    out = {k: v.contiguous() for k, v in out.items()}
    save_file(out, a.out)


if __name__ == "__main__":
    main()
