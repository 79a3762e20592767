"""The real CLIP tokenizer (49,408 tokens, as SD1.5/SDXL use it), rebuilt offline.

``open-clip-torch`` ships OpenAI's BPE merges as ``bpe_simple_vocab_16e6.txt.gz``; installed with
``--no-deps`` it brings no torchvision. From it we write the vocab.json/merges.txt pair that
``transformers.CLIPTokenizer`` reads, so no model hub is needed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path

VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 256 byte tokens, their end-of-word forms, start/end of text
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, the alphabet CLIP's BPE works on."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def find_bpe_file() -> Path:
    """The merges file inside the installed open_clip package (located without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the CLIP tokenizer vocabulary ships with open-clip-torch; install it with `pip install --no-deps open-clip-torch`"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _BPE_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{_BPE_FILE} not found in the installed open_clip package")


def write_clip_tokenizer_files(folder: str | os.PathLike) -> Path:
    """Write vocab.json and merges.txt for ``CLIPTokenizer`` into folder; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(find_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"rebuilt CLIP vocabulary has {len(vocab)} tokens; expected {VOCAB_SIZE}")
    _atomic_write(folder / "vocab.json", json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    _atomic_write(folder / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    _atomic_write(folder / "tokenizer_config.json", json.dumps(config))
    return folder


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def default_cache_dir() -> Path:
    root = os.environ.get("FEWSTEP_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fewstep")
    return Path(root) / "clip_tokenizer"


def load_clip_tokenizer(cache_dir: str | os.PathLike | None = None):
    """A ``transformers.CLIPTokenizer`` with CLIP's real vocabulary, built once into a cache folder."""
    from transformers import CLIPTokenizer

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not all((folder / f).is_file() for f in ("vocab.json", "merges.txt", "tokenizer_config.json")):
        write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
