"""Sampling: validated parameters and small composable functions on (B, V) logits.

Every function works on the whole batch at once with per-row parameters (B,), so one decode step
serves rows with different settings without a Python loop over sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .errors import VentouxError


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF-style, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI-style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None  # None: off; n >= 0: chosen token's logprob and the top n alternatives
    prefill_chunk: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", _finite(self.temperature) and self.temperature >= 0, "a number >= 0 (0 is greedy)"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 turns it off)"),
            ("min_p", _finite(self.min_p) and 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", _finite(self.repetition_penalty) and self.repetition_penalty > 0,
             "a number > 0 (1 turns it off)"),
            ("presence_penalty", _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "in [-2, 2]"),
            ("frequency_penalty", _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "in [-2, 2]"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer or None"),
            ("stop", self.stop is None or all(isinstance(s, str) and s for s in self.stop),
             "a non-empty string or a list of them"),
            ("stop_token_ids", self.stop_token_ids is None or all(isinstance(t, int) for t in self.stop_token_ids),
             "a list of token ids"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "None or an integer in [0, 20]"),
            ("prefill_chunk", self.prefill_chunk is None or (isinstance(self.prefill_chunk, int)
                                                              and self.prefill_chunk >= 1), "an integer >= 1"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise VentouxError(f"invalid sampling parameter {name}={getattr(self, name)!r}: it must be {want}")

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @property
    def needs_history(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def apply_penalties(logits, seen, counts, repetition, presence, frequency):
    """seen (B, V) bool: prompt + output tokens; counts (B, V): output token counts."""
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalised, logits)
    return logits - presence * (counts > 0) - frequency * counts


def apply_top_k(logits, top_k):
    """top_k (B, 1), 0 = off."""
    v = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, v)).long().clamp(max=v)
    kth = torch.sort(logits, dim=-1, descending=True).values.gather(-1, k - 1)
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits, top_p):
    """Keep the smallest set of tokens whose probability reaches top_p (B, 1)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def apply_min_p(logits, min_p):
    probs = logits.softmax(-1)
    floor = min_p * probs.max(-1, keepdim=True).values
    return logits.masked_fill(probs < floor, -math.inf)


class Sampler:
    """Per-row sampling state for one batch: parameter tensors built once, token history kept on device.

        sampler = Sampler(params, prompts, vocab_size, device)
        tokens = sampler(logits)        # (B, V) -> (B,)
    """

    def __init__(self, params: list[SamplingParams], prompts: list[list[int]], vocab_size: int, device):
        self.params = params
        col = lambda name: torch.tensor([[float(getattr(p, name))] for p in params], device=device)  # noqa: E731
        self.temperature = col("temperature")
        self.all_greedy = all(p.temperature == 0 for p in params)
        self.top_k = col("top_k") if any(p.top_k for p in params) else None
        self.top_p = col("top_p") if any(p.top_p < 1 for p in params) else None
        self.min_p = col("min_p") if any(p.min_p > 0 for p in params) else None
        self.penalties = None
        if any(p.needs_history for p in params):
            self.penalties = [col(n) for n in ("repetition_penalty", "presence_penalty", "frequency_penalty")]
            self.seen = torch.zeros(len(params), vocab_size, dtype=torch.bool, device=device)
            for row, prompt in enumerate(prompts):
                self.seen[row, torch.tensor(prompt, device=device)] = True
            self.counts = torch.zeros(len(params), vocab_size, device=device)
        seeds = {p.seed for p in params}
        # One generator per batch: a seeded call draws the same tokens every time it runs.
        self.generator = None
        if seeds != {None}:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(next(s for s in seeds if s is not None))

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalties, temperature, then top-k / top-p / min-p, as transformers orders them."""
        if self.penalties is not None:
            logits = apply_penalties(logits, self.seen, self.counts, *self.penalties)
        logits = logits / torch.where(self.temperature > 0, self.temperature, 1.0)
        if self.top_k is not None:
            logits = apply_top_k(logits, self.top_k)
        if self.top_p is not None:
            logits = apply_top_p(logits, self.top_p)
        if self.min_p is not None:
            logits = apply_min_p(logits, self.min_p)
        return logits

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = self.process(logits)
        greedy = logits.argmax(-1)
        if self.all_greedy:
            tokens = greedy
        else:
            # Exponential race: argmax(p / E), E ~ Exp(1), is a draw from p and needs one generator.
            probs = logits.softmax(-1)
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
            tokens = torch.where(self.temperature[:, 0] == 0, greedy, (probs / noise).argmax(-1))
        if self.penalties is not None:
            self.seen[torch.arange(len(tokens)), tokens] = True
            self.counts[torch.arange(len(tokens)), tokens] += 1
        return tokens
