"""Generation as a stack: Batch (prefill / decode step) -> stream() events -> generate() completions.

    for ev in stream(model, tokenizer, [ids_a, ids_b], [params_a, params_b]):
        print(ev.index, ev.text, end="")
    completions = generate(model, tokenizer, prompts, params)

One loop serves the CLI, the Python API and (later) the server. Prompts are prefilled one by one in
chunks into their own cache row; then every row decodes together, one token per step, with a
preallocated cache so shapes never change. A finished row stays in the batch with its position
frozen (its outputs are ignored) until the batch ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .errors import VentouxError
from .sampling import Sampler, SamplingParams


@dataclass
class Event:
    index: int  # which prompt of the batch
    text: str  # text delta ("" while a multi-byte character or a possible stop string is held back)
    token: int | None  # the new token id; None on a closing event that only flushes text
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None  # "stop" or "length" on the sequence's last event


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


class Batch:
    """Model + cache for a fixed set of rows: prefill(row, ids) then step(tokens) for all rows."""

    def __init__(self, model, batch_size: int, n_positions: int, decode=None):
        self.model = model
        self.decode = model if decode is None else decode  # the decode step: the model, or its compiled twin
        cfg = model.config
        device = model.tok_embeddings.weight.device
        dtype = model.tok_embeddings.weight.dtype
        self.cache = KVCache(cfg, batch_size, dtype=dtype, device=device, capacity=0)
        self.cache.reserve(n_positions, final=True)
        self.device = device

    def prefill(self, row: int, ids: list[int], chunk: int) -> torch.Tensor:
        """Run a prompt through row `row` in chunks; returns the last position's logits (V,)."""
        view = self.cache.rows(slice(row, row + 1))
        tokens = torch.tensor(ids, device=self.device)[None]  # (1, T)
        for start in range(0, len(ids), chunk):
            end = min(start + chunk, len(ids))
            positions = torch.arange(start, end, device=self.device)[None]
            logits = self.model(tokens[:, start:end], positions, cache=view, last_only=True)
        return logits[0, -1]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions (B,) -> next-token logits (B, V)."""
        return self.decode(tokens[:, None], positions[:, None], cache=self.cache)[:, -1]


@dataclass
class _Row:
    """Per-sequence text state: incremental detokenisation and stop-string hold-back."""

    decoder: object
    stops: list[str]
    held: str = ""
    done: bool = False
    tokens: list[int] = field(default_factory=list)

    def push(self, piece: str) -> tuple[str, bool]:
        """Add decoded text; returns (text safe to emit, hit a stop string)."""
        buf = self.held + piece
        for s in self.stops:
            i = buf.find(s)
            if i >= 0:
                self.held = ""
                return buf[:i], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False


def default_chunk(model) -> int:
    # A windowed chunk of C tokens attends over the W cached keys plus its own C, so a smaller chunk wastes
    # less attention; 1024 rows still keep the matrix products at full speed (benchmarks/prefill.py, 16K
    # prompt, W = 4096: 11% faster than 2048-token chunks). Full attention sees every earlier key anyway.
    w = model.config.sliding_window
    return min(w, 1024) if w else 2048


def stream(model, tokenizer, prompts: list[list[int]], params: list[SamplingParams],
           decode=None) -> Iterator[Event]:
    """Prefill each prompt, then decode every row together (with `decode`, a compiled model, if given)."""
    cfg = model.config
    if not prompts:
        raise VentouxError("no prompt given: pass a string, a list of token ids, or a list of prompts")
    for i, ids in enumerate(prompts):
        if not ids:
            raise VentouxError(f"prompt {i} is empty: give at least one token of text")
        if cfg.sliding_window is None and len(ids) >= cfg.max_seq_len:
            raise VentouxError(f"prompt {i} has {len(ids)} tokens but the model's context is {cfg.max_seq_len} "
                               "(full attention): shorten the prompt")
        if max(ids) >= cfg.vocab_size or min(ids) < 0:
            raise VentouxError(f"prompt {i} has a token id outside the vocabulary [0, {cfg.vocab_size})")
    b = len(prompts)
    # Generated-token budget per row: max_tokens, and for full attention whatever the context leaves.
    budget = [p.max_tokens if cfg.sliding_window else min(p.max_tokens, cfg.max_seq_len - len(ids))
              for ids, p in zip(prompts, params)]
    batch = Batch(model, b, max(len(ids) + n for ids, n in zip(prompts, budget)), decode)
    sampler = Sampler(params, prompts, cfg.vocab_size, batch.device)
    want_logprobs = any(p.logprobs is not None for p in params)
    top_n = max((p.logprobs or 0) for p in params)
    stop_ids = [{tokenizer.eos_id, *(p.stop_token_ids or [])} for p in params]
    rows = [_Row(tokenizer.stream_decoder(), p.stop or []) for p in params]

    with torch.inference_mode():
        logits = torch.stack([batch.prefill(i, ids, p.prefill_chunk or default_chunk(model))
                              for i, (ids, p) in enumerate(zip(prompts, params))])  # (B, V)
        positions = torch.tensor([len(ids) for ids in prompts], device=batch.device)
        live = torch.ones(b, dtype=torch.long, device=batch.device)  # 0 once a row has finished
        while True:
            tokens = sampler(logits)
            if want_logprobs:
                lp = logits.float().log_softmax(-1)
                chosen = lp.gather(-1, tokens[:, None])[:, 0].tolist()
                top = lp.topk(top_n, -1) if top_n else None
            token_list = tokens.tolist()
            for i, (row, tok) in enumerate(zip(rows, token_list)):
                if row.done:
                    continue
                ev = Event(i, "", tok)
                if want_logprobs and params[i].logprobs is not None:
                    ev.logprob = chosen[i]
                    n = params[i].logprobs
                    ev.top_logprobs = ({int(t): float(v) for t, v in zip(top.indices[i, :n], top.values[i, :n])}
                                       if n else {})
                if tok in stop_ids[i]:
                    ev.token, ev.finish_reason = None, "stop"
                    ev.text = _flush(row)
                else:
                    row.tokens.append(tok)
                    ev.text, hit = row.push(row.decoder.push(tok))
                    if hit:
                        ev.finish_reason = "stop"
                    elif len(row.tokens) >= budget[i]:
                        ev.finish_reason = "length"
                        ev.text += _flush(row)
                if ev.finish_reason is not None:
                    row.done = True
                    live[i] = 0
                yield ev
            if all(r.done for r in rows):
                return
            # Live rows move one position on; finished rows repeat their last step harmlessly.
            positions = positions + live
            logits = batch.step(tokens, positions - 1)


def _flush(row: _Row) -> str:
    """The row's last text: what the decoder still holds, and held-back text that never became a stop."""
    text, hit = row.push(row.decoder.flush())
    return text if hit else text + row.held


def generate(model, tokenizer, prompts: list[list[int]], params: list[SamplingParams],
             decode=None) -> list[Completion]:
    out = [Completion("", [], "length", len(ids)) for ids in prompts]
    for p, c in zip(params, out):
        if p.logprobs is not None:
            c.logprobs, c.top_logprobs = [], []
    for ev in stream(model, tokenizer, prompts, params, decode):
        c = out[ev.index]
        c.text += ev.text
        if ev.token is not None:
            c.tokens.append(ev.token)
            if c.logprobs is not None:
                c.logprobs.append(ev.logprob)
                c.top_logprobs.append(ev.top_logprobs)
        if ev.finish_reason:
            c.finish_reason = ev.finish_reason
    return out
