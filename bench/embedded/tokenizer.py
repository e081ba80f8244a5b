"""The text-to-image model's tokenizer: OpenAI CLIP's BPE vocabulary as a transformers ``CLIPTokenizer`` folder.

The clip package ships only ``bpe_simple_vocab_16e6.txt.gz`` (a header line and the
merges). Its ``SimpleTokenizer`` builds the vocabulary from it: the 256 byte
symbols of ``bytes_to_unicode``, the same 256 with ``</w>``, the first 48,894
merges joined, then ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 ids).
This module repeats that construction and writes ``vocab.json`` and
``merges.txt`` (``#version: 0.2`` header), the files of openai/clip-vit-large-patch14
and of Stable Diffusion's ``tokenizer/`` folder, so ids equal ``clip.tokenize``.

Text cleaning differs in one documented way: clip runs ``ftfy.fix_text`` and
``html.unescape`` twice before lower-casing; transformers' fast CLIPTokenizer
applies NFC, collapses whitespace and lower-cases. Strings with HTML entities or
mojibake can therefore tokenize differently (as they do for SD-1.5's tokenizer).

Reproduce with ``bench embedded train tokenizer``.
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path

from transformers import CLIPTokenizer

from bench.errors import BenchError

NUM_MERGES = 49152 - 256 - 2  # clip's SimpleTokenizer: merges[1 : 49152 - 256 - 2 + 1]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass(frozen=True)
class Recipe:
    """Not trained: converted. ``steps`` is unused (kept so ``bench embedded train`` treats it alike)."""

    model_max_length: int = 77
    steps: int = 0


def clip_bpe_path() -> Path:
    spec = find_spec("clip")  # located, not imported (clip-anytorch imports pkg_resources, with a warning)
    if spec is None or not spec.submodule_search_locations:
        raise BenchError("the clip package (clip-anytorch) is not installed; it ships the BPE file")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode table, in the order clip's ``bytes_to_unicode`` returns it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def vocabulary(bpe_path: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges), built exactly as clip's ``SimpleTokenizer.__init__`` builds them."""
    lines = gzip.open(bpe_path or clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(out_dir: Path, model_max_length: int = 77, bpe_path: Path | None = None) -> Path:
    """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json to ``out_dir``."""
    vocab, merges = vocabulary(bpe_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, **specials,
              "do_lower_case": True, "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def load(folder: Path):
    """The converted tokenizer through transformers' own loader (as SD-1.5's ``tokenizer/`` loads)."""
    return CLIPTokenizer.from_pretrained(str(folder))


def train(out_dir: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    """Convert (the ``bench embedded train tokenizer`` entry point); returns the recipe record."""
    t0 = time.time()
    write_tokenizer_files(out_dir, recipe.model_max_length)
    vocab, merges = vocabulary()
    record = {
        "model": "tokenizer",
        "command": "bench embedded train tokenizer",
        "recipe": asdict(recipe),
        "source": "clip-anytorch's clip/bpe_simple_vocab_16e6.txt.gz (OpenAI CLIP's BPE merges)",
        "vocab_size": len(vocab),
        "merges": len(merges),
        "wall_time_s": round(time.time() - t0, 1),
    }
    (Path(out_dir) / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def tokenize(tokenizer, captions: list[str]):
    """Token ids [B, model_max_length] (a torch tensor), padded and truncated as Stable Diffusion's pipeline does."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
