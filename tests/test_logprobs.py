"""OpenAI's logprobs from token ids (server/logprobs.py), with Mistral's real tokenizers: each token's bytes are
the piece mistral-common holds for it, and a prompt's tokens put together give its text back, byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import V1

from ventoux.events import Event
from ventoux.server.logprobs import TokenPieces, chat_logprobs, completion_logprobs
from ventoux.tokenizer import load_tokenizer

TEKKEN = V1.parent / "tekken_240911.json"
TEXT = "Héllo wörld 𝄞 ok"  # the clef is rare enough to go by its bytes in both


@pytest.fixture(scope="module", params=["sentencepiece", "tekken"])
def tokenizer(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "tekken":
        shutil.copy(TEKKEN, folder / "tekken.json")
    else:
        shutil.copy(V1, folder / "tokenizer.model")
    return load_tokenizer(Path(folder))


def test_the_pieces_of_a_text_are_its_bytes(tokenizer):
    pieces = TokenPieces(tokenizer)
    ids = tokenizer.encode(TEXT, bos=False)
    joined = b"".join(pieces.bytes(i) for i in ids)
    # sentencepiece marks the first word's start with "▁", a space
    assert joined in (TEXT.encode(), b" " + TEXT.encode())
    assert any(len(pieces.bytes(i)) == 1 and pieces.bytes(i)[0] >= 0x80 for i in ids)  # the clef went by bytes
    for i in ids:
        try:
            assert pieces.text(i) == pieces.bytes(i).decode()
        except UnicodeDecodeError:  # part of a character: its bytes, written out
            assert pieces.text(i) == "bytes:" + "".join(f"\\x{b:02x}" for b in pieces.bytes(i))
    raw = tokenizer.mistral.instruct_tokenizer.tokenizer
    assert pieces.bytes(raw.bos_id) == b"<s>"  # a control token shows its name, not nothing


def test_chat_logprobs_skip_closing_events_and_keep_the_top_order(tokenizer):
    pieces = TokenPieces(tokenizer)
    a, b = tokenizer.encode(" ok yes", bos=False)[-2:]
    events = [Event(0, " ok", a, -0.5, {a: -0.5, b: -1.5}), Event(0, "", None, finish_reason="stop"),
              Event(0, " yes", b, -2.0, {})]
    assert chat_logprobs(pieces, events) == {"content": [
        {"token": pieces.text(a), "logprob": -0.5, "bytes": list(pieces.bytes(a)),
         "top_logprobs": [{"token": pieces.text(a), "logprob": -0.5, "bytes": list(pieces.bytes(a))},
                          {"token": pieces.text(b), "logprob": -1.5, "bytes": list(pieces.bytes(b))}]},
        {"token": pieces.text(b), "logprob": -2.0, "bytes": list(pieces.bytes(b)), "top_logprobs": []}]}


def test_completion_offsets_point_into_the_text_from_where_it_starts(tokenizer):
    pieces = TokenPieces(tokenizer)
    a, b = tokenizer.encode(" ok yes", bos=False)[-2:]
    # a held-back text ("", then two pieces' worth at once), a closing event with text but no token
    events = [Event(0, "", a, -0.5, {a: -0.5}), Event(0, " ok yes", b, -1.0, None), Event(0, "!", None),
              Event(0, "", a, -0.25, {})]
    assert completion_logprobs(pieces, events, offset=7) == {
        "tokens": [pieces.text(a), pieces.text(b), pieces.text(a)], "token_logprobs": [-0.5, -1.0, -0.25],
        "top_logprobs": [{pieces.text(a): -0.5}, {}, {}], "text_offset": [7, 7, 15]}
    assert completion_logprobs(pieces, events[1:])["text_offset"] == [0, 8]  # from the start by default
