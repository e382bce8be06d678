#!/usr/bin/env python3
"""Reference for sdlora's data pipeline: sd-scripts' data rules (spec: sdscripts_cli_data.md
§2-§4, §6) written out with the real libraries sd-scripts uses (Python `random`, torch's
DataLoader/RandomSampler, PIL, OpenCV, numpy, tomllib).

Commands (all print JSON on stdout):
  fixture DIR                      write the test image folders and configs under DIR
  random SEEDS...                  CPython random streams for the Rust port
  sampler EPOCHS WORKERS SEED:L... torch DataLoader visiting order (batch_size=1, shuffle=True)
  dataset JOBS.json                build datasets as sd-scripts does and replay epochs (a job or a list)
  worker-probe SEED N EPOCHS WORKERS PERSISTENT   real DataLoader workers: index, worker, random()
  captions CASES.json              process_caption with Python's random, per case
  color-aug IMG SEED N OUT.npz     AugHelper.color_aug N times with OpenCV
  tokens CAPTIONS.json             sd-scripts' (n, 77) input_ids windows, v1/v2, 75/150/225 tokens
  npz-write PATH                   write an sd-scripts style latent cache
  npz-read PATH                    read a latent cache written by sdlora
"""
import glob
import json
import math
import os
import random
import re
import sys
import tomllib
from textwrap import dedent, indent

import cv2
import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP"]


# ---------------------------------------------------------------------------------------------
# fixtures

def _noise_image(w, h, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    # smooth gradients plus noise, so resampling errors are visible but not dominated by noise
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 / max(w - 1, 1)), (y * 255 / max(h - 1, 1)), ((x + y) * 127 / max(w + h - 2, 1))], -1)
    arr = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode == "RGBA":
        a = (rng.random((h, w)) * 255).astype(np.uint8)
        img = Image.fromarray(np.dstack([arr, a]))
    elif mode == "L":
        img = img.convert("L")
    elif mode == "P":
        img = img.convert("P", palette=Image.ADAPTIVE, colors=64)
    return img


