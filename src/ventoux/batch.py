"""The rows behind every generation: requests take a row, prefill their prompt in chunks, then decode
together one token per step; a finished or cancelled request gives its row back at once.

    batch = Batch(model, tokenizer, max_batch=8, kv_cache_bytes=2**30, prefill_budget=512)
    req = Request(prompt_ids, params, need=..., max_new=..., emit=events.append)  # see engine.check_request
    if batch.admit(req): ...          # False: no room now; try again after a step
    while batch.active(): batch.step()  # events go to each request's emit()

One step = prompt chunks of the prefilling requests, the fewest prompt tokens left first (one the last step
left out before all; admission order among equals), up to `prefill_budget` tokens (chunk boundaries depend
only on the request, so its tokens do not depend on what else runs), then one batched decode step over the
rows [0, hi) that hold decoding requests. Rows in that range that do not
decode (free, prefilling, kept) get position -1: the cache sends their writes to its scratch slot.

Cache layout: R rows x C slots, one capacity for every row (decode stays one batched product with static
shapes). C is the largest need among the running requests (prompt + max new tokens, capped at the window
or the context), rounded up to a power of two; R = min(max_batch, kv_cache_bytes // row bytes). So the
budget bounds the buffers actually allocated; a request that needs more room waits until a relayout
(a copy into new buffers: running rows first, then kept rows) can take it.

Prefix caching: a finished request's row keeps its keys (and its tokens) until the row is taken again.
A new request whose prompt starts with the tokens a row holds (finished or still running, same adapter)
starts its prefill after that prefix: in the same row when it is free, else after copying those slots into
its row. A rolling buffer that has wrapped holds only its last C positions, so it serves only a prefix
ending where it ends (a chat that continues); stale slots past the prefix are masked by the cache's
slot-position rule. For a prefix shared further back (a system prompt), prefix.py keeps snapshots; they
count against kv_cache_bytes and are evicted (least recently used) when the rows need the room.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .errors import EngineError
from .events import Event, TextState
from .lora import set_rows
from .params import SamplingParams
from .prefix import PrefixStore
from .sampling import Sampler

SNAPSHOT_MIN_TOKENS = 16  # a shorter shared prefix saves too little prefill to be worth a snapshot


def default_chunk(model) -> int:
    # A windowed chunk of C tokens attends over the W cached keys plus its own C, so a smaller chunk wastes
    # less attention; 1024 rows still keep the matrix products at full speed (benchmarks/prefill.py, 16K
    # prompt, W = 4096: 11% faster than 2048-token chunks). Full attention sees every earlier key anyway.
    w = model.config.sliding_window
    return min(w, 1024) if w else 2048


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    need: int  # cache positions it can use: prompt + max_new, capped at the window / context
    max_new: int  # tokens it may generate
    emit: Callable[[Event | Exception], None]  # an exception: the request failed (its row is free)
    index: int = 0  # Event.index of its events
    adapter: str | None = None
    # while it holds a row
    row: int = -1
    fed: list[int] = field(default_factory=list)  # tokens whose keys the row holds, from position 0
    next_token: int | None = None  # sampled, to be fed in the next decode step
    generated: int = 0
    reused: int = 0  # prompt tokens whose keys came from the prefix cache
    done: bool = False
    text: TextState | None = None
    chunk: int = 0
    stop_ids: frozenset = frozenset()
    order: int = 0
    checkpoint: int = 0  # a prefix length to snapshot during prefill (0: none)
    stalled: bool = False  # prefilling, and the last step fed it nothing: it goes first in the next


class Batch:
    def __init__(self, model, tokenizer, max_batch: int, kv_cache_bytes: int | None = None,
                 prefill_budget: int | None = None, decode=None, prefix_cache: bool = True):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.decode = model if decode is None else decode
        self.static_decode = decode is not None  # a compiled step: always every row (static shapes)
        self.device = model.device
        self.cache = KVCache(model.config, 1, dtype=model.dtype, device=model.device, capacity=0)
        self.cache.relayout(0, 1, [])
        self.slot_bytes = self.cache.bytes_per_slot()
        self.limit = self.cache.limit
        # Default: max_batch rows at the model's limit, and as much again for prefix snapshots.
        self.budget_bytes = (kv_cache_bytes if kv_cache_bytes is not None
                             else 2 * max_batch * (self.limit + 1) * self.slot_bytes)
        self.prefill_budget = prefill_budget
        self.prefix_cache = prefix_cache
        self.store = PrefixStore(model.config.sliding_window)
        # the tokenizer's ids only: a model may pad its vocabulary (load_tokenizer) with rows that are no tokens,
        # so their logits are dropped, as vLLM drops them, never sampled nor listed in logprobs
        self.vocab_size = min(tokenizer.vocab_size, model.config.vocab_size)
        self.sampler = Sampler(0, self.vocab_size, self.device)
        self.rows: list[Request | None] = []  # the request holding each row; a done one: kept for its prefix
        self.prefix_hits = self.prefix_tokens = 0
        self._clock = 0

    # ---- admission ---------------------------------------------------------------------------
    def fits_ever(self, need: int) -> bool:
        return (need + 1) * self.slot_bytes <= self.budget_bytes

    def active(self) -> list[Request]:
        return sorted((r for r in self.rows if r is not None and not r.done), key=lambda r: r.order)

    def admit(self, req: Request) -> bool:
        """Give `req` a row if there is room (relayout if that makes room); False: not now."""
        running = self.active()
        if len(running) >= self.max_batch:
            return False
        if not (self._free() and req.need <= self.cache.capacity):
            layout = self._layout(max([req.need] + [r.need for r in running]), len(running) + 1)
            if layout is None or layout == (self.cache.batch_size, self.cache.capacity):
                return False
            self._relayout(*layout)
        row, m = self._place(req)
        self.store.evict_to(self.budget_bytes - self.cache.nbytes)
        p = req.params
        req.row, req.fed, req.reused = row, req.prompt[:m], m
        req.text = TextState(self.tokenizer.stream_decoder(), p.stop or [])
        req.chunk = min(p.prefill_chunk or default_chunk(self.model), self.prefill_budget or 1 << 62)
        req.stop_ids = frozenset({*([] if p.ignore_eos else [self.tokenizer.eos_id]), *(p.stop_token_ids or [])})
        self._clock += 1
        req.order = self._clock
        self.rows[row] = req
        self.sampler.take(row, p, req.prompt)
        self.prefix_hits += m > 0
        self.prefix_tokens += m
        return True

    def _free(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is None or r.done]

    def _layout(self, need: int, rows: int) -> tuple[int, int] | None:
        """The (rows, capacity) with room for `rows` rows of `need` slots within the budget, if any."""
        for cap in (min(self.limit, 1 << max(need - 1, 15).bit_length()), need):
            r = min(self.max_batch, self.budget_bytes // ((cap + 1) * self.slot_bytes))
            if r >= rows:
                return r, cap
        return None

    def reserve(self, rows: int, capacity: int) -> None:
        """Lay the cache out for `rows` rows of `capacity` slots now (a caller that knows every request)."""
        self._relayout(rows, min(capacity, self.limit))

    def _relayout(self, rows: int, cap: int) -> None:
        old_cap = self.cache.capacity
        running = self.active()
        kept = sorted((r for r in self.rows if r is not None and r.done and (len(r.fed) <= cap or cap == old_cap)),
                      key=lambda r: -r.order)
        keep = (running + kept)[:rows]
        self.store.evict_to(self.budget_bytes - rows * (cap + 1) * self.slot_bytes)
        moves = [(r.row, i, min(len(r.fed), old_cap)) for i, r in enumerate(keep)]
        self.cache.relayout(rows, cap, moves)
        self.sampler = self.sampler.moved(rows, [(r.row, i) for i, r in enumerate(running)])
        self.rows = [None] * rows
        for i, r in enumerate(keep):
            r.row, self.rows[i] = i, r

    def _place(self, req: Request) -> tuple[int, int]:
        """The row for `req` and how many prompt tokens it reuses (their keys copied in if needed)."""
        free = self._free()
        best, src, shared = 0, None, 0
        if self.prefix_cache:
            for other in self.rows:
                if other is None or other.adapter != req.adapter:
                    continue
                m = self._reusable(other, req.prompt)
                shared = max(shared, min(len(os.path.commonprefix([other.fed, req.prompt])), len(req.prompt) - 1))
                if m > best or (m == best and m and other.done):
                    best, src = m, other
            for sn in self.store.snapshots:
                if sn.adapter == req.adapter:
                    shared = max(shared, min(len(os.path.commonprefix([sn.tokens, req.prompt])), len(req.prompt) - 1))
            snap = self.store.find(req.prompt, req.adapter)
            if snap is not None and len(snap.tokens) > best:
                best, src = len(snap.tokens), snap
            # A longer shared prefix that nothing holds any more: snapshot it on the way (a system prompt)
            if shared >= max(best + 1, SNAPSHOT_MIN_TOKENS) and not self.store.covers(req.prompt[:shared], req.adapter):
                req.checkpoint = shared
        if isinstance(src, Request) and src.done:
            return src.row, best
        row = min(free, key=lambda i: (self.rows[i] is not None, self.rows[i].order if self.rows[i] else 0))
        if src is not None and not isinstance(src, Request):
            self.store.restore(self.cache, row, src)
        elif src is not None:
            n = best if len(src.fed) <= self.cache.capacity else self.cache.capacity  # a wrapped ring: all of it
            for store in (self.cache.k, self.cache.v):
                for t in store:
                    t[row, :, :n] = t[src.row, :, :n]
        return row, best

    def _reusable(self, other: Request, prompt: list[int]) -> int:
        """Prompt tokens whose keys `other`'s row still holds (at least one prompt token is left to run)."""
        n = len(other.fed)
        m = min(len(os.path.commonprefix([other.fed, prompt])), len(prompt) - 1)
        if n > self.cache.capacity and m < n:  # wrapped: only positions [n - C, n) are left
            return 0
        return m

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> None:
        budget = self.prefill_budget or 1 << 62
        # those with a token to feed before this step's prefill: a prompt that ends in it sends its first token
        # out with this step and decodes from the next (as vLLM's steps; decoding it here too held that token
        # back one decode step, 10% of a 128-token bf16 prefill)
        decoding = [r for r in self.active() if r.next_token is not None]
        # Fewest prompt tokens left first: in admission order a 56k-token prompt took every step's budget for
        # 8 s and a short request behind it waited as long for its first token (vLLM lets short prefills
        # through for the same reason). A prompt the last step fed nothing goes first, so a stream of short
        # ones cannot starve a long one: it gets a chunk at least every other step.
        for req in sorted(self.active(), key=lambda r: (not r.stalled, len(r.prompt) - len(r.fed))):
            fed = len(req.fed)
            while len(req.fed) < len(req.prompt):
                n = min(req.chunk, len(req.prompt) - len(req.fed))
                if len(req.fed) < req.checkpoint < len(req.fed) + n:
                    n = req.checkpoint - len(req.fed)  # a chunk boundary where the snapshot goes
                if n > budget:
                    break
                budget -= n
                logits = self._prefill(req, n)
                if len(req.fed) == req.checkpoint:
                    self._snapshot(req)
                if len(req.fed) == len(req.prompt):
                    self._deliver([req], logits[None])
            req.stalled = len(req.fed) == fed < len(req.prompt)
        if decoding:
            self._decode(decoding)

    def _snapshot(self, req: Request) -> None:
        nbytes = (min(req.checkpoint, self.store.window or req.checkpoint)) * self.slot_bytes
        self.store.evict_to(self.budget_bytes - self.cache.nbytes - nbytes)
        if self.cache.nbytes + self.store.nbytes + nbytes <= self.budget_bytes:
            self.store.save(self.cache, req.row, req.fed, req.adapter)

    def _prefill(self, req: Request, n: int) -> torch.Tensor:
        start = len(req.fed)
        ids = req.prompt[start:start + n]
        self._adapters([req])
        tokens = torch.tensor([ids], device=self.device)
        positions = torch.arange(start, start + n, device=self.device)[None]
        logits = self.model(tokens, positions, cache=self.cache.rows(slice(req.row, req.row + 1)), last_only=True)
        req.fed.extend(ids)
        return logits[0, -1]

    def _decode(self, reqs: list[Request]) -> None:
        hi = self.cache.batch_size if self.static_decode else 1 + max(r.row for r in reqs)
        tokens, positions = [0] * hi, [-1] * hi
        by_row = [None] * hi
        for r in reqs:
            tokens[r.row], positions[r.row], by_row[r.row] = r.next_token, len(r.fed), r
        self._adapters(by_row)
        cache = self.cache if hi == self.cache.batch_size else self.cache.rows(slice(0, hi))
        logits = self.decode(torch.tensor(tokens, device=self.device)[:, None],
                             torch.tensor(positions, device=self.device)[:, None], cache=cache)[:, -1]
        for r in reqs:
            r.fed.append(r.next_token)
        rows = [r.row for r in reqs]
        self._deliver(reqs, logits if rows == list(range(hi)) else logits[rows])

    def _adapters(self, reqs: list[Request | None]) -> None:
        """The LoRA hook: each forward row's adapter (None: the model's active ones, see lora.set_rows)."""
        set_rows(self.model, [r.adapter if r is not None else None for r in reqs])

    def _deliver(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """Sample each request's next token from its logits (n, V) and emit its event."""
        logits = logits[:, :self.vocab_size]
        broken = (~(logits < math.inf).all(-1)).tolist()  # a NaN or +inf: no distribution to sample from
        if any(broken):
            for req in (r for r, bad in zip(reqs, broken) if bad):
                self._release(req)
                self.rows[req.row] = None  # nor is its row a prefix to reuse
                req.emit(EngineError(f"the model's next-token logits hold NaN or inf after {len(req.fed)} tokens "
                                      "of this request: its weights overflow in this dtype (try float32 or "
                                      "bfloat16) or are broken"))
            keep = [i for i, bad in enumerate(broken) if not bad]
            reqs, logits = [reqs[i] for i in keep], logits[keep]
            if not reqs:
                return
        tokens = self.sampler(logits, [r.row for r in reqs]).tolist()
        lp = chosen = None
        if any(r.params.logprobs is not None for r in reqs):
            lp = logits.float().log_softmax(-1)
            chosen = lp.gather(-1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
        for i, (req, tok) in enumerate(zip(reqs, tokens)):
            ev = Event(req.index, "", tok)
            n = req.params.logprobs
            if n is not None:
                top = lp[i].topk(n) if n else None
                ev.logprob = chosen[i]
                ev.top_logprobs = dict(zip(top.indices.tolist(), top.values.tolist())) if n else {}
            if tok in req.stop_ids:
                ev.token, ev.finish_reason, ev.text = None, "stop", req.text.flush()
            else:
                req.generated += 1
                ev.text, hit = req.text.push(req.text.decoder.push(tok))
                if hit:
                    ev.finish_reason = "stop"
                elif req.generated >= req.max_new:
                    ev.finish_reason = "length"
                    ev.text += req.text.flush()
            if ev.finish_reason is None:
                req.next_token = tok
            else:
                self._release(req)
            req.emit(ev)

    # ---- leaving ------------------------------------------------------------------------------
    def _release(self, req: Request) -> None:
        req.done, req.next_token = True, None
        if not self.prefix_cache and self.rows[req.row] is req:
            self.rows[req.row] = None

    def cancel(self, req: Request) -> None:
        """Free `req`'s row now; its last event has finish_reason "cancelled"."""
        if req.row >= 0 and not req.done:
            self._release(req)
            req.emit(Event(req.index, "", None, finish_reason="cancelled"))

    def reset(self) -> list[Request]:
        """After a failed step: every running request leaves, kept prefixes are forgotten."""
        running = self.active()
        for r in running:
            r.done = True
        self.rows = [None] * len(self.rows)
        self.store.evict_to(0)
        return running

    def used_bytes(self) -> int:
        """Cache bytes the running requests can use (their need), within the budget."""
        return sum((r.need + 1) * self.slot_bytes for r in self.active())
