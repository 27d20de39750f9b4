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
    drop_sorted[..., 0] = False  # the most likely token always stays (a tiny top_p keeps it alone)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def apply_min_p(logits, min_p):
    probs = logits.softmax(-1)
    floor = min_p * probs.max(-1, keepdim=True).values
    return logits.masked_fill(probs < floor, -math.inf)


class Sampler:
    """Per-row sampling state for rows that requests take and give back (the engine's slots): parameter
    columns (R, 1), token history (R, V) and one torch.Generator per row, so a seeded request draws the
    same tokens whatever else shares its batch.

        sampler = Sampler(rows=4, vocab_size=V, device="cpu")
        sampler.take(2, params, prompt_ids)     # row 2 now serves this request
        tokens = sampler(logits, rows=[2, 0])    # (n, V) logits of those rows -> (n,) tokens
        sampler = Sampler.for_batch(params, prompts, V, device)  # rows 0..B-1 taken at once
    """

    COLUMNS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
               "frequency_penalty")

    def __init__(self, rows: int, vocab_size: int, device):
        self.vocab_size, self.device = vocab_size, torch.device(device)
        default = SamplingParams()
        self.params = [default] * rows
        self.generators: list[torch.Generator | None] = [None] * rows
        self.columns = {n: torch.full((rows, 1), float(getattr(default, n)), device=self.device)
                        for n in self.COLUMNS}
        self.seen = self.counts = None  # (R, V) prompt + output tokens, output counts: once a row needs them
        self.bias = None  # (R, V) each row's logit_bias, added to its logits first: once a row has one
        self._flags()

    @classmethod
    def for_batch(cls, params: list[SamplingParams], prompts: list[list[int]], vocab_size: int, device) -> Sampler:
        sampler = cls(len(params), vocab_size, device)
        for row, (p, ids) in enumerate(zip(params, prompts)):
            sampler.take(row, p, ids, refresh=False)
        sampler._flags()  # once, not per row: a batch of R rows costs O(R), not O(R^2)
        return sampler

    def take(self, row: int, params: SamplingParams, prompt: list[int], refresh: bool = True) -> None:
        """Row `row` now serves a request: its parameters, a fresh history and its own generator."""
        self.params[row] = params
        for n in self.COLUMNS:
            self.columns[n][row] = float(getattr(params, n))
        self.columns["top_k"][row] = min(params.top_k, self.vocab_size)  # float32 holds it exactly (2^63 it does not)
        if params.needs_history:
            if self.seen is None:
                self.seen = torch.zeros(len(self.params), self.vocab_size, dtype=torch.bool, device=self.device)
                self.counts = torch.zeros(len(self.params), self.vocab_size, device=self.device)
            self.seen[row] = False
            self.seen[row, torch.tensor(prompt, device=self.device)] = True
            self.counts[row] = 0
        if params.logit_bias and self.bias is None:
            self.bias = torch.zeros(len(self.params), self.vocab_size, device=self.device)
        if self.bias is not None:
            self.bias[row] = 0
            if params.logit_bias:
                ids = torch.tensor(list(params.logit_bias), device=self.device)
                self.bias[row, ids] = torch.tensor(list(params.logit_bias.values()), dtype=self.bias.dtype,
                                                   device=self.device)
        self.generators[row] = None
        if params.temperature > 0:
            g = torch.Generator(device=self.device)
            if params.seed is None:
                g.seed()  # a fresh nondeterministic seed
            else:
                g.manual_seed(params.seed)
            self.generators[row] = g
        if refresh:
            self._flags()

    def moved(self, rows: int, moves: list[tuple[int, int]]) -> Sampler:
        """A sampler of `rows` rows where row new holds what row old held, for each (old, new) in moves."""
        out = Sampler(rows, self.vocab_size, self.device)
        for old, new in moves:
            out.params[new], out.generators[new] = self.params[old], self.generators[old]
            for n in self.COLUMNS:
                out.columns[n][new] = self.columns[n][old]
        if self.seen is not None:
            out.seen = torch.zeros(rows, self.vocab_size, dtype=torch.bool, device=self.device)
            out.counts = torch.zeros(rows, self.vocab_size, device=self.device)
            for old, new in moves:
                out.seen[new], out.counts[new] = self.seen[old], self.counts[old]
        if self.bias is not None:
            out.bias = torch.zeros(rows, self.vocab_size, device=self.device)
            for old, new in moves:
                out.bias[new] = self.bias[old]
        out._flags()
        return out

    def _flags(self):
        """Which filters any row uses (the others are skipped for the whole batch)."""
        ps = self.params
        self.use_top_k = any(p.top_k for p in ps)
        self.use_top_p = any(p.top_p < 1 for p in ps)
        self.use_min_p = any(p.min_p > 0 for p in ps)
        self.use_penalties = any(p.needs_history for p in ps)
        self.use_bias = any(p.logit_bias for p in ps)

    def _index(self, rows):
        rows = range(len(self.params)) if rows is None else rows
        if list(rows) == list(range(len(rows))):
            return slice(0, len(rows))
        return torch.tensor(list(rows), device=self.device)

    def process(self, logits: torch.Tensor, rows=None) -> torch.Tensor:
        """logit_bias, penalties, temperature, then top-k / top-p / min-p, as transformers orders them."""
        idx = self._index(rows)
        if self.use_bias:
            logits = logits + self.bias[idx]
        col = {n: c[idx] for n, c in self.columns.items()}
        if self.use_penalties:
            logits = apply_penalties(logits, self.seen[idx], self.counts[idx], col["repetition_penalty"],
                                     col["presence_penalty"], col["frequency_penalty"])
        t = col["temperature"]
        logits = logits / torch.where(t > 0, t, 1.0)
        if self.use_top_k:
            logits = apply_top_k(logits, col["top_k"])
        if self.use_top_p:
            logits = apply_top_p(logits, col["top_p"])
        if self.use_min_p:
            logits = apply_min_p(logits, col["min_p"])
        return logits

    def __call__(self, logits: torch.Tensor, rows=None) -> torch.Tensor:
        """(n, V) logits of `rows` (default: every row, in order) -> (n,) tokens."""
        rows = list(range(len(self.params)) if rows is None else rows)
        sampled = [i for i, r in enumerate(rows) if self.generators[r] is not None]
        if not (sampled or self.use_penalties or self.use_bias):  # greedy rows: temperature 0 divides by 1, and
            return logits.argmax(-1)  # the filters keep the top token: the raw logits' argmax (a dozen ops fewer)
        logits = self.process(logits, rows)
        tokens = logits.argmax(-1)
        if sampled:
            # Exponential race: argmax(p / E), E ~ Exp(1), is a draw from p; each row's E from its own generator.
            probs = logits[sampled].softmax(-1)
            noise = torch.empty_like(probs)
            for j, i in enumerate(sampled):
                noise[j].exponential_(generator=self.generators[rows[i]])
            tokens[sampled] = (probs / noise).argmax(-1)
        if self.use_penalties:
            idx = torch.tensor(rows, device=self.device)
            self.seen[idx, tokens] = True
            self.counts[idx, tokens] += 1
        return tokens
