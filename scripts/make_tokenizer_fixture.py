#!/usr/bin/env python3
"""Writes tests/fixtures/clip_tokenizer.json: >= 300 varied captions with the ids transformers'
slow CLIPTokenizer gives them (SD1 and SD2 tokenizers, ftfy installed), plus padded/truncated
`tokenizer(text, padding="max_length", truncation=True, max_length=L)` outputs.

Captions whose ftfy result depends on ftfy's mojibake repair (fix_encoding), which the Rust
tokenizer does not reproduce, are listed separately under "fix_encoding_gap" with both ids so
the gap is visible; the main cases are checked to be unaffected by it.

Usage: make_tokenizer_fixture.py [out.json]"""
import json
import os
import random
import sys

import ftfy
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clip_oracle_tokenizer import ROOT, load_tokenizers, needs_fix_encoding  # noqa: E402

TAGS = (
    "1girl 1boy 2girls solo long_hair short_hair blue_eyes red_eyes blonde_hair black_hair smile "
    "open_mouth looking_at_viewer blush skirt shirt school_uniform serafuku thighhighs "
    "white_background simple_background upper_body full_body sitting standing outdoors indoors "
    "sky cloud day night tree flower cherry_blossoms hat bow ribbon twintails ponytail "
    "hair_ornament jewelry earrings necklace gloves dress jacket holding weapon sword gun "
    "masterpiece best_quality highres absurdres ultra-detailed 8k wallpaper photorealistic "
    "depth_of_field bokeh cinematic_lighting rim_lighting volumetric_fog one_eye_closed "
    "hatsune_miku zunko touhou hakurei_reimu kirisame_marisa animal_ears cat_ears fox_tail "
    "wings halo armor cape mecha robot landscape cityscape ruins river mountain sunset"
).split()

WORDS = (
    "a photo of an astronaut riding horse on mars portrait painting by greg rutkowski artstation "
    "trending detailed oil canvas beautiful woman man dog cat sitting in garden with red umbrella "
    "under rain at dusk the old castle stands above misty valley while birds fly over golden fields"
).split()

HANDWRITTEN = [
    "",
    " ",
    "   \t\n  ",
    "a",
    "A",
    "hello world",
    "Hello, World!",
    "HELLO WORLD!!!",
    "hello!",
    "wow!! great!",
    "!!!",
    "what?! no...",
    "zunko, 1girl, solo, skirt, one eye closed",
    "masterpiece, best quality, 1girl, (blue eyes:1.2), [red hair], ((smile)), (((highres)))",
    "(tag:1.2), (other tag:0.8), [[weak]], \\(escaped\\), \\[bracket\\]",
    "(masterpiece:1.4), (best quality:1.3), (ultra detailed:1.2), <lora:myLora:0.7>",
    "<lyco:foo:1.0> embedding:bar, __wildcard__, {red|blue|green} hair",
    "it's a dog's life, don't you think? I'LL GO. We've, they're, I'm, you'd",
    "'s 't 're 've 'm 'll 'd 'x",
    "rock'n'roll, o'clock, y'all",
    "1girl, 2boys, 3others, 10s, 1990s, 2024-01-31, 12:30, 3.14159, 1,000,000, -5, +7, 50%",
    "1234567890 0.5 .5 5. 1e10 0x1F 100k 4K UHD 1080p",
    "width=512 height=768 steps=20 cfg=7.5 seed=-1",
    "e-mail: someone@example.com, url: https://example.com/path?q=1&r=2#frag",
    "C:\\Users\\name\\pictures\\img_001.png",
    "tabs\tand\nnewlines\r\nand\rreturns",
    "multiple     spaces    between   words",
    "trailing spaces   ",
    "   leading spaces",
    "café naïve résumé façade coöperate jalapeño",
    "Zürich straße GROSSE Ärger Öl Übel",
    "ΟΔΟΣ Σίσυφος ΣΑΣ ἀλήθεια",
    "москва, Россия, девушка с длинными волосами",
    "東方project, 博麗霊夢, 初音ミク, かわいい, カタカナ",
    "汉字测试，中文逗号。句号！问号？",
    "한국어 텍스트, 소녀, 긴 머리",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "emoji 😀😃😄 🐱 🐶 🌸",
    "family 👨‍👩‍👧‍👦 zwj, thumbs 👍🏽 skin tone, flag 🇯🇵🇺🇸",
    "heart ❤️ vs ❤ and ✨ sparkles ★☆♪♫",
    "math ∑∫√∞≠≤≥ ±×÷ °C µm",
    "quotes “double” ‘single’ „low“ ‚low‘ ‟reversed‛ ʼmodifier",
    "«guillemets» ‹single› 「かぎ括弧」 『二重』",
    "dashes – — ― ‐ ‑ ‒ and ellipsis … and bullets • ·",
    "ligatures: ﬁne ﬂower ﬀ ﬃ ﬄ ﬅ ﬆ Ĳssel ǅ",
    "fullwidth: ＡＢＣ ａｂｃ １２３ ！？ （ｔａｇ：１．２） ｶﾀｶﾅ",
    "ideographic\u3000space and nbsp\u00a0here and thin\u2009space",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom",
    "soft\u00adhyphen and word\u2060joiner",
    "html: &amp; &lt; &gt; &quot; &#39; &apos; &nbsp; &copy; &eacute; &NTILDE; &hellip;",
    "numeric refs: &#65;&#66;&#x43; &#x1F600; &#128512; &#59; &#0; &#128; &#xD800; &#99999999;",
    "not entities: &foo; &amp &#; &#xzz; & ; AT&T; R&D",
    "tag <b>bold</b> &amp; stays escaped",
    "first line &amp;\nsecond < line &amp;\nthird &amp;",
    "c1 controls: \x80 \x85 \x91quoted\x92 \x93double\x94 \x96 \x97 \x99",
    "control\x00chars\x01\x07\x08\x0b\x0e\x1b[31mred\x1b[0m\x7f end",
    "line\u2028separator and paragraph\u2029separator",
    "decomposed: cafe\u0301 nai\u0308ve A\u030a",
    "ypogegrammeni \u0345 and \u1fb3 and \u0399\u0345",
    "roman Ⅻ ⅻ circled Ⓐ ⓐ ① ⑳ superscript x² H₂O",
    "dotless ı İstanbul ß ẞ ﬀ ŉ",
    "long s: it'ſ ſtraße 'ſ 'ﬅ <|ſtartoftext|> Kelvin K 'K",
    "<|startoftext|>a photo<|endoftext|> of a cat",
    "A <|ENDOFTEXT|> B <|StartOfText|> C",
    "<|endoftext|>",
    "weird <|endoftext> <endoftext|> <|> |",
    "the quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "_ __ ___ - -- --- . .. ... , ,, ; ;; : ::",
    "@#$%^&*()_+-=[]{}|;':\",./<>?`~",
    "$100 €50 £30 ¥1000 ₩5000",
    "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
    "score_9, score_8_up, score_7_up, source_anime, rating_safe",
    "BREAK, AND, landscape BREAK portrait",
    "\u00a0\u00a0nbsp-only-prefix",
    "\u3000\u3000",
]

