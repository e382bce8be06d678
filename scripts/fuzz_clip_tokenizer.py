#!/usr/bin/env python3
"""Random strings (seeded) with the ids transformers' slow CLIPTokenizer gives them (SD1, SD2),
for tests/tokenizer.rs. Strings mix ASCII, Latin-1, C1 controls, general punctuation, combining
marks, CJK, emoji, fullwidth forms, ligatures, tags, variation selectors and snippets that hit
ftfy's fixers (HTML entities, ANSI escapes, line breaks) and the special tokens.

Blocks with code points that Python's `regex` module (newer Unicode tables) and Rust's `regex`
crate (Unicode 16) classify differently are left out, as are strings whose ftfy result depends
on fix_encoding (mojibake repair, not reproduced): both are documented gaps.

Usage: fuzz_clip_tokenizer.py SEED COUNT OUT.json"""
import json
import os
import random
import sys

import ftfy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clip_oracle_tokenizer import load_tokenizers, needs_fix_encoding  # noqa: E402

POOLS = [
    (0x20, 0x7E), (0xA0, 0xFF), (0x80, 0x9F), (0x2000, 0x206F), (0x300, 0x36F), (0x4E00, 0x4E80),
    (0x1F300, 0x1F6FF), (0xFF00, 0xFFEF), (0x0, 0x20), (0x370, 0x3FF), (0x400, 0x4FF), (0x3040, 0x30FF),
    (0xAC00, 0xAC80), (0x600, 0x6FF), (0x900, 0x97F), (0xFB00, 0xFB4F), (0x2100, 0x218F),
    (0x2460, 0x24FF), (0xE0000, 0xE007F), (0xFE00, 0xFE0F),
]
SNIPPETS = [
    "&amp;", "&lt;", "&#39;", "&#x41;", "&quot;", "&nbsp;", "&AMP;", "&Amp;", "&eacute;", "&EACUTE;", "<", ">",
    "'s", "'S", "'ll", "\r\n", "\n", "  ", "!", "!!", "<|endoftext|>", "<|startoftext|>", "\x1b[1m", "&#", "&;",
    "&#x;", "&#1234567;", "&#xFFFFFF;", "(tag:1.2)", "1girl, ", "\u201cq\u201d",
]


def main():
    seed, count, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    sd1, sd2 = load_tokenizers()
    rng = random.Random(seed)
    cases, skipped = [], 0
    while len(cases) < count:
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.25:
                parts.append(rng.choice(SNIPPETS))
            else:
                a, b = rng.choice(POOLS)
                parts.append("".join(chr(rng.randint(a, b)) for _ in range(rng.randint(1, 5))))
        t = "".join(parts)
        if needs_fix_encoding(t):
            skipped += 1
            continue
        cases.append({"text": t, "sd1": sd1(t).input_ids[1:-1], "sd2": sd2(t).input_ids[1:-1]})
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"cases": cases, "skipped_fix_encoding": skipped}, f, ensure_ascii=False)
    print(f"{len(cases)} cases, {skipped} skipped (fix_encoding)")


if __name__ == "__main__":
    main()
