"""transformers' slow CLIPTokenizer for SD1 / SD2 built offline from the vocabulary the Rust side
embeds (src/models/clip_vocab/bpe_merges.txt.gz): vocab.json = 256 byte symbols, the same with
</w>, the merges joined, <|startoftext|>, <|endoftext|>; merges.txt = "#version: 0.2" + merges.
The SD2 tokenizer (stabilityai/stable-diffusion-2 subfolder tokenizer) differs only by
pad_token="!". Imported by make_tokenizer_fixture.py and make_clip_fixtures.py."""
import gzip
import json
import os
import re
import tempfile

import ftfy

from transformers import CLIPTokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MERGES_GZ = os.path.join(ROOT, "src", "models", "clip_vocab", "bpe_merges.txt.gz")
# spec: running-sd-scripts.md (check vector)
CHECK_TEXT = "zunko, 1girl, solo, skirt, one eye closed"
CHECK_IDS = [49406, 42440, 2448, 267, 272, 1611, 267, 5797, 267, 12386, 267, 637, 3272, 4552, 49407]


def write_tokenizer_files(out_dir):
    with gzip.open(MERGES_GZ, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[:-1]
    byte_syms = list(bytes_to_unicode().values())
    vocab = byte_syms + [s + "</w>" for s in byte_syms] + ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({v: i for i, v in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def load_tokenizers():
    """(sd1, sd2) CLIPTokenizer instances; asserts the spec's check vector."""
    d = tempfile.mkdtemp(prefix="sdlora-cliptok-")
    write_tokenizer_files(d)
    v, m = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
    sd1 = CLIPTokenizer(v, m, model_max_length=77)
    sd2 = CLIPTokenizer(v, m, pad_token="!", model_max_length=77)
    assert sd1.fix_text is not None, "ftfy must be installed (sd-scripts pins it)"
    got = sd1(CHECK_TEXT).input_ids
    assert got == CHECK_IDS, f"check vector mismatch: {got}"
    assert sd1.pad_token_id == 49407 and sd2.pad_token_id == 0
    return sd1, sd2


def needs_fix_encoding(text):
    """True if ftfy's mojibake repair (fix_encoding, not reproduced in Rust) changes what the
    tokenizer cleans. The tokenizer runs ftfy on each piece between special tokens (and SD2's
    `!`), so an entity unescaped there can form mojibake that the whole text would not show."""
    for piece in re.split(r"<\|startoftext\|>|<\|endoftext\|>|!", text):
        if ftfy.fix_text(piece) != ftfy.fix_text(piece, fix_encoding=False):
            return True
    return False
