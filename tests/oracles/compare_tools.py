#!/usr/bin/env python3
"""Compares two model files written by the LoRA tools (sd-scripts / tools_mirror.py / sdlora) and
prints a JSON report; exit status 1 when they do not match.

    compare_tools.py EXPECTED GOT [--svd] [--tol X] [--ignore-meta KEY ...] [--ignore-hashes]
                     [--all-tensors]

EXPECTED and GOT: .safetensors, or torch pickles (.ckpt/.pt/.pth, loaded with weights_only=True;
a dict with "state_dict" is a checkpoint: its state_dict is compared, and its other entries such
as epoch / global_step must be equal).

Checked: same tensor keys, shapes and dtypes; same metadata keys; equal metadata values except
the ignored keys (always modelspec.date and modelspec.implementation_version, whose values
depend on the run; with --ignore-hashes or --svd also sshs_model_hash / sshs_legacy_hash, which
change with any bit of any tensor; --ignore-meta adds keys, a trailing * matches a prefix);
relative difference ||a-b|| / ||b|| (b = EXPECTED, float64) per tensor and overall, which must
not exceed --tol (default 1e-6).

--svd (SVD-produced LoRAs, whose factors are only defined up to sign/rotation): LoRA modules
(`<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`) are compared through their
reconstructed delta up@down * alpha/rank (flattened to 2-D for convs) instead of factor by
factor; the report lists per-module ranks and relative differences (default --tol 1e-4).
Tensors that are not part of a LoRA module are still compared directly.

Report keys: same_keys, only_in_expected, only_in_got, shape_mismatch, dtype_mismatch,
metadata_keys_equal, metadata_only_in_expected, metadata_only_in_got, metadata_values_differ
({key: [expected, got]}), extras_differ, max_rel_diff, worst (10 largest per-tensor or
per-module differences), rank_mismatch (--svd), tensors / modules (counts), ok.
--all-tensors adds rel_diff: every per-tensor (per-module) figure.
"""
import argparse
import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

ALWAYS_IGNORED = ["modelspec.date", "modelspec.implementation_version"]
HASH_KEYS = ["sshs_model_hash", "sshs_legacy_hash"]


def load(path):
    """(tensors, metadata, extras): extras = a checkpoint pickle's non-state_dict entries."""
    if os.path.splitext(path)[1].lower() == ".safetensors":
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(path), meta, {}
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj:
        extras = {k: v for k, v in obj.items() if k != "state_dict"}
        return dict(obj["state_dict"]), {}, extras
    return dict(obj), {}, {}


def rel_diff(a, b):
    a, b = a.double(), b.double()
    num, den = torch.linalg.vector_norm(a - b).item(), torch.linalg.vector_norm(b).item()
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def lora_modules(sd):
    """name -> (down, up, alpha or None) for every module with both factors."""
    out = {}
    for k in sd:
        if k.endswith(".lora_down.weight"):
            name = k[: -len(".lora_down.weight")]
            up = sd.get(name + ".lora_up.weight")
            if up is not None:
                out[name] = (sd[k], up, sd.get(name + ".alpha"))
    return out


def delta(down, up, alpha):
    rank = down.shape[0]
    scale = 1.0 if alpha is None else alpha.double().item() / rank
    return (up.double().flatten(1) @ down.double().flatten(1)) * scale


def ignored(key, patterns):
    return any(key == p or (p.endswith("*") and key.startswith(p[:-1])) for p in patterns)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("expected")
    ap.add_argument("got")
    ap.add_argument("--svd", action="store_true")
    ap.add_argument("--tol", type=float, default=None)
    ap.add_argument("--ignore-meta", nargs="*", default=[], metavar="KEY")
    ap.add_argument("--ignore-hashes", action="store_true")
    ap.add_argument("--all-tensors", action="store_true")
    a = ap.parse_args()
    tol = a.tol if a.tol is not None else (1e-4 if a.svd else 1e-6)
    patterns = ALWAYS_IGNORED + list(a.ignore_meta) + (HASH_KEYS if a.ignore_hashes or a.svd else [])

    ea, ma, xa = load(a.expected)
    eb, mb, xb = load(a.got)
    ka, kb = set(ea), set(eb)
    common = sorted(ka & kb)
    rep = {
        "same_keys": ka == kb,
        "only_in_expected": sorted(ka - kb),
        "only_in_got": sorted(kb - ka),
        "shape_mismatch": {k: [list(ea[k].shape), list(eb[k].shape)] for k in common if ea[k].shape != eb[k].shape},
        "dtype_mismatch": {k: [str(ea[k].dtype), str(eb[k].dtype)] for k in common if ea[k].dtype != eb[k].dtype},
        "metadata_keys_equal": set(ma) == set(mb),
        "metadata_only_in_expected": sorted(set(ma) - set(mb)),
        "metadata_only_in_got": sorted(set(mb) - set(ma)),
        "metadata_values_differ": {k: [ma[k], mb[k]] for k in sorted(set(ma) & set(mb))
                                   if ma[k] != mb[k] and not ignored(k, patterns)},
        "metadata_ignored": patterns,
        "extras_differ": {k: [str(xa.get(k)), str(xb.get(k))] for k in sorted(set(xa) | set(xb))
                          if str(xa.get(k)) != str(xb.get(k))},
    }

    diffs = {}
    covered = set()
    if a.svd:
        mods_a, mods_b = lora_modules(ea), lora_modules(eb)
        ranks = {}
        for name in sorted(set(mods_a) & set(mods_b)):
            da, ua, aa = mods_a[name]
            db, ub, ab = mods_b[name]
            ranks[name] = [da.shape[0], db.shape[0]]
            covered.update(name + s for s in (".lora_down.weight", ".lora_up.weight", ".alpha"))
            try:
                diffs[name] = rel_diff(delta(db, ub, ab), delta(da, ua, aa))
            except RuntimeError:  # incompatible shapes: already reported as a shape mismatch
                diffs[name] = float("inf")
        rep["rank_mismatch"] = {n: r for n, r in ranks.items() if r[0] != r[1]}
        rep["modules"] = len(ranks)
        # in --svd mode factor shapes follow the ranks, reported above
        rep["shape_mismatch"] = {k: v for k, v in rep["shape_mismatch"].items() if k not in covered}
    for k in common:
        if k in covered or ea[k].shape != eb[k].shape:
            continue
        diffs[k] = rel_diff(eb[k], ea[k])
    rep["tensors"] = len(common)
    rep["max_rel_diff"] = max(diffs.values(), default=0.0)
    rep["worst"] = dict(sorted(diffs.items(), key=lambda kv: -kv[1])[:10])
    if a.all_tensors:
        rep["rel_diff"] = diffs
    rep["tol"] = tol
    rep["ok"] = bool(
        rep["same_keys"] and not rep["shape_mismatch"] and not rep["dtype_mismatch"]
        and rep["metadata_keys_equal"] and not rep["metadata_values_differ"] and not rep["extras_differ"]
        and not rep.get("rank_mismatch") and rep["max_rel_diff"] <= tol
    )
    print(json.dumps(rep, indent=1, default=str))
    sys.exit(0 if rep["ok"] else 1)


if __name__ == "__main__":
    main()
