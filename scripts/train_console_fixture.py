#!/usr/bin/env python3
"""Writes tests/fixtures/train/format_num.json: tqdm's postfix number formatting
(tqdm.std.tqdm.format_num) for loss-like values, as [value, text] pairs.

Usage: scripts/train_console_fixture.py  (needs tqdm)
"""
import json
import os

from tqdm import tqdm

VALUES = [0.1234, 0.05, 0.123456789, 1.0, 0.0, 12.5, 123.456, 1234.5, 0.00012345, 1e-05, 3.3e-07, 0.1, 0.30000000000000004, 0.0999999, 2.0e20, 0.004660]


def main():
    out = [[v, tqdm.format_num(v)] for v in VALUES]
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train", "format_num.json")
    with open(path, "w") as f:
        json.dump(out, f)
    print(out)


if __name__ == "__main__":
    main()
