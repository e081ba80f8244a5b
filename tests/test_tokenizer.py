"""The converted CLIPTokenizer gives clip.tokenize's ids (the vocabulary of OpenAI CLIP)."""

import warnings

import pytest
import torch

from bench.embedded.shapes import WorldConfig, make_scenes
from bench.embedded.tokenizer import BOS, EOS, load, vocabulary, write_tokenizer_files

with warnings.catch_warnings():  # clip-anytorch imports pkg_resources
    warnings.simplefilter("ignore")
    import clip

ODD = [
    "",
    "Hello,   World!!  ",
    "it's 3.14 o'clock — naïve café",
    "émoji 🎨 test",
    "UPPER lower 123abc",
    "a-b_c/d\\e",
    "tab\tnew\nline",
    "don't we'll they've I'm",
    "x" * 40,
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load(write_tokenizer_files(tmp_path_factory.mktemp("tokenizer")))


def test_vocabulary_is_clips():
    vocab, merges = vocabulary()
    simple = clip.simple_tokenizer.SimpleTokenizer()
    assert vocab == simple.encoder
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab[BOS] == 49406 and vocab[EOS] == 49407


def test_ids_equal_clip_tokenize(tokenizer):
    captions = [s.caption for s in make_scenes(0, range(40), WorldConfig(32, max_objects=2, split="all"))]
    texts = captions + ODD
    ours = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
    theirs = clip.tokenize(texts)
    assert tokenizer.model_max_length == 77 and ours.shape == theirs.shape
    used = theirs != 0  # clip pads with 0, SD-1.5's tokenizer with <|endoftext|>
    assert torch.equal(ours[used], theirs[used])
    assert (ours[~used] == 49407).all()


def test_truncation_matches_clip(tokenizer):
    long = "a red circle " * 40
    ours = tokenizer(long, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    theirs = clip.tokenize(long, truncate=True)
    assert torch.equal(ours, theirs)


def test_html_entities_are_the_documented_difference(tokenizer):
    ours = tokenizer("&amp;").input_ids
    theirs = clip.tokenize("&amp;")[0]
    assert ours != theirs[theirs != 0].tolist()  # clip unescapes HTML; transformers does not
