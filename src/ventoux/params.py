"""Generation parameters: SamplingParams, validated, and the one table behind every surface.

SamplingParams is the one table behind every surface: each field's metadata gives its CLI flag
help, and whether the CLI (`ventoux generate/chat --top-p ...`) and HTTP requests (`ventoux serve`,
OpenAI field names) expose it. `surface_fields(surface)` lists a surface's fields with its defaults.
Defaults differ on purpose in two places, each the convention of that surface's users:

    field          Python API (llm.generate)   CLI flags        HTTP requests (OpenAI's)
    temperature    0.0 (greedy)                0.7              1.0
    max_tokens     256                         256              omitted: the server's --max-tokens-cap
    (every other field has the Python default on every surface)

logprobs is a request field of its own shape (chat: logprobs + top_logprobs; completions: logprobs=N),
stop_token_ids a request field only, prefill_chunk a CLI flag only (a server chooses its own chunks),
logit_bias a dict in Python and over HTTP and repeated ID=BIAS flags on the CLI.
"""

from __future__ import annotations

import math
from dataclasses import Field, dataclass, field, fields

from .errors import VentouxError


def _field(default, help: str, cli: bool = True, http: bool = True, **surface_defaults):
    """A SamplingParams field with its surfaces: help text, which surfaces show it, and any surface default
    (cli_default=, http_default=) that differs from the Python API's."""
    return field(default=default, metadata=dict(help=help, cli=cli, http=http, **surface_defaults))


@dataclass
class SamplingParams:
    max_tokens: int = _field(256, "most tokens to generate", http_default=None)
    temperature: float = _field(0.0, "softmax temperature; 0 is greedy", cli_default=0.7, http_default=1.0)
    top_p: float = _field(1.0, "nucleus sampling: keep the most likely tokens up to this mass")
    top_k: int = _field(0, "keep the k most likely tokens; 0 is off")
    min_p: float = _field(0.0, "drop tokens below min_p times the top probability")
    repetition_penalty: float = _field(1.0, "HF-style, over prompt and output tokens; 1 is off")
    presence_penalty: float = _field(0.0, "OpenAI-style, over output tokens")
    frequency_penalty: float = _field(0.0, "OpenAI-style, over output tokens")
    seed: int | None = _field(None, "random seed of this request's sampling")
    stop: list[str] | None = _field(None, "stop string (repeatable)")
    stop_token_ids: list[int] | None = _field(None, "token ids that end the sequence", cli=False)
    # vLLM's ignore_eos: its benchmarks send it so that every request decodes exactly max_tokens tokens
    ignore_eos: bool = _field(False, "keep generating past the end-of-sequence token, up to max_tokens")
    # OpenAI's logit_bias; JSON's string keys ("123") are taken as the ids they spell
    logit_bias: dict[int, float] | None = _field(None, "ID=BIAS: add BIAS in [-100, 100] to token ID's logit "
                                                 "before sampling; -100 bans it, 100 forces it (repeatable)")
    # None: off; n >= 0: chosen token's logprob and the top n alternatives
    logprobs: int | None = _field(None, "log-probabilities of the chosen and top-n tokens", cli=False, http=False)
    prefill_chunk: int | None = _field(None, "prompt tokens per prefill step", http=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.logit_bias, dict):
            self.logit_bias = {int(k) if isinstance(k, str) and k.isdecimal() else k: v
                               for k, v in self.logit_bias.items()}
        # Bounds keep every value finite and nonzero in the float32 columns the sampler divides by.
        checks = [
            ("max_tokens", _int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", _finite(self.temperature) and (self.temperature == 0 or 1e-4 <= self.temperature <= 100),
             "0 (greedy) or a number in [0.0001, 100]"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", _int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 turns it off)"),
            ("min_p", _finite(self.min_p) and 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", _finite(self.repetition_penalty) and 0.01 <= self.repetition_penalty <= 100,
             "a number in [0.01, 100] (1 turns it off)"),
            ("presence_penalty", _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "in [-2, 2]"),
            ("frequency_penalty", _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "in [-2, 2]"),
            ("seed", self.seed is None or (_int(self.seed) and -(2**63) <= self.seed < 2**64),
             "None or an integer that fits in 64 bits"),
            ("stop", self.stop is None or (isinstance(self.stop, (list, tuple))
                                           and all(isinstance(s, str) and s for s in self.stop)),
             "a non-empty string or a list of them"),
            ("stop_token_ids", self.stop_token_ids is None or (
                isinstance(self.stop_token_ids, (list, tuple)) and all(_int(t) and t >= 0 for t in self.stop_token_ids)
            ),
             "a list of token ids (integers >= 0)"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "True or False"),
            ("logit_bias", self.logit_bias is None or (
                isinstance(self.logit_bias, dict) and all(_int(t) and t >= 0 and _finite(b) and -100 <= b <= 100
                                                          for t, b in self.logit_bias.items())),
             "a map of token ids (integers >= 0) to biases in [-100, 100]"),
            ("logprobs", self.logprobs is None or (_int(self.logprobs) and 0 <= self.logprobs <= 20),
             "None or an integer in [0, 20]"),
            ("prefill_chunk", self.prefill_chunk is None or (_int(self.prefill_chunk) and self.prefill_chunk >= 1),
             "an integer >= 1"),
        ]
        for name, ok, want in checks:
            if not ok:
                value = _short(getattr(self, name))
                raise VentouxError(f"invalid sampling parameter {name}={value}: it must be {want}")

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def surface_fields(cls, surface: str) -> list[tuple[Field, object]]:
        """(field, its default on that surface) for each field `surface` ("cli" or "http") shows."""
        return [(f, f.metadata.get(f"{surface}_default", f.default)) for f in fields(cls)
                if f.metadata.get(surface)]

    @property
    def needs_history(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _short(value) -> str:
    """A value's repr for a one-line message: a 10,000-entry logit_bias is not printed whole."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # True is an int to Python, not a count to a user