# Texts ftfy would re-decode as mojibake (not reproduced in Rust).
MOJIBAKE = [
    "cafÃ© crÃ¨me",
    "voilÃ le travail",
    "â€œquotedâ€\u009d",
    "sÃ³",
    "v*|&EACUTE;² (an unescaped entity that forms mojibake)",
]


def booru_caption(rng, n):
    tags = [rng.choice(TAGS) for _ in range(n)]
    out = []
    for t in tags:
        t = t.replace("_", " ") if rng.random() < 0.7 else t
        r = rng.random()
        if r < 0.1:
            t = f"({t}:{rng.choice(['0.5', '0.8', '1.1', '1.2', '1.35', '2'])})"
        elif r < 0.15:
            t = f"(({t}))"
        elif r < 0.2:
            t = f"[{t}]"
        elif r < 0.25:
            t = t.upper()
        elif r < 0.28:
            t = t.title()
        out.append(t)
    sep = rng.choice([", ", ",", " , ", "; ", " "])
    return sep.join(out)


def sentence(rng, n):
    s = " ".join(rng.choice(WORDS) for _ in range(n))
    if rng.random() < 0.5:
        s = s.capitalize()
    return s + rng.choice(["", ".", "!", "?", "...", " :)", " ;-)"])


def unicode_mix(rng, n):
    pools = [
        "àáâãäåæçèéêëìíîïðñòóôõöøùúûüýþÿ",
        "αβγδεζηθικλμνξοπρστυφχψω",
        "абвгдежзийклмнопрстуфхцчшщъыьэюя",
        "あいうえおかきくけこさしすせそ",
        "アイウエオカキクケコ",
        "日本語漢字中文字体",
        "가나다라마바사",
        "😀😂🥰😎🤖👾🎨🖌️🌈🔥",
        "“”‘’–—…•",
        "0123456789",
        ",.!?;:()[]{}",
    ]
    parts = []
    for _ in range(n):
        pool = rng.choice(pools)
        parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))))
    return " ".join(parts)


def make_captions():
    rng = random.Random(1234)
    caps = list(HANDWRITTEN)
    for _ in range(120):
        caps.append(booru_caption(rng, rng.randint(1, 30)))
    for _ in range(50):
        caps.append(sentence(rng, rng.randint(3, 40)))
    for _ in range(50):
        caps.append(unicode_mix(rng, rng.randint(1, 12)))
    # longer than 225 tokens, so every truncation/window path is exercised
    for k in range(12):
        caps.append(booru_caption(rng, 80 + 5 * k))
    for _ in range(8):
        caps.append(sentence(rng, 230 + rng.randint(0, 40)))
    return caps


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "fixtures", "clip_tokenizer.json")
    sd1, sd2 = load_tokenizers()
    cases = []
    for text in make_captions():
        if needs_fix_encoding(text):
            raise SystemExit(f"caption depends on ftfy.fix_encoding (not reproduced): {text!r}")
        a = sd1(text).input_ids[1:-1]
        b = sd2(text).input_ids[1:-1]
        cases.append({"text": text, "sd1": a, "sd2": None if b == a else b})
    padded = []
    for c in cases[::9]:
        for L in (77, 227):
            padded.append(
                {
                    "text": c["text"],
                    "max_length": L,
                    "sd1": sd1(c["text"], padding="max_length", truncation=True, max_length=L).input_ids,
                    "sd2": sd2(c["text"], padding="max_length", truncation=True, max_length=L).input_ids,
                }
            )
    gap = []
    for text in MOJIBAKE:
        gap.append({"text": text, "ftfy": ftfy.fix_text(text), "sd1": sd1(text).input_ids[1:-1]})
    n_long = sum(len(c["sd1"]) > 225 for c in cases)
    doc = {
        "generator": "scripts/make_tokenizer_fixture.py",
        "transformers": transformers.__version__,
        "ftfy": ftfy.__version__,
        "n_cases": len(cases),
        "n_longer_than_225": n_long,
        "cases": cases,
        "padded": padded,
        "fix_encoding_gap": gap,
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    n_sd2 = sum(c["sd2"] is not None for c in cases)
    print(f"wrote {out}: {len(cases)} cases ({n_long} > 225 tokens, {n_sd2} differ under SD2), {len(padded)} padded")


if __name__ == "__main__":
    main()
