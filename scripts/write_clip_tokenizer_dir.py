"""write_clip_tokenizer_dir.py DIR: writes a transformers CLIPTokenizer directory for
openai/clip-vit-large-patch14 (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json) from the vocabulary sdlora embeds (scripts/clip_oracle_tokenizer.py),
the files transformers ships for that model. sd-scripts loads its tokenizer from
--tokenizer_cache_dir=PARENT when DIR is PARENT/openai_clip-vit-large-patch14 (no network).
Used by scripts/repro_sdscripts and scripts/gpu_check_prepare. Needs the venv's Python
(transformers, ftfy: scripts/setup)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clip_oracle_tokenizer import write_tokenizer_files  # noqa: E402

SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
           "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


def write_clip_tokenizer_dir(d):
    write_tokenizer_files(d)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(dict(SPECIAL, model_max_length=77, tokenizer_class="CLIPTokenizer"), f)
    with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
        json.dump(SPECIAL, f)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: write_clip_tokenizer_dir.py DIR")
    write_clip_tokenizer_dir(sys.argv[1])
