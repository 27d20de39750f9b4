"""Pretraining data (train/data.py) behaviours that mutation testing (mutation/README.md) found unpinned: where the
held-out split starts in each corner of the corpus convention, the smallest corpus a context accepts, what the token
cache keeps and when it is rebuilt, and the token width."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import sentencepiece as spm
from conftest import error_message

from ventoux.api import DEMO_MODEL
from ventoux.errors import VentouxError
from ventoux.train.data import _encode, load_corpus, split_heldout

TOKENIZER = DEMO_MODEL / "tokenizer.model"


@pytest.mark.parametrize("docs, fraction, split", [
    # the mark (character 3) falls on a document's first character: that document's first line still trains
    (["ab\n", "cd\nef\n", "gh\n"], 0.75, (["ab\n", "cd\n"], ["ef\n", "gh\n"])),
    # the newline the split takes is the document's first character
    (["ab", "\ncd\n"], 0.625, (["ab", "\n"], ["cd\n"])),
    # no newline after the mark in its document: that whole document trains, the next ones are held out
    (["ab\n", "cdef", "gh\n"], 0.5, (["ab\n", "cdef"], ["gh\n"])),
    (["ab\n", "cd\n"], 0.0, (["ab\n", "cd\n"], [])),
])
def test_heldout_split_corners(docs, fraction, split):
    assert split_heldout(docs, fraction) == split


def _corpus(path, n=40):
    path.write_text("".join(f"Line {i} of the text, and some words after it.\n" for i in range(n)))
    return path


_message = functools.partial(error_message, VentouxError)


def test_the_smallest_training_split_a_context_takes(tmp_path):
    text = _corpus(tmp_path / "t.txt")
    n = len(load_corpus([text], TOKENIZER, 0.0, tmp_path / "cache", 1).train)
    for folder in (tmp_path / "cache", tmp_path / "fresh"):  # the cached tokens are checked as the new ones are
        with pytest.raises(VentouxError) as e:
            load_corpus([text], TOKENIZER, 0.0, folder, n)
        assert str(e.value) == (f"the training split holds {n} tokens, fewer than one sequence of --context {n} "
                                f"needs ({n + 1}); give more text or a shorter --context")
        data = load_corpus([text], TOKENIZER, 0.0, folder, n - 1)  # n tokens: one sequence and its targets
        x, y = data.batch(seed=0, step=0, micro=0, batch_size=2, context=n - 1)
        assert x.tolist() == [data.train[:-1].tolist()] * 2 and y.tolist() == [data.train[1:].tolist()] * 2
    assert len(data.val) == 0 and data.val_chars == 0  # --val-fraction 0: nothing held out, and no complaint


def test_an_empty_heldout_split_is_refused_whole(tmp_path):
    one_line = tmp_path / "one.txt"
    one_line.write_text("A single line with no newline after the mark" * 3 + "\n")
    assert _message(lambda: load_corpus([one_line], TOKENIZER, 0.1, tmp_path / "cache", 4)) == (
        "the held-out split (--val-fraction 0.1) is empty; give more text or a larger --val-fraction")


def test_a_corpus_of_blank_documents_names_every_file(tmp_path):
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for f in files:
        f.write_text(json.dumps({"text": "  \n "}) + "\n")
    assert _message(lambda: load_corpus(files, TOKENIZER, 0.0, tmp_path / "cache", 4)) == (
        f"the corpus {files[0]}, {files[1]} holds no text; give a non-empty file")


def test_the_cache_is_read_only_described_and_rebuilt_when_its_inputs_change(tmp_path):
    text, cache = _corpus(tmp_path / "t.txt"), tmp_path / "cache"
    first = load_corpus([text], TOKENIZER, 0.1, cache, 8)
    meta = json.loads((cache / "meta.json").read_text())
    assert {k: v for k, v in meta.items() if k != "key"} == dict(
        dtype="uint16", train_tokens=len(first.train), val_tokens=len(first.val), val_chars=first.val_chars,
        files=[str(text)])
    again = load_corpus([text], TOKENIZER, 0.1, cache, 8)
    assert not again.train.flags.writeable  # training cannot write the cache
    assert again.train.tolist() == first.train.tolist() and again.val_chars == first.val_chars

    more = load_corpus([text], TOKENIZER, 0.5, cache, 8)  # another split: tokenised again into the same folder
    assert len(more.val) > len(first.val) and json.loads((cache / "meta.json").read_text())["key"] != meta["key"]
    _corpus(text, 80)  # the data changed
    assert len(load_corpus([text], TOKENIZER, 0.5, cache, 8).train) > len(more.train)

    (cache / "meta.json").write_text("{not json")  # damaged by hand: tokenised again, not a traceback
    assert load_corpus([text], TOKENIZER, 0.5, cache, 8).train.tolist() == \
        load_corpus([text], TOKENIZER, 0.5, tmp_path / "fresh", 8).train.tolist()
    (cache / "meta.json").write_text("[1, 2]")
    assert len(load_corpus([text], TOKENIZER, 0.5, cache, 8).train) > len(more.train)


class _Pieces:
    """A SentencePiece stand-in with `size` pieces: no tokenizer this large is small enough to build in a test."""

    def __init__(self, size):
        self.size = size

    def get_piece_size(self):
        return self.size

    def encode(self, docs):
        return [[self.size - 1, 3] for _ in docs]

    def bos_id(self):
        return 1

    def eos_id(self):
        return 2


def test_token_ids_are_stored_in_the_narrowest_width_that_holds_them():
    assert _encode(["a"], spm.SentencePieceProcessor(model_file=str(TOKENIZER))).dtype == np.uint16
    narrow = _encode(["a", "b"], _Pieces(2**16))
    assert narrow.dtype == np.uint16 and narrow.tolist() == [1, 2**16 - 1, 3, 2] * 2
    wide = _encode(["a"], _Pieces(2**16 + 1))
    assert wide.dtype == np.uint32 and wide.tolist() == [1, 2**16, 3, 2]
