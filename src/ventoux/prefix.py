"""Prefix snapshots: the keys/values a prompt prefix leaves in a row, kept after the row moves on.

A row's rolling buffer keeps only the last C positions, so once a windowed request runs past its system
prompt, the window that ended the system prompt is overwritten. A snapshot copies what continuing after a
prefix of m tokens needs (positions [m - W, m), or [0, m) for full attention) into a small store; a later
prompt starting with those m tokens (and asking for the same adapter) gets them written into its row and
prefills from position m. The batch takes a snapshot when a new prompt shares a prefix with an earlier one
that no row can serve any more (a shared system prompt seen twice), at a prefill chunk boundary placed there.

    store = PrefixStore(window=cfg.sliding_window)
    store.save(cache, row, tokens[:m], adapter)       # after the row's prefill reached position m
    snap = store.find(prompt, adapter)                 # the longest stored prefix of prompt, or None
    store.restore(cache, row, snap)                    # its slots into row; prefill goes on from len(snap.tokens)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(eq=False)
class Snapshot:
    tokens: list[int]  # the prefix: positions [0, m)
    adapter: str | None
    lo: int  # first position held: m - W for a windowed model (or 0)
    k: list[torch.Tensor]  # per layer (Hkv, m - lo, D), positions lo .. m-1 in order
    v: list[torch.Tensor]
    nbytes: int
    used: int = 0  # last use (for eviction)


class PrefixStore:
    def __init__(self, window: int | None):
        self.window = window
        self.snapshots: list[Snapshot] = []
        self._clock = 0

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.snapshots)

    def find(self, prompt: list[int], adapter: str | None) -> Snapshot | None:
        """The longest snapshot whose tokens start `prompt` and leave at least one prompt token to run."""
        best = None
        for s in self.snapshots:
            m = len(s.tokens)
            longer = best is None or m > len(best.tokens)
            if longer and s.adapter == adapter and m < len(prompt) and prompt[:m] == s.tokens:
                best = s
        if best is not None:
            self._clock += 1
            best.used = self._clock
        return best

    def covers(self, tokens: list[int], adapter: str | None) -> bool:
        return any(s.adapter == adapter and s.tokens == tokens for s in self.snapshots)

    def save(self, cache, row: int, tokens: list[int], adapter: str | None) -> Snapshot:
        m = len(tokens)
        lo = max(0, m - self.window) if self.window else 0
        slots = torch.arange(lo, m, device=cache.k[0].device) % cache.capacity
        k = [t[row].index_select(1, slots) for t in cache.k]  # copies
        v = [t[row].index_select(1, slots) for t in cache.v]
        self._clock += 1
        snap = Snapshot(list(tokens), adapter, lo, k, v, (m - lo) * cache.bytes_per_slot(), self._clock)
        self.snapshots.append(snap)
        return snap

    def restore(self, cache, row: int, snap: Snapshot) -> None:
        m = len(snap.tokens)
        slots = torch.arange(snap.lo, m, device=cache.k[0].device) % cache.capacity
        for store, saved in ((cache.k, snap.k), (cache.v, snap.v)):
            for t, s in zip(store, saved):
                t[row].index_copy_(1, slots, s)

    def evict_to(self, nbytes: int) -> None:
        """Drop the least recently used snapshots until the store holds at most nbytes."""
        self.snapshots.sort(key=lambda s: s.used)
        while self.snapshots and self.nbytes > nbytes:
            self.snapshots.pop(0)
