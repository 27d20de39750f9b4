"""What generation yields: one Event per new token (stream), one Completion per prompt (generate), and the
per-request text state that turns tokens into safe text deltas (incremental detokenisation, stop strings).

    text = TextState(tokenizer.stream_decoder(), stops=["\\n\\n"])
    delta, hit_stop = text.push(text.decoder.push(token_id))
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Event:
    index: int  # which prompt of the batch (0 for an engine request)
    text: str  # text delta ("" while a multi-byte character or a possible stop string is held back)
    token: int | None  # the new token id; None on a closing event that only flushes text
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None  # "stop", "length" or "cancelled" on the sequence's last event


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


@dataclass
class TextState:
    """Per-sequence text state: incremental detokenisation and stop-string hold-back."""

    decoder: object
    stops: list[str]
    held: str = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Add decoded text; returns (text safe to emit, hit a stop string)."""
        buf = self.held + piece
        found = [i for s in self.stops if (i := buf.find(s)) >= 0]
        if found:  # the earliest of them: the text returned holds no stop string (OpenAI's `stop`)
            self.held = ""
            return buf[:min(found)], True
        keep = _stop_start(buf, self.stops)
        self.held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The last text: what the decoder still holds, and held-back text that never became a stop."""
        text, _ = self.push(self.decoder.flush())
        return text + self.held  # nothing is held after a stop


def _stop_start(text: str, stops: list[str]) -> int:
    """The length of the longest end of text that begins a stop string (held back: the next tokens may complete
    it); text holds no whole stop string (push cut it). The work grows with the text held, not with the stop
    strings' length (each token tried every prefix of every stop: a 900 KB stop string cost seconds a token)."""
    for start in range(len(text)):
        if any(s.startswith(text[start:]) for s in stops):
            return len(text) - start
    return 0
