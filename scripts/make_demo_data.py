#!/usr/bin/env python3
"""Writes the demo dataset in the tutorial's layout: DIR/data/zko (N).png + zko (N).txt caption
pairs (procedurally drawn pictures, varied sizes) and DIR/config.toml as the tutorial writes it.

usage: make_demo_data.py OUT_DIR [--count 8] [--resolution 64] [--seed 0]
"""
import argparse
import os
import random

from PIL import Image, ImageDraw

TAGS = ["1girl", "solo", "skirt", "one eye closed", "smile", "long hair", "green hair", "outdoors",
        "blue sky", "holding", "looking at viewer", "upper body"]
COLORS = [(220, 60, 60), (60, 160, 80), (70, 90, 200), (230, 200, 60), (150, 70, 170), (40, 180, 190)]


def draw(rng: random.Random, w: int, h: int) -> Image.Image:
    bg = tuple(rng.randrange(256) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randrange(3, 7)):
        c = rng.choice(COLORS)
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randrange(8, w // 2 + 9), y0 + rng.randrange(8, h // 2 + 9)
        if rng.random() < 0.5:
            d.ellipse([x0, y0, x1, y1], fill=c)
        else:
            d.rectangle([x0, y0, x1, y1], fill=c)
    return img


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    data = os.path.join(a.out, "data")
    os.makedirs(data, exist_ok=True)
    for i in range(1, a.count + 1):
        # a little larger than the training resolution, some not square, as real photos are
        w = a.resolution + rng.randrange(0, a.resolution // 2)
        h = a.resolution + rng.randrange(0, a.resolution // 2)
        draw(rng, w, h).save(os.path.join(data, f"zko ({i}).png"))
        tags = ["zunko"] + rng.sample(TAGS, 4)
        with open(os.path.join(data, f"zko ({i}).txt"), "w", encoding="utf-8") as f:
            f.write(", ".join(tags) + "\n")
    with open(os.path.join(a.out, "config.toml"), "w", encoding="utf-8") as f:
        f.write(
            "[general]\n"
            "\n"
            "[[datasets]]\n"
            f"resolution = {a.resolution}\n"
            "batch_size = 1\n"
            "\n"
            "  [[datasets.subsets]]\n"
            f"  image_dir = '{os.path.abspath(data)}'\n"
            "  caption_extension = '.txt'\n"
            f"  num_repeats = {a.repeats}\n"
        )
    print(f"demo data: {a.count} images + captions in {data}, config {os.path.join(a.out, 'config.toml')}")


if __name__ == "__main__":
    main()
