"""Token ids -> the text and bytes OpenAI's logprobs show, and the two logprobs shapes.

    pieces = TokenPieces(tokenizer)
    chat_logprobs(pieces, events)        # {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}
    completion_logprobs(pieces, events)  # {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
"""

from __future__ import annotations

import re
from functools import lru_cache

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece byte fallback


class TokenPieces:
    """One token's own bytes (tekken: its byte piece; sentencepiece: the piece, "▁" as a space, <0xNN> as
    that byte) and its text; a piece that is part of a multi-byte character shows as "bytes:\\xNN"."""

    def __init__(self, tokenizer):
        self.raw = tokenizer.mistral.instruct_tokenizer.tokenizer
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _bytes(self, token_id: int) -> bytes:
        if hasattr(self.raw, "id_to_byte_piece"):  # tekken
            from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

            return self.raw.id_to_byte_piece(token_id, SpecialTokenPolicy.KEEP)
        piece = self.raw.id_to_piece(token_id)
        byte = _BYTE_PIECE.fullmatch(piece)
        return bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode()

    def text(self, token_id: int) -> str:
        b = self.bytes(token_id)
        try:
            return b.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def _entry(pieces: TokenPieces, token_id: int, logprob: float) -> dict:
    return {"token": pieces.text(token_id), "logprob": logprob, "bytes": list(pieces.bytes(token_id))}


def chat_logprobs(pieces: TokenPieces, events) -> dict:
    """Chat completions' shape, over the events that carry a generated token."""
    return {"content": [{**_entry(pieces, ev.token, ev.logprob),
                         "top_logprobs": [_entry(pieces, t, lp) for t, lp in (ev.top_logprobs or {}).items()]}
                        for ev in events if ev.token is not None]}


def completion_logprobs(pieces: TokenPieces, events, offset: int = 0) -> dict:
    """Legacy completions' shape. text_offset is where each token starts in the completion's text (counted
    from `offset`): a token's piece may not be in the text ("bytes:\\xf0"), so the offset advances by the text
    each event added, and every byte of a multi-byte character starts where that character does."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ev in events:
        if ev.token is not None:
            out["tokens"].append(pieces.text(ev.token))
            out["token_logprobs"].append(ev.logprob)
            out["top_logprobs"].append({pieces.text(t): lp for t, lp in (ev.top_logprobs or {}).items()})
            out["text_offset"].append(offset)
        offset += len(ev.text)
    return out
