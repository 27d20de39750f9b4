"""Prefix snapshots (prefix.py) behaviours that mutation testing (mutation/README.md) found unpinned, on a real
KVCache: a full-attention snapshot keeps every position from 0, a snapshot never covers a whole prompt, eviction
drops the least recently used (a find counts as a use) and stops at the budget exactly."""

from __future__ import annotations

import torch
from conftest import TINY, TINY_FULL

from ventoux.cache import KVCache
from ventoux.prefix import PrefixStore


def _filled(cfg, rows=2, capacity=16):
    cache = KVCache(cfg, rows, capacity=capacity)
    gen = torch.Generator().manual_seed(0)
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape, generator=gen))
    return cache


def test_a_full_attention_snapshot_keeps_every_position_and_restores_them():
    cache = _filled(TINY_FULL)
    store = PrefixStore(window=None)
    snap = store.save(cache, 0, list(range(10)), None)
    assert snap.lo == 0 and snap.nbytes == 10 * cache.bytes_per_slot() == store.nbytes
    store.restore(cache, 1, snap)
    for t in (*cache.k, *cache.v):
        assert torch.equal(t[1, :, :10], t[0, :, :10]) and not torch.equal(t[1, :, 10:16], t[0, :, 10:16])


def test_a_windowed_snapshot_keeps_the_last_window_of_positions():
    cache = _filled(TINY)  # window 8: a ring of 8 slots
    store = PrefixStore(window=TINY.sliding_window)
    snap = store.save(cache, 0, list(range(11)), "a")  # positions 3..10 in slots 3..7, 0..2
    assert snap.lo == 3 and snap.nbytes == 8 * cache.bytes_per_slot()
    slots = torch.tensor([3, 4, 5, 6, 7, 0, 1, 2])
    assert all(torch.equal(s, t[0].index_select(1, slots)) for s, t in zip(snap.k, cache.k))


def test_find_takes_the_longest_prefix_that_leaves_a_token_to_run():
    cache = _filled(TINY_FULL)
    store = PrefixStore(window=None)
    short, long = store.save(cache, 0, [1, 2, 3], None), store.save(cache, 0, [1, 2, 3, 4, 5], None)
    assert store.find([1, 2, 3, 4, 5, 6], None) is long
    assert store.find([1, 2, 3, 4, 5], None) is short  # all of `long`: nothing would be left to prefill
    assert store.find([1, 2, 3, 4, 5, 6], "a") is None  # another adapter's keys
    assert store.covers([1, 2, 3], None) and not store.covers([1, 2], None) and not store.covers([1, 2, 3], "a")


def test_eviction_drops_the_least_recently_used_down_to_the_budget_exactly():
    cache = _filled(TINY_FULL)
    store = PrefixStore(window=None)
    first = store.save(cache, 0, [1, 2, 3, 4], None)
    assert store.find([1, 2, 3, 4, 9], None) is first  # used after it was saved
    second = store.save(cache, 0, [5, 6, 7, 8], None)
    store.evict_to(store.nbytes)  # within the budget already: nothing goes
    assert store.snapshots == [first, second]
    assert store.find([1, 2, 3, 4, 9], None) is first  # first is now the more recently used
    store.evict_to(store.nbytes - 1)
    assert store.snapshots == [first]
    third = store.save(cache, 0, [9, 9, 9, 9], None)
    store.evict_to(third.nbytes)  # a save is a use too: the older first goes
    assert store.snapshots == [third]
