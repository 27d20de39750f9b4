"""Tokenizer training (train/tokenizer.py) behaviours that mutation testing (mutation/README.md) found unpinned: each
SentencePiece setting that makes it Mistral's (seen in what the trained model does, since no setting can be read
back without protobuf), the chunks SentencePiece is fed, long lines, and the refusals whole."""

from __future__ import annotations

import json
import random

import pytest
import sentencepiece as spm

from ventoux.errors import VentouxError
from ventoux.train import train_tokenizer
from ventoux.train.tokenizer import _CHUNK_CHARS, _chunks

WORDS = "the king my lord good sweet love night day fair heart death life thou art not so".split()


def _prose(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _train(tmp_path, text: str, vocab: int = 320, name: str = "t.txt"):
    (tmp_path / name).write_text(text, encoding="utf-8")
    path = train_tokenizer([tmp_path / name], vocab, tmp_path / "out")
    return spm.SentencePieceProcessor(model_file=str(path))


def test_chunks_are_whole_lines_up_to_the_limit_and_long_lines_are_cut_at_spaces():
    line = "x" * 900 + "\n"
    text = line * 5 + _prose(1000) + "\n" + "y" * 4500
    chunks = list(_chunks([text, "tail"]))
    assert "".join(chunks) == text + "tail"
    assert all(len(c) <= _CHUNK_CHARS for c in chunks)
    assert chunks[:3] == [line * 2, line * 2, line]  # a third line would pass the limit; the prose starts anew
    prose = chunks[3:6]
    assert [c[-1] for c in prose] == [" ", " ", "\n"]  # cut after a space, never inside a word
    assert set("".join(prose).split()) <= set(WORDS)
    assert chunks[-4:] == ["y" * 2000, "y" * 2000, "y" * 500, "tail"]  # no space at all: cut where the limit falls


def test_a_corpus_of_long_lines_trains(tmp_path):
    """A JSONL document is often one line longer than SentencePiece's sentence limit, which it skips silently:
    such a corpus once failed ("INTERNAL ... !sentences_.empty()")."""
    docs = tmp_path / "long.jsonl"
    docs.write_text("".join(json.dumps({"text": _prose(3000, seed)}) + "\n" for seed in range(3)))
    sp = spm.SentencePieceProcessor(model_file=str(train_tokenizer([docs], 320, tmp_path / "out")))
    assert sp.encode("the", out_type=str) == ["▁the"]  # its words were learned


def test_wide_characters_fill_a_chunk_and_still_train(tmp_path):
    """Lines of 2000 characters of 3 bytes each, one a chunk: past SentencePiece's default sentence limit (4192
    bytes), which would skip every one."""
    line = "日本語の文章です。" * 222 + "日\n"
    assert len(line) == _CHUNK_CHARS
    sp = _train(tmp_path, line * 3, vocab=280)
    assert len(sp.encode("日本語の文章です")) <= 3


def test_the_chunk_limit_is_inclusive():
    exact = "a" * (_CHUNK_CHARS - 1) + "\n"
    assert list(_chunks([exact * 2])) == [exact, exact]  # a line of exactly the limit is not cut
    half = "b" * (_CHUNK_CHARS // 2 - 1) + "\n"
    assert list(_chunks([half * 3])) == [half * 2, half]  # two lines filling the limit exactly share a chunk
    assert list(_chunks([" " + "z" * 2500])) == [" ", "z" * 2000, "z" * 500]  # the only space, at the start


def test_digits_stay_single_even_when_a_number_repeats(tmp_path):
    sp = _train(tmp_path, ("In 2024 the king. " * 50 + "\n") * 20, vocab=280)
    assert sp.encode("2024", out_type=str) == ["▁", "2", "0", "2", "4"]


def test_a_character_seen_once_gets_its_own_piece(tmp_path):
    """character_coverage 1.0: no character falls back to bytes because it is rare."""
    sp = _train(tmp_path, (_prose(2000) + "\n") * 3 + "ǂ\n")
    assert sp.encode("ǂ", out_type=str) == ["▁", "ǂ"]


def test_text_round_trips_exactly(tmp_path):
    sp = _train(tmp_path, (_prose(500) + "\n") * 4)
    for text in ["two  spaces  and\ttab", "ﬁnal ligature, Ｆｕｌｌ width", "  leading and trailing  "]:
        assert sp.decode(sp.encode(text)) == text  # no normalisation, no whitespace squeezed


def test_runs_of_spaces_become_pieces(tmp_path):
    sp = _train(tmp_path, ("def f():\n        return king\n" * 300), vocab=300)
    assert "▁▁▁▁" in {sp.id_to_piece(i) for i in range(sp.get_piece_size())}


def test_training_is_quiet_and_writes_into_new_or_existing_folders(tmp_path, capfd):
    (tmp_path / "t.txt").write_text((_prose(500) + "\n") * 4)
    nested = tmp_path / "a" / "b"
    assert train_tokenizer([tmp_path / "t.txt"], 320, nested) == nested / "tokenizer.model"
    assert train_tokenizer([tmp_path / "t.txt"], 320, nested) == nested / "tokenizer.model"  # again, same folder
    assert sorted(p.name for p in nested.iterdir()) == ["tokenizer.model"]
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # SentencePiece's own log stays off the user's terminal


def test_refusals_whole(tmp_path):
    (tmp_path / "t.txt").write_text((_prose(300) + "\n") * 2)
    with pytest.raises(VentouxError) as e:
        train_tokenizer([tmp_path / "t.txt"], 100000, tmp_path / "out")
    assert str(e.value).startswith("--vocab-size 100000 does not fit this corpus: Vocabulary size too high "
                                   "(100000). Please set it to a value <= ")
    blank = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for f in blank:
        f.write_text(json.dumps({"text": " \n "}) + "\n")
    with pytest.raises(VentouxError) as e:
        train_tokenizer(blank, 320, tmp_path / "out")
    assert str(e.value) == f"the corpus {blank[0]}, {blank[1]} holds no text; give a non-empty file"
    assert not (tmp_path / "out").exists()
