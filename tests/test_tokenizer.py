"""Tokenizer ids equal transformers.CLIPTokenizer's, built from vocab/merges derived here from the same file."""
import gzip
import json

import pytest
import torch
from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_bytes_to_unicode

import clip

LONG = " ".join(f"word{i}, another-word" for i in range(40))  # well over 77 tokens
TEXTS = [
    "a photo of a cat",
    "",
    "   ",
    "Hello!!! World???  ...and?!?! (yes) [no] {maybe} -- ~~ @@ ## $$ %% ^^ && ** __ ++ == || \\\\ //",
    "<> `` ''' \"quoted\" ... ;;; :-) <3 &amp; #hashtag @mention http://x.com/a?b=c",
    "Crème brûlée, naïve café, Ångström, São Paulo, Übermensch, façade, Ελληνικά, русский текст",
    "e\u0301 (combining accent) vs \u00e9 (precomposed)",
    "emoji 😀🎉👗👠 and flags 🇫🇷🇯🇵 and ZWJ 👩‍👩‍👧",
    "numbers 12345 3.14159 1,000,000 2nd 3rd 4th 10% $99.99 0x1F",
    "repeated     spaces\tand\ttabs\n\nand newlines\r\n end ",
    "MiXeD CaSe TeXt WITH CAPS and lowercase",
    "it's, they're, we've, I'm, you'll, he'd, don't, O'Neill's",
    "中文字符 日本語のテキスト 한국어",
    "a red <|endoftext|> dress with <|startoftext|> tokens",
    "women's long-sleeve floral-print maxi dress, size XS/S/M, 100% cotton; machine-washable.",
    LONG,
]


def derive_vocab_files(folder):
    """vocab.json / merges.txt from OpenAI's merges file (the recipe in assets/README.md), not via clip.py."""
    lines = gzip.open(clip.BPE_FILE, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    symbols = list(hf_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == len(set(vocab)) == 49408
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tok():
    return clip.Tokenizer()


@pytest.fixture(scope="module")
def hf_ids(tmp_path_factory):
    folder = derive_vocab_files(tmp_path_factory.mktemp("hf_tok"))
    ref = CLIPTokenizer.from_pretrained(folder)  # vocab.json + merges.txt only: transformers' defaults
    return ref(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]


def test_ids_match_transformers(tok, hf_ids):
    ids = tok(TEXTS)
    assert ids.dtype == torch.long and ids.shape == (len(TEXTS), 77)
    for text, ours, ref in zip(TEXTS, ids, hf_ids):
        assert torch.equal(ours, ref), f"ids differ for {text[:40]!r}"


def test_layout(tok):
    ids = tok(["", "a photo of a cat", LONG])
    assert (ids[:, 0] == clip.BOS).all()
    assert (ids[0, 1:] == clip.EOS).all()  # empty caption: BOS then EOS padding
    assert ids[1, 6] == clip.EOS and (ids[1, 1:6] < clip.BOS).all()
    assert ids[2, -1] == clip.EOS and (ids[2, 1:-1] < clip.BOS).all()  # truncated, EOS kept
    assert torch.equal(tok("a photo of a cat"), ids[1:2])  # one string works too


def test_lengths_count_truncation(tok):
    n = tok.lengths(TEXTS)
    assert n[TEXTS.index("")] == 2 and n[TEXTS.index(LONG)] > 77
    assert [k > 77 for k in n] == [t == LONG for t in TEXTS]
    # untruncated captions: the length is where the first EOS lands, plus one
    ids = tok(TEXTS)
    for text, k, row in zip(TEXTS, n, ids):
        if k <= 77 and "<|" not in text:
            assert (row == clip.EOS).nonzero()[0].item() == k - 1


def test_saved_tokenizer_opens_in_transformers(tok, hf_ids, tmp_path):
    tok.save(tmp_path)
    ref = CLIPTokenizer.from_pretrained(tmp_path)
    assert ref.model_max_length == 77
    ids = ref(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, hf_ids)
