#!/usr/bin/env python3
"""Compares LoRA files and training logs of two runs (sdlora against sd-scripts, or a run against
itself under another thread count): per-tensor and overall relative difference
||a - b|| / ||b|| (b = the reference), and per-step loss/current from each run's TensorBoard
event files side by side.

Usage: scripts/compare_lora.py REF.safetensors OTHER.safetensors [--ref-logs DIR --other-logs DIR]
           [--label-ref NAME --label-other NAME] [--top N]
"""
import argparse
import glob
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file


def losses(logdir):
    files = sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True))
    if not files:
        return {}
    reader = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_read_events.py")
    out = {}
    for f in files:
        events = json.loads(subprocess.check_output([sys.executable, reader, f]))
        for e in events:
            v = e.get("scalars", {}).get("loss/current")
            if v is not None:
                out[e["step"]] = (v, e["wall_time"])
    return out


def secs_per_step(log):
    """Mean wall time between logged steps after the first (excludes warm-up and loading)."""
    s = sorted(log)
    if len(s) < 3:
        return float("nan")
    return (log[s[-1]][1] - log[s[1]][1]) / (s[-1] - s[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ref")
    ap.add_argument("other")
    ap.add_argument("--ref-logs")
    ap.add_argument("--other-logs")
    ap.add_argument("--label-ref", default="ref")
    ap.add_argument("--label-other", default="other")
    ap.add_argument("--top", type=int, default=8)
    a = ap.parse_args()
    ref, oth = load_file(a.ref), load_file(a.other)
    missing = sorted(set(ref) - set(oth))
    extra = sorted(set(oth) - set(ref))
    if missing or extra:
        print(f"key mismatch: {len(missing)} missing in {a.label_other} (e.g. {missing[:3]}), "
              f"{len(extra)} extra (e.g. {extra[:3]})")
    rows = []
    num = den = 0.0
    for k in sorted(set(ref) & set(oth)):
        r, o = ref[k].double(), oth[k].double()
        if r.shape != o.shape:
            print(f"shape mismatch {k}: {tuple(r.shape)} vs {tuple(o.shape)}")
            continue
        d = (o - r).norm().item()
        n = r.norm().item()
        num += d * d
        den += n * n
        rows.append((d / n if n > 0 else (0.0 if d == 0 else float("inf")), k))
    rows.sort(reverse=True)
    rels = [r for r, _ in rows]
    overall = (num ** 0.5) / (den ** 0.5) if den > 0 else 0.0
    print(f"tensors compared: {len(rows)}; identical: {sum(1 for r in rels if r == 0)}")
    print(f"overall ||{a.label_other} - {a.label_ref}|| / ||{a.label_ref}|| = {overall:.3e}")
    if rels:
        srt = sorted(rels)
        print(f"per-tensor relative difference: median {srt[len(srt) // 2]:.3e}, "
              f"max {srt[-1]:.3e}, min {srt[0]:.3e}")
        for kind in ("lora_down", "lora_up", "alpha"):
            sub = [r for r, k in rows if kind in k]
            if sub:
                print(f"  {kind:9s}: {len(sub)} tensors, max {max(sub):.3e}, median {sorted(sub)[len(sub) // 2]:.3e}")
        print(f"largest {a.top}:")
        for r, k in rows[: a.top]:
            print(f"  {r:.3e}  {k}")
    if a.ref_logs and a.other_logs:
        lr, lo = losses(a.ref_logs), losses(a.other_logs)
        print(f"per-step loss/current ({a.label_ref} | {a.label_other} | relative difference):")
        worst = 0.0
        for s in sorted(set(lr) | set(lo)):
            x, y = lr.get(s, (None,))[0], lo.get(s, (None,))[0]
            if x is None or y is None:
                print(f"  step {s:4d}: {x} | {y}")
                continue
            e = abs(y - x) / max(abs(x), 1e-30)
            worst = max(worst, e)
            print(f"  step {s:4d}: {x:.9f} | {y:.9f} | {e:.2e}")
        print(f"max per-step loss relative difference: {worst:.3e}")
        print(f"s/step (steps 2..N, from the event wall times): {a.label_ref} {secs_per_step(lr):.3f}, "
              f"{a.label_other} {secs_per_step(lo):.3f}")
    print("RESULT overall_rel=%.6e" % overall)


if __name__ == "__main__":
    main()