def fixture(root):
    def put(rel, w, h, seed, mode="RGB", fmt=None, caption=None, cap_ext=".txt", **save):
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        _noise_image(w, h, seed, mode).save(p, format=fmt, **save)
        if caption is not None:
            with open(os.path.splitext(p)[0] + cap_ext, "w", encoding="utf-8") as f:
                f.write(caption + "\n")

    # the tutorial's layout: data/zko (n).png + .txt
    put("data/zko (1).png", 300, 200, 1, caption="zko, 1girl, smile, outdoors")
    put("data/zko (2).png", 257, 383, 2, mode="RGBA", caption="zko, standing, red dress")
    put("data/zko (3).jpg", 320, 240, 3, fmt="JPEG", quality=92, caption="zko, sitting, chair, indoors")
    put("data/zko (4).webp", 200, 300, 4, fmt="WEBP", lossless=True)  # no caption -> class tokens
    put("data/zko (5).png", 150, 150, 5, mode="L", caption="zko, portrait, monochrome")
    put("data/zko (6).bmp", 512, 128, 6, fmt="BMP", caption="zko, lying, wide")
    put("data/zko (7).PNG", 333, 222, 7, mode="P", fmt="PNG", caption="zko, palette")
    put("data/.hidden.png", 64, 64, 8)
    put("data/notes.gif", 64, 64, 9, fmt="GIF")
    put("reg/r1.png", 256, 256, 11)
    put("reg/r2.jpg", 300, 280, 12, fmt="JPEG", quality=90)
    put("reg/r3.png", 180, 260, 13)
    put("data2/a.png", 400, 300, 21, caption="scene a, tree, sky")
    put("data2/b.png", 190, 250, 22, caption="scene b, house")
    put("data2/c.webp", 640, 360, 23, fmt="WEBP", lossless=True, caption="scene c, river")
    # sd-scripts' N_name folders (captions with the default .caption extension)
    put("train/10_zko girl/x1.png", 260, 300, 31, caption="x1 tag, blue", cap_ext=".caption")
    put("train/10_zko girl/x2.png", 300, 260, 32)
    put("train/2_style/y1.jpg", 256, 320, 33, fmt="JPEG", quality=95, caption="y1, style", cap_ext=".caption")
    put("train/notrepeat/z.png", 100, 100, 34)
    put("regdir/1_woman/w1.png", 240, 320, 41)
    put("regdir/1_woman/w2.png", 320, 240, 42)
    # a corrupt file: a truncated PNG
    p = os.path.join(root, "corrupt/bad.png")
    os.makedirs(os.path.dirname(p), exist_ok=True)
    _noise_image(64, 64, 51).save(p)
    with open(p, "rb") as f:
        b = f.read()
    with open(p, "wb") as f:
        f.write(b[: len(b) // 2])
    put("corrupt/good.png", 64, 64, 52, caption="good")
    return {"root": root}


# ---------------------------------------------------------------------------------------------
# random / sampler streams

def random_streams(seeds):
    out = {}
    for s in seeds:
        r = random.Random(s)
        # floats as repr strings: they round-trip exactly through any parser
        d = {"random": [repr(r.random()) for _ in range(5)]}
        d["randint_2_31"] = [r.randint(0, 2**31) for _ in range(3)]
        d["getrandbits"] = [str(r.getrandbits(k)) for k in (1, 7, 32, 33, 64, 100)]
        lst = list(range(23))
        r.shuffle(lst)
        d["shuffle23"] = lst
        d["randint_small"] = [r.randint(0, 5) for _ in range(10)]
        d["uniform"] = [repr(r.uniform(-8, 8)) for _ in range(3)]
        d["choice"] = [r.choice(["a", "b", "c", "d", "e"]) for _ in range(6)]
        out[str(s)] = d
    return out


class _Idx(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


class _Probe(torch.utils.data.Dataset):
    """Reports which worker fetched an index and that worker's next Python random draw."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        info = torch.utils.data.get_worker_info()
        return [i, -1 if info is None else info.id, repr(random.random())]


def worker_probe(seed, n, epochs, workers, persistent):
    """The real DataLoader with workers: per epoch [index, worker id, random() in that worker]."""
    torch.manual_seed(seed)
    random.seed(seed)
    dl = torch.utils.data.DataLoader(_Probe(n), batch_size=1, shuffle=True, num_workers=workers,
                                     persistent_workers=persistent, collate_fn=lambda x: x[0])
    return [[b for b in dl] for _ in range(epochs)]


def sampler_order(seed, n, epochs, workers):
    torch.manual_seed(seed)
    dl = torch.utils.data.DataLoader(_Idx(n), batch_size=1, shuffle=True, num_workers=workers, collate_fn=lambda x: x[0])
    out = []
    for _ in range(epochs):
        out.append([int(i) for i in dl])
    # the generator state after the epochs, to check both draws per epoch were consumed
    out.append([int(torch.empty((), dtype=torch.int64).random_().item())])
    return out


# ---------------------------------------------------------------------------------------------
# config: schema subset needed by the tests + sd-scripts' precedence (spec §2.3, §2.4)

SUBSET_DEFAULTS = dict(
    image_dir=None, num_repeats=1, shuffle_caption=False, caption_separator=",", keep_tokens=0, keep_tokens_separator="",
    secondary_separator=None, enable_wildcard=False, color_aug=False, flip_aug=False, face_crop_aug_range=None,
    random_crop=False, caption_prefix=None, caption_suffix=None, caption_dropout_rate=0.0,
    caption_dropout_every_n_epochs=0, caption_tag_dropout_rate=0.0, token_warmup_min=1, token_warmup_step=0,
    custom_attributes=None, resize_interpolation=None, alpha_mask=False, is_reg=False, class_tokens=None,
    caption_extension=".caption", cache_info=False,
)
DATASET_DEFAULTS = dict(
    resolution=None, batch_size=1, enable_bucket=False, min_bucket_reso=256, max_bucket_reso=1024,
    bucket_reso_steps=64, bucket_no_upscale=False, resize_interpolation=None, network_multiplier=1.0,
)
CLI_DEFAULTS = dict(
    num_repeats=1, batch_size=1, caption_extension=".caption", shuffle_caption=False, caption_separator=",",
    keep_tokens=0, keep_tokens_separator="", enable_wildcard=False, color_aug=False, flip_aug=False, random_crop=False,
    caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0, caption_tag_dropout_rate=0.0, token_warmup_min=1,
    token_warmup_step=0, enable_bucket=False, min_bucket_reso=256, max_bucket_reso=1024, bucket_reso_steps=64,
    bucket_no_upscale=False, alpha_mask=False, cache_info=False,
)


def search(key, chain, default):
    for c in chain:
        v = c.get(key)
        if v is not None:
            return v
    return default


def blueprint(job, log):
    cli = dict(CLI_DEFAULTS)
    cli.update(job.get("cli", {}))
    if job.get("dataset_config"):
        log.info(f"Loading dataset config from {job['dataset_config']}")
        with open(job["dataset_config"], "rb") as f:
            user = tomllib.load(f)
    else:
        log.info("Using DreamBooth method.")
        subsets = []
        for base, is_reg in ((job.get("train_data_dir"), False), (job.get("reg_data_dir"), True)):
            if base is None:
                continue
            for name in sorted(os.listdir(base)):  # sdlora sorts; sd-scripts uses iterdir order
                sub = os.path.join(base, name)
                if not os.path.isdir(sub):
                    continue
                tokens = name.split("_")
                try:
                    n = int(tokens[0])
                except ValueError:
                    log.warning(f"ignore directory without repeats / 繰り返し回数のないディレクトリを無視します: {name}")
                    continue
                if n < 1:
                    continue
                subsets.append({"image_dir": sub, "num_repeats": n, "is_reg": is_reg, "class_tokens": "_".join(tokens[1:])})
        user = {"datasets": [{"subsets": subsets}]}
    general = user.get("general", {})
    out = []
    for d in user.get("datasets", []):
        dp = {k: search(k, [d, general, cli], v) for k, v in DATASET_DEFAULTS.items()}
        r = dp["resolution"]
        dp["resolution"] = (r, r) if isinstance(r, int) else tuple(r)
        sps = [{k: search(k, [s, d, general, cli], v) for k, v in SUBSET_DEFAULTS.items()} for s in d.get("subsets", [])]
        out.append((dp, sps))
    return out


# ---------------------------------------------------------------------------------------------
# datasets (spec §3.1-§3.6)

class Log:
    def __init__(self):
        self.lines = []

    def info(self, m):
        self.lines.append(m)

    warning = info


def glob_images(directory):
    paths = []
    for ext in IMAGE_EXTENSIONS:
        paths.extend(glob.glob(os.path.join(glob.escape(directory), "*" + ext)))
    return sorted(set(paths))


def read_caption(img_path, ext):
    base = os.path.splitext(img_path)[0]
    tokens = base.split("_")
    face = "_".join(tokens[:-4]) if len(tokens) >= 5 else base
    for cand in (base + ext, face + ext):
        if os.path.isfile(cand):
            with open(cand, "rt", encoding="utf-8") as f:
                return f.readlines()[0].strip()
    return None


def bucket_resolutions(max_reso, min_size, max_size, d):
    mw, mh = max_reso
    area = mw * mh
    s = set()
    w = int(math.sqrt(area) // d) * d
    s.add((w, w))
    w = min_size
    while w <= max_size:
        h = min(max_size, int((area // w) // d) * d)
        if h >= min_size:
            s.add((w, h))
            s.add((h, w))
        w += d
    return sorted(s)


def select_bucket(img_w, img_h, predefined, no_upscale, max_area, steps):
    ar = img_w / img_h
    if not no_upscale:
        reso = (img_w, img_h)
        if reso not in predefined:
            ars = np.array([w / h for w, h in predefined])
            reso = predefined[int(np.abs(ars - ar).argmin())]
        scale = reso[1] / img_h if ar > reso[0] / reso[1] else reso[0] / img_w
        resized = (int(img_w * scale + 0.5), int(img_h * scale + 0.5))
    else:
        def rts(x):
            x = int(x + 0.5)
            return x - x % steps
        if img_w * img_h > max_area:
            rw = math.sqrt(max_area * ar)
            rh = max_area / rw
            bw = rts(rw)
            bh_w = rts(bw / ar)
            bh = rts(rh)
            bw_h = rts(bh * ar)
            if abs(bw / bh_w - ar) < abs(bw_h / bh - ar):
                resized = (bw, int(bw / ar + 0.5))
            else:
                resized = (int(bh * ar + 0.5), bh)
        else:
            resized = (img_w, img_h)
        reso = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    return reso, resized, reso[0] / reso[1] - ar


class DS:
    pass


def build(job, log):
    bps = blueprint(job, log)
    prior = job.get("cli", {}).get("prior_loss_weight", 1.0)
    datasets = []
    for dp, sps in bps:
        ds = DS()
        ds.p = dp
        ds.width, ds.height = dp["resolution"]
        ds.batch_size = dp["batch_size"]
        ds.prior = prior
        if dp["enable_bucket"]:
            mn, mx, st = dp["min_bucket_reso"], dp["max_bucket_reso"], dp["bucket_reso_steps"]
            if mn % st:
                mn -= mn % st
            if mx % st:
                mx += st - mx % st
            ds.mn, ds.mx, ds.st, ds.nu = mn, mx, st, dp["bucket_no_upscale"]
        else:
            ds.mn = ds.mx = ds.st = None
            ds.nu = False
        log.info("prepare images.")
        ds.images = {}  # key -> dict (insertion ordered)
        ds.subsets = []
        reg = []
        ntrain = nreg = 0
        for sp in sps:
            if sp["num_repeats"] < 1 or any(s["image_dir"] == sp["image_dir"] for s, _ in ds.subsets):
                continue
            paths = glob_images(sp["image_dir"]) if os.path.isdir(sp["image_dir"]) else []
            log.info("get image size from name of cache files")
            log.info(f"set image size from cache files: 0/{len(paths)}")
            log.info(f"found directory {sp['image_dir']} contains {len(paths)} image files")
            caps, missing = [], []
            for p in paths:
                c = read_caption(p, sp["caption_extension"])
                if c is None:
                    missing.append(p)
                    if sp["class_tokens"] is None:
                        log.warning(f"neither caption file nor class tokens are found. use empty caption for {p} / キャプションファイルもclass tokenも見つかりませんでした。空のキャプションを使用します: {p}")
                        c = ""
                    else:
                        c = sp["class_tokens"]
                caps.append(c)
            if missing:
                n = len(missing)
                log.warning(f"No caption file found for {n} images. Training will continue without captions for these images. If class token exists, it will be used. / {n}枚の画像にキャプションファイルが見つかりませんでした。これらの画像についてはキャプションなしで学習を続行します。class tokenが存在する場合はそれを使います。")
                for i, m in enumerate(missing):
                    if i >= 5:
                        log.warning(m + f"... and {n - 5} more")
                        break
                    log.warning(m)
            if not paths:
                continue
            si = len(ds.subsets)
            for p, c in zip(paths, caps):
                info = dict(key=p, repeats=sp["num_repeats"], caption=c, is_reg=sp["is_reg"], subset=si)
                if sp["is_reg"]:
                    reg.append(info)
                else:
                    ds.images[p] = info
            if sp["is_reg"]:
                nreg += sp["num_repeats"] * len(paths)
            else:
                ntrain += sp["num_repeats"] * len(paths)
            ds.subsets.append((sp, len(paths)))
        log.info(f"{ntrain} train images with repeats.")
        log.info(f"{nreg} reg images with repeats.")
        if ntrain < nreg:
            log.warning("some of reg images are not used / 正則化画像の数が多いので、一部使用されない正則化画像があります")
        if nreg == 0:
            log.warning("no regularization images / 正則化画像が見つかりませんでした")
        else:
            n, first = 0, True
            while n < ntrain:
                for info in reg:
                    if first:
                        ds.images[info["key"]] = info
                        n += info["repeats"]
                    else:
                        info["repeats"] += 1
                        n += 1
                    if n >= ntrain:
                        break
                first = False
        ds.ntrain, ds.nreg = ntrain, nreg
        datasets.append(ds)

    info = ""
    for i, ds in enumerate(datasets):
        info += dedent(f"""\
            [Dataset {i}]
              batch_size: {ds.batch_size}
              resolution: {(ds.width, ds.height)}
              resize_interpolation: {ds.p['resize_interpolation']}
              enable_bucket: {ds.p['enable_bucket']}
            """)
        if ds.p["enable_bucket"]:
            info += indent(dedent(f"""\
                min_bucket_reso: {ds.mn}
                max_bucket_reso: {ds.mx}
                bucket_reso_steps: {ds.st}
                bucket_no_upscale: {ds.nu}
                \n"""), "  ")
        else:
            info += "\n"
        for j, (s, count) in enumerate(ds.subsets):
            info += indent(dedent(f"""\
                [Subset {j} of Dataset {i}]
                  image_dir: "{s['image_dir']}"
                  image_count: {count}
                  num_repeats: {s['num_repeats']}
                  shuffle_caption: {s['shuffle_caption']}
                  keep_tokens: {s['keep_tokens']}
                  caption_dropout_rate: {s['caption_dropout_rate']}
                  caption_dropout_every_n_epochs: {s['caption_dropout_every_n_epochs']}
                  caption_tag_dropout_rate: {s['caption_tag_dropout_rate']}
                  caption_prefix: {s['caption_prefix']}
                  caption_suffix: {s['caption_suffix']}
                  color_aug: {s['color_aug']}
                  flip_aug: {s['flip_aug']}
                  face_crop_aug_range: {s['face_crop_aug_range']}
                  random_crop: {s['random_crop']}
                  token_warmup_min: {s['token_warmup_min']},
                  token_warmup_step: {s['token_warmup_step']},
                  alpha_mask: {s['alpha_mask']}
                  resize_interpolation: {s['resize_interpolation']}
                  custom_attributes: {s['custom_attributes']}
                """), "  ")
            info += indent(dedent(f"""\
                is_reg: {s['is_reg']}
                class_tokens: {s['class_tokens']}
                caption_extension: {s['caption_extension']}
                \n"""), "    ")
    log.info(info)

    random.seed(job["seed"])
    dataset_seed = random.randint(0, 2**31)
    for i, ds in enumerate(datasets):
        log.info(f"[Prepare dataset {i}]")
        log.info("loading image sizes.")
        for info in ds.images.values():
            with Image.open(info["key"]) as im:
                info["size"] = im.size
        log.info("make buckets" if ds.p["enable_bucket"] else "prepare dataset")
        resos, buckets, errs = [], {}, []
        if ds.p["enable_bucket"]:
            predefined = [] if ds.nu else bucket_resolutions((ds.width, ds.height), ds.mn, ds.mx, ds.st)
            ds.predefined = predefined
            if ds.nu:
                log.warning("min_bucket_reso and max_bucket_reso are ignored if bucket_no_upscale is set, because bucket reso is defined by image size automatically / bucket_no_upscaleが指定された場合は、bucketの解像度は画像サイズから自動計算されるため、min_bucket_resoとmax_bucket_resoは無視されます")
            for info in ds.images.values():
                reso, resized, err = select_bucket(*info["size"], predefined, ds.nu, ds.width * ds.height, ds.st)
                info["bucket"], info["resized"] = reso, resized
                errs.append(abs(err))
        else:
            ds.predefined = [(ds.width, ds.height)]
            for info in ds.images.values():
                reso, resized, _ = select_bucket(*info["size"], ds.predefined, False, 0, 64)
                info["bucket"], info["resized"] = reso, resized
        resos = sorted({info["bucket"] for info in ds.images.values()})
        ds.buckets = [[] for _ in resos]
        for info in ds.images.values():
            for _ in range(info["repeats"]):
                ds.buckets[resos.index(info["bucket"])].append(info["key"])
        ds.resos = resos
        if ds.p["enable_bucket"]:
            log.info("number of images (including repeats) / 各bucketの画像枚数（繰り返し回数を含む）")
            for bi, (r, b) in enumerate(zip(resos, ds.buckets)):
                log.info(f"bucket {bi}: resolution {r}, count: {len(b)}")
            log.info(f"mean ar error (without repeats): {np.mean(np.abs(np.array(errs))) if errs else 0}")
        ds.indices = []
        for bi, b in enumerate(ds.buckets):
            for k in range(math.ceil(len(b) / ds.batch_size)):
                ds.indices.append((bi, ds.batch_size, k))
        ds.epoch = 0
        ds.seed = 0
        shuffle_buckets(ds)
        ds.seed = dataset_seed
    return datasets, dataset_seed


def shuffle_buckets(ds):
    random.seed(ds.seed + ds.epoch)
    random.shuffle(ds.indices)
    for b in ds.buckets:
        random.shuffle(b)


def set_epoch(ds, e):
    while ds.epoch < e:
        ds.epoch += 1
        shuffle_buckets(ds)


# ---------------------------------------------------------------------------------------------
# per-item processing (spec §3.7-§3.10, §3.12)

def process_caption(s, caption, current_epoch=0, current_step=0, max_train_steps=1600):
    """BaseDataset.process_caption (spec §3.12)."""
    if s["caption_prefix"]:
        caption = s["caption_prefix"] + " " + caption
    if s["caption_suffix"]:
        caption = caption + " " + s["caption_suffix"]
    drop = s["caption_dropout_rate"] > 0 and random.random() < s["caption_dropout_rate"]
    every = s["caption_dropout_every_n_epochs"]
    drop = drop or (every > 0 and current_epoch % every == 0)
    if drop:
        return ""
    if s["enable_wildcard"]:
        if "\n" in caption:
            caption = random.choice(caption.split("\n"))
        r1, r2 = "⦅", "⦆"
        while r1 in caption or r2 in caption:
            r1 += "⦅"
            r2 += "⦆"
        caption = caption.replace("{{", r1).replace("}}", r2)
        caption = re.sub(r"\{([^}]+)\}", lambda m: random.choice(m.group(1).split("|")), caption)
        caption = caption.replace(r1, "{").replace(r2, "}")
    else:
        caption = caption.split("\n")[0]
    step = s["token_warmup_step"]
    if s["shuffle_caption"] or step > 0 or s["caption_tag_dropout_rate"] > 0:
        sep = s["caption_separator"]
        kts = s["keep_tokens_separator"]
        fixed, flex, suffix = [], [], []
        if kts and kts in caption:
            fixed_part, flex_part = caption.split(kts, 1)
            if kts in flex_part:
                flex_part, suffix_part = flex_part.split(kts, 1)
                suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
            fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
            flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
        else:
            tokens = [t.strip() for t in caption.strip().split(sep)]
            flex = tokens[:]
            if s["keep_tokens"] > 0:
                fixed, flex = tokens[: s["keep_tokens"]], tokens[s["keep_tokens"]:]
        if step < 1:
            step = math.floor(step * max_train_steps)
        if step and current_step < step:
            n = math.floor(current_step * ((len(flex) - s["token_warmup_min"]) / step)) + s["token_warmup_min"]
            flex = flex[:n]
        if s["shuffle_caption"]:
            random.shuffle(flex)
        if s["caption_tag_dropout_rate"] > 0:
            flex = [t for t in flex if random.random() >= s["caption_tag_dropout_rate"]]
        caption = ", ".join(fixed + flex + suffix)
    if s["secondary_separator"]:
        caption = caption.replace(s["secondary_separator"], s["caption_separator"])
    return caption


def captions(cases_file):
    with open(cases_file, encoding="utf-8") as f:
        cases = json.load(f)
    out = []
    for c in cases:
        sp = dict(SUBSET_DEFAULTS)
        sp.update(c["subset"])
        random.seed(c["seed"])
        res = [process_caption(sp, c["caption"], c.get("epoch", 0), c.get("step", 0), c.get("max_train_steps", 1600))
               for _ in range(c.get("repeat", 4))]
        out.append({"captions": res, "next": repr(random.random())})
    return out


def color_aug(image_path, seed, n, out_npz):
    """AugHelper.color_aug applied n times in a row (spec §3.9), with OpenCV HSV."""
    with Image.open(image_path) as im:
        base = np.array(im.convert("RGB"))
    random.seed(seed)
    arrays, kinds = {}, []
    for k in range(n):
        image = base.copy()
        kind = "none"
        if random.random() <= 0.33:
            if random.random() > 0.5:
                hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
                shift = random.uniform(-8, 8)
                if shift < 0:
                    shift = 180 + shift
                hsv[:, :, 0] = (hsv[:, :, 0] + shift) % 180
                image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
                kind = "hue"
            else:
                gamma = random.uniform(0.95, 1.05)
                image = np.clip(image**gamma, 0, 255).astype(np.uint8)
                kind = "gamma"
        kinds.append(kind)
        arrays[f"a{k}"] = image
    np.savez(out_npz, **arrays)
    return {"kinds": kinds}


def resize(img, w, h):
    ih, iw = img.shape[:2]
    if iw >= w and ih >= h:
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return np.array(Image.fromarray(img).resize((w, h), resample=Image.LANCZOS))


def get_item(ds, index, pixels):
    bi, bs, k = ds.indices[index]
    keys = ds.buckets[bi][k * bs:(k + 1) * bs]
    items = []
    for key in keys:
        info = ds.images[key]
        s = ds.subsets[info["subset"]][0]
        flipped = s["flip_aug"] and random.random() < 0.5
        img = None
        if ds.p["enable_bucket"]:
            rw, rh = info["resized"]
            bw, bh = info["bucket"]
            left = top = 0
            if rw > bw:
                left = (rw - bw) // 2 if not s["random_crop"] else random.randint(0, rw - bw)
            if rh > bh:
                top = (rh - bh) // 2 if not s["random_crop"] else random.randint(0, rh - bh)
            if pixels:
                with Image.open(key) as im:
                    arr = np.array(im.convert("RGB") if im.mode != "RGB" else im)
                if (arr.shape[1], arr.shape[0]) != (rw, rh):
                    arr = resize(arr, rw, rh)
                img = arr[top:top + bh, left:left + bw]
        else:
            left = top = 0
            w, h = info["size"]
            if (h > ds.height or w > ds.width) and s["random_crop"]:
                if h > ds.height:
                    top = random.randint(0, h - ds.height)
                if w > ds.width:
                    left = random.randint(0, w - ds.width)
            if pixels:
                with Image.open(key) as im:
                    arr = np.array(im.convert("RGB"))
                img = arr[top:top + ds.height, left:left + ds.width]
        if img is not None and flipped:
            img = img[:, ::-1]
        caption = process_caption(s, info["caption"], ds.epoch)
        items.append(dict(key=key, flipped=flipped, offsets=[left, top], caption=caption, is_reg=info["is_reg"],
                          loss_weight=ds.prior if info["is_reg"] else 1.0, pixels=img))
    return items


def run_dataset(job):
    log = Log()
    datasets, dataset_seed = build(job, log)
    out = {"log": log.lines, "dataset_seed": dataset_seed, "datasets": []}
    for ds in datasets:
        out["datasets"].append({
            "predefined": [list(r) for r in ds.predefined],
            "resos": [list(r) for r in ds.resos],
            "images": [{"key": i["key"], "size": list(i["size"]), "bucket": list(i["bucket"]), "resized": list(i["resized"]),
                        "repeats": i["repeats"], "caption": i["caption"], "is_reg": i["is_reg"]} for i in ds.images.values()],
            "num_train_images": ds.ntrain, "num_reg_images": ds.nreg, "len": len(ds.indices),
        })
    lens = [len(d.indices) for d in datasets]
    total = sum(lens)
    torch.manual_seed(job["seed"])
    workers = job.get("workers", 0)
    persistent = job.get("persistent", False) and workers > 0
    pixel_epochs = set(job.get("pixel_epochs", []))
    arrays = {}
    epochs = []
    for e in range(1, job["epochs"] + 1):
        # DataLoader.__iter__: _base_seed (once with persistent workers), then the RandomSampler's
        # generator seed (spec §6.3.4)
        fresh = not (persistent and e > 1)
        if fresh:
            base_seed = int(torch.empty((), dtype=torch.int64).random_().item())
        sampler_seed = int(torch.empty((), dtype=torch.int64).random_().item())
        g = torch.Generator()
        g.manual_seed(sampler_seed)
        perm = torch.randperm(total, generator=g).tolist()
        if workers > 0 and fresh:
            import copy
            # each worker: a copy of the never-advanced main-process datasets, random seeded with base_seed + id
            state = random.getstate()
            wstates = []
            for w in range(workers):
                random.seed(base_seed + w)
                wstates.append((random.getstate(), copy.deepcopy(datasets)))
            random.setstate(state)
        batches = []
        for k, gi in enumerate(perm):
            d = 0
            while gi >= lens[d]:
                gi -= lens[d]
                d += 1
            if workers > 0:
                w = k % workers
                st, dss = wstates[w]
                main_state = random.getstate()
                random.setstate(st)
                items = get_item(dss[d], gi, e in pixel_epochs)
                for x in dss:
                    set_epoch(x, e)
                wstates[w] = (random.getstate(), dss)
                random.setstate(main_state)
            else:
                items = get_item(datasets[d], gi, e in pixel_epochs)
                for x in datasets:
                    set_epoch(x, e)
            for j, it in enumerate(items):
                px = it.pop("pixels")
                if px is not None:
                    arrays[f"e{e}_b{k}_i{j}"] = np.ascontiguousarray(px)
            batches.append({"dataset": d, "items": items})
        epochs.append(batches)
    out["epochs"] = epochs
    if arrays and job.get("pixels_out"):
        np.savez(job["pixels_out"], **arrays)
    return out


# ---------------------------------------------------------------------------------------------
# npz interchange (spec §3.11)

def npz_write(path):
    rng = np.random.default_rng(7)
    lat = rng.normal(size=(4, 32, 24)).astype(np.float32)
    flip = rng.normal(size=(4, 32, 24)).astype(np.float32)
    np.savez(path, latents=lat, original_size=np.array((200, 300)), crop_ltrb=np.array((0.0, 0.0, 192.0, 256.0)),
             latents_flipped=flip)
    return {"latents": lat.ravel().tolist()[:16], "latents_flipped": flip.ravel().tolist()[:16], "shape": list(lat.shape)}


def npz_read(path):
    z = np.load(path)
    return {k: {"dtype": str(z[k].dtype), "shape": list(z[k].shape), "head": z[k].ravel()[:16].tolist()} for k in z.files}


def input_ids(tok, text, max_length):
    """sd-scripts' SdTokenizeStrategy.tokenize for one caption (spec §3.13)."""
    ids = tok(text, padding="max_length", truncation=True, max_length=max_length).input_ids
    if max_length <= 77:
        return [ids]
    out = []
    for i in range(1, max_length - 77 + 2, 75):
        chunk = [ids[0]] + ids[i:i + 75] + [ids[-1]]
        if tok.pad_token_id != tok.eos_token_id:
            if chunk[-2] != tok.eos_token_id and chunk[-2] != tok.pad_token_id:
                chunk[-1] = tok.eos_token_id
            if chunk[1] == tok.pad_token_id:
                chunk[1] = tok.eos_token_id
        out.append(chunk)
    return out


def tokens(captions_file):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from clip_oracle_tokenizer import load_tokenizers
    sd1, sd2 = load_tokenizers()
    with open(captions_file, encoding="utf-8") as f:
        captions = json.load(f)
    res = {}
    for name, tok in (("v1", sd1), ("v2", sd2)):
        for ml in (77, 152, 227):
            res[f"{name}_{ml}"] = [input_ids(tok, c, ml) for c in captions]
    return res


def main():
    cmd = sys.argv[1]
    if cmd == "fixture":
        res = fixture(sys.argv[2])
    elif cmd == "random":
        res = random_streams([int(s) for s in sys.argv[2:]])
    elif cmd == "sampler":
        # sampler EPOCHS WORKERS SEED:N [SEED:N ...]
        epochs, workers = int(sys.argv[2]), int(sys.argv[3])
        res = {}
        for sn in sys.argv[4:]:
            seed, n = sn.split(":")
            res[sn] = sampler_order(int(seed), int(n), epochs, workers)
    elif cmd == "dataset":
        with open(sys.argv[2]) as f:
            jobs = json.load(f)
        res = [run_dataset(j) for j in jobs] if isinstance(jobs, list) else run_dataset(jobs)
    elif cmd == "worker-probe":
        res = worker_probe(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1")
    elif cmd == "captions":
        res = captions(sys.argv[2])
    elif cmd == "color-aug":
        res = color_aug(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif cmd == "tokens":
        res = tokens(sys.argv[2])
    elif cmd == "npz-write":
        res = npz_write(sys.argv[2])
    elif cmd == "npz-read":
        res = npz_read(sys.argv[2])
    else:
        raise SystemExit(f"unknown command {cmd}")
    json.dump(res, sys.stdout)


if __name__ == "__main__":
    main()
