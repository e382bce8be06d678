"""Step time of the Python AdamW8bit reference (/work/shared/ref/adamw8bit_ref.py) on the CPU,
printed in the same format as examples/bench_adamw8bit.rs so scripts/bench can pair them.
usage: python scripts/bench_adamw8bit_ref.py [--threads N] [--sizes 1000000,10000000] [--steps N]
"""
import argparse
import os
import sys
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--sizes", default="1000000,10000000")
ap.add_argument("--steps", type=int, default=5)
here = os.path.dirname(os.path.abspath(__file__))
ap.add_argument("--ref-dir", default=os.path.join(here, "..", "..", "shared", "ref"))
a = ap.parse_args()
sys.path.insert(0, os.path.abspath(a.ref_dir))
import adamw8bit_ref as R  # noqa: E402

torch.set_num_threads(a.threads)
torch.manual_seed(0)
for n in (int(s) for s in a.sizes.split(",")):
    p = torch.randn(n)
    g = torch.randn(n) * 1e-3
    st = R.init_state(p)
    for _ in range(2):
        R.adamw8bit_step_(p, g, st)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        R.adamw8bit_step_(p, g, st)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    print(f"impl=python_ref n={n} threads={a.threads} steps={a.steps} "
          f"median_ms={times[len(times) // 2]:.3f} min_ms={times[0]:.3f}")
