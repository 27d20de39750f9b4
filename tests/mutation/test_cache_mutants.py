"""KVCache behaviours that mutation testing (mutation/README.md) found unpinned: rows at different positions
in one step, idle rows on the scratch slot, one head of keys, the static shapes of a final cache, growth,
relayout, dtype and the byte count. Logits are checked against transformers' Mistral run on each row alone;
the rest against values computed here from the documented layout."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, TINY_FULL, hf_model, ventoux_from_hf

from ventoux.cache import KVCache


@pytest.mark.parametrize("final", [False, True])
@pytest.mark.parametrize("cfg", [TINY.replace(n_kv_heads=1), TINY_FULL], ids=["windowed-1kv", "full"])
def test_rows_at_different_positions_and_an_idle_row_match_transformers(cfg, final, one_thread):
    """Two rows prefilled together, then decoded at different positions, row 1 idle (position -1) for a few
    steps past its window: each row's logits are those of transformers on that row's tokens alone."""
    hf = hf_model(cfg, seed=3)
    vx = ventoux_from_hf(hf)
    g = torch.Generator().manual_seed(4)
    seqs = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    with torch.no_grad():
        ref = hf(seqs).logits  # (2, 24, V): each row alone (no padding, no mask needed)
        alone = hf(torch.tensor([[0]])).logits[0]  # (1, V)
        cache = KVCache(cfg, 2, capacity=4)
        if final:
            cache.reserve(24, final=True)
        out = vx(seqs[:, :6], torch.arange(6).expand(2, 6), cache=cache)  # both rows at once
        got = {0: [out[0]], 1: [out[1]]}
        # Row 1 alone on to position 11.
        got[1].append(vx(seqs[1:, 6:12], torch.arange(6, 12)[None], cache=cache.rows(slice(1, 2)))[0])
        # Decode: row 0 from 6, row 1 from 12 but idle (-1) for its first 5 steps.
        p1 = 12
        for p0 in range(6, 24):
            idle = p0 < 11 or p1 >= 24
            pos = torch.tensor([[p0], [-1 if idle else p1]])
            tok = torch.stack([seqs[0, p0:p0 + 1], seqs[1, p1:p1 + 1] if not idle else torch.tensor([0])])
            out = vx(tok, pos, cache=cache)
            got[0].append(out[0])
            if idle:  # it attends to its own key alone, so its logits are those of token 0 on its own
                torch.testing.assert_close(out[1], alone, atol=1e-4, rtol=0)
            if not idle:
                got[1].append(out[1])
                p1 += 1
    torch.testing.assert_close(torch.cat(got[0]), ref[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(got[1]), ref[1, :p1], atol=1e-4, rtol=0)


def _fits(positions: torch.Tensor, capacity: int) -> bool:
    return int(positions.max()) + 1 <= capacity


def test_chunks_that_fit_are_written_first_and_others_attend_over_buffer_plus_chunk():
    """write_first (attend over the buffer itself, no copy of buffer + chunk) for every one-token step and for
    every chunk whose last position still fits the ring without wrapping; a wrapping chunk must not."""
    cache = KVCache(TINY.replace(sliding_window=4), 1, capacity=4)  # limit = capacity = 4
    assert cache.capacity == cache.limit == 4
    for chunk, expected in [((0, 1), True), ((0, 1, 2, 3), True), ((2, 3, 4), False), ((4, 5), False),
                            ((9,), True)]:
        pos = torch.tensor([chunk])
        assert expected == (len(chunk) == 1 or _fits(pos, 4))  # the rule, stated independently
        assert cache.prepare(pos).write_first is expected, chunk
    full = KVCache(TINY_FULL, 1, capacity=4)
    full.reserve(8, final=True)
    assert full.prepare(torch.tensor([[20]])).write_first is True  # one token on a final cache
    assert full.prepare(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])).write_first is True


def test_a_final_cache_keeps_its_shape_in_one_token_steps_and_grows_for_chunks():
    cfg = TINY_FULL  # full attention: limit = max_seq_len = 96
    growing = KVCache(cfg, 1, capacity=4)
    growing.prepare(torch.tensor([[10]]))
    assert growing.capacity == 11  # not final: a one-token step past the buffer grows it
    final = KVCache(cfg, 1, capacity=4)
    final.reserve(4, final=True)
    final.reserve(2)  # a later reserve does not undo final
    final.prepare(torch.tensor([[10]]))
    assert final.capacity == 4 and final.k[0].shape[2] == 5  # static shapes: no growth check
    final.prepare(torch.tensor([[4, 5]]))
    assert final.capacity == 8  # a chunk still checks (and doubles the buffer)
    relaid = KVCache(cfg, 2, capacity=8)
    relaid.relayout(1, 4, [])
    relaid.prepare(torch.tensor([[10]]))
    assert relaid.capacity == 4  # a relayout is final too


def test_reserve_allocates_what_is_asked_doubles_when_growing_and_stops_at_the_limit():
    cache = KVCache(TINY_FULL, 3, dtype=torch.bfloat16, capacity=1)
    assert cache.capacity == 1 and cache.batch_size == 3
    assert all(t.shape == (3, 2, 1 + 1, 16) for t in cache.k + cache.v)  # ring + scratch slot
    cache.reserve(1)
    assert cache.capacity == 1
    cache.reserve(3)
    assert cache.capacity == 3
    cache.reserve(4)
    assert cache.capacity == 6  # at least twice the old buffer: amortised copies
    cache.reserve(1000)
    assert cache.capacity == 96
    assert all(t.dtype == torch.bfloat16 and t.shape == (3, 2, 97, 16) for t in cache.k + cache.v)


def test_bytes_per_slot_is_keys_and_values_of_every_layer():
    cfg = TINY_FULL  # 3 layers, 2 kv heads of 16
    for dtype, size in ((torch.bfloat16, 2), (torch.float32, 4)):
        cache = KVCache(cfg, 2, dtype=dtype, capacity=5)
        expected = 2 * 3 * 2 * 16 * size
        assert type(cache.bytes_per_slot()) is int and cache.bytes_per_slot() == expected
        assert cache.nbytes == expected * 2 * (5 + 1)  # from the tensors themselves: rows x (ring + scratch)


def test_relayout_moves_rows_keeps_dtype_and_refuses_moves_that_do_not_fit():
    cache = KVCache(TINY_FULL, 3, dtype=torch.bfloat16, capacity=8)
    g = torch.Generator().manual_seed(0)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g))
    old_k, old_v = [t.clone() for t in cache.k], [t.clone() for t in cache.v]
    cache.relayout(2, 6, [(2, 0, 6), (0, 1, 3)])  # a move may fill the whole new ring
    assert cache.batch_size == 2 and cache.capacity == 6
    for new, old in zip(cache.k + cache.v, old_k + old_v):
        assert new.dtype == torch.bfloat16 and new.shape == (2, 2, 7, 16)
        assert torch.equal(new[0, :, :6], old[2, :, :6]) and torch.equal(new[1, :, :3], old[0, :, :3])
        assert not new[1, :, 3:].any() and not new[:, :, 6].any()  # the rest starts empty
    with pytest.raises(AssertionError):
        cache.relayout(2, 4, [(0, 0, 5)])  # 5 slots do not fit a ring of 4


def test_a_one_token_chunk_on_a_row_view_runs_on_the_kernels_as_on_the_modules(kernel_isa, tmp_path, monkeypatch):
    """A prefill whose last chunk is one token, on one row of the cache (cache.rows): the block kernel writes and
    attends through the view's buffers, where model.Block's path writes the same bits."""
    from ventoux import cpu_kernels
    from ventoux.api import load_model
    from ventoux.fastblock import KernelBlock
    from ventoux.model import Block, swap_class
    from ventoux.weights import save_hf

    cfg = TINY.replace(dim=128, hidden_dim=256, n_heads=4, n_kv_heads=2, head_dim=32, n_layers=2)
    save_hf(ventoux_from_hf(hf_model(cfg)), tmp_path / "model")
    model = load_model(tmp_path / "model", cfg, torch.bfloat16)
    calls, kernel = [], cpu_kernels.decode_block_unchecked
    monkeypatch.setattr(cpu_kernels, "decode_block_unchecked", lambda *a: calls.append(1) or kernel(*a))
    tokens = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(6))
    results = []
    for cls in (KernelBlock, Block):
        swap_class(model, Block if cls is KernelBlock else KernelBlock, cls)
        cache = KVCache(cfg, 2, dtype=torch.bfloat16, capacity=16)
        with torch.inference_mode():
            model(tokens[:, :4], torch.arange(4).expand(2, 4), cache=cache)
            logits = model(tokens[1:, 4:], torch.tensor([[4]]), cache=cache.rows(slice(1, 2)))
        results.append((logits, cache.k[0], cache.v[0]))
    assert len(calls) == cfg.n_layers  # the one-token chunk of each block on the kernel
    (on_kernel, k0, v0), (expected, k1, v1) = results
    assert torch.equal(k0, k1) and torch.equal(v0, v1) and k0[1, :, 4].abs().sum() > 0 and not k0[0, :, 4].any()
    torch.testing.assert_close(on_kernel, expected, rtol=0.05, atol=0.05)
