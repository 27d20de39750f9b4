"""Sampling: validated parameters and small composable functions on (B, V) logits.

Every function works on the whole batch at once with per-row parameters (B,), so one decode step
serves rows with different settings without a Python loop over sequences.

SamplingParams lives in params.py (no torch import there, so the CLI can build its flags from it).
"""

from __future__ import annotations

import math

import torch

from .params import SamplingParams  # noqa: F401  (re-exported: its old home)


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
