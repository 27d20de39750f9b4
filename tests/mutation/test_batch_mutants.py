"""Batch behaviours that mutation testing (mutation/README.md) found unpinned: the cancelled event, a reset
after a failed step, the cache budget's arithmetic (the default, a request that fits exactly, the rows a
budget allows), the prefill chunk per model, the cache's dtype, and how many prompt tokens a finished row
lends to the next request (the whole prompt but its last token; a wrapped ring that a chat continues)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, TINY_FULL

from ventoux.batch import Batch, Request, default_chunk
from ventoux.engine import check_request
from ventoux.generate import generate
from ventoux.model import Transformer
from ventoux.sampling import SamplingParams


def _model(cfg, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Transformer(cfg.replace(vocab_size=32000)).eval().to(dtype)


@pytest.fixture(scope="module")
def windowed():  # window 8
    return _model(TINY, 3)


@pytest.fixture(scope="module")
def full():  # full attention, context 96
    return _model(TINY_FULL, 4)


def _ids(seed, n):
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _request(model, prompt, n, events, index=0):
    params = SamplingParams(max_tokens=n)
    need, max_new = check_request(model.config, prompt, params)
    return Request(prompt, params, need, max_new, emit=events.append, index=index)


def _run(batch, steps=200):
    with torch.inference_mode():
        for _ in range(steps):
            if not batch.active():
                return
            batch.step()
    pytest.fail(f"requests still running after {steps} steps")


def test_cancel_ends_with_one_empty_event_of_the_requests_index(windowed, v1_tokenizer):
    batch, events = Batch(windowed, v1_tokenizer, max_batch=2), []
    req = _request(windowed, _ids(1, 4), 50, events, index=7)
    assert batch.admit(req)
    with torch.inference_mode():
        batch.step()
    batch.cancel(req)
    last = events[-1]
    assert (last.index, last.text, last.token, last.finish_reason) == (7, "", None, "cancelled")
    count = len(events)
    batch.cancel(req)  # cancelled already: nothing more
    done = _request(windowed, _ids(2, 4), 2, events, index=8)
    assert batch.admit(done)
    _run(batch)
    assert events[-1].finish_reason == "length"
    count = len(events)
    batch.cancel(done)  # finished already: nothing more
    assert len(events) == count and not batch.active()


def test_reset_ends_every_running_request_and_forgets_the_prefixes(windowed, v1_tokenizer):
    batch, events = Batch(windowed, v1_tokenizer, max_batch=2), []
    system = _ids(3, 20)
    first = _request(windowed, system + _ids(4, 3), 2, events)
    assert batch.admit(first)
    _run(batch)
    second = _request(windowed, system + _ids(5, 3), 30, events)  # shares 20 tokens: snapshotted on the way
    assert batch.admit(second)
    with torch.inference_mode():
        batch.step()
    assert batch.store.nbytes > 0
    assert batch.reset() == [second]
    assert second.done and not batch.active() and batch.store.nbytes == 0


def test_the_budget_arithmetic(full, v1_tokenizer):
    slot, limit = Batch(full, v1_tokenizer, 1).slot_bytes, Batch(full, v1_tokenizer, 1).limit
    # the default: max_batch rows at the model's limit, and as much again for prefix snapshots
    assert Batch(full, v1_tokenizer, max_batch=3).budget_bytes == 2 * 3 * (limit + 1) * slot
    events = []
    a, b = _request(full, _ids(6, 10), 5, events), _request(full, _ids(7, 20), 7, events)
    exact = Batch(full, v1_tokenizer, max_batch=2, kv_cache_bytes=(a.need + 1) * slot)
    assert exact.fits_ever(a.need) and not exact.fits_ever(a.need + 1)  # one row and its scratch slot, exactly
    roomy = Batch(full, v1_tokenizer, max_batch=4)
    assert roomy.admit(a) and roomy.admit(b)
    assert roomy.used_bytes() == (a.need + 1 + b.need + 1) * slot
    # just under three rows at the limit: two rows, never three
    tight = Batch(full, v1_tokenizer, max_batch=4, kv_cache_bytes=3 * (limit + 1) * slot - 1)
    reqs = [_request(full, _ids(10 + i, 40), limit - 40, events) for i in range(3)]
    assert [tight.admit(r) for r in reqs] == [True, True, False]
    assert tight.cache.nbytes <= tight.budget_bytes


def test_prefill_chunks_and_the_cache_dtype(windowed, full, v1_tokenizer):
    assert default_chunk(windowed) == 8 and default_chunk(full) == 2048
    assert default_chunk(SimpleNamespace(config=SimpleNamespace(sliding_window=4096))) == 1024
    batch, events = Batch(windowed, v1_tokenizer, max_batch=1), []
    req = _request(windowed, _ids(20, 5), 2, events)
    assert batch.admit(req) and req.chunk == 8
    half = _model(TINY, 3, torch.bfloat16)
    assert Batch(half, v1_tokenizer, max_batch=1).cache.k[0].dtype == torch.bfloat16


def test_a_finished_row_lends_all_but_the_last_prompt_token(full, v1_tokenizer):
    """The same prompt again reuses every prompt token but the last (whose logits the new request needs)."""
    prompt = _ids(30, 12)
    want = generate(full, v1_tokenizer, [prompt], [SamplingParams(max_tokens=6)])[0].tokens
    batch, tokens = Batch(full, v1_tokenizer, max_batch=1), []
    for _ in range(2):
        events = []
        assert batch.admit(_request(full, prompt, 6, events))
        _run(batch)
        tokens.append([e.token for e in events if e.token is not None])
    assert tokens == [want, want] and batch.prefix_tokens == len(prompt) - 1


@pytest.mark.parametrize("generated", [4, 11])  # fed 8, the ring's capacity exactly; fed 15: wrapped
def test_a_chat_that_continues_a_row_reuses_all_it_fed(windowed, v1_tokenizer, generated):
    prompt = _ids(40, 5)
    batch, events = Batch(windowed, v1_tokenizer, max_batch=1), []
    first = _request(windowed, prompt, generated, events)
    assert batch.admit(first)
    _run(batch)
    assert batch.cache.capacity == 8 and len(first.fed) == 5 + generated - 1
    turn = first.fed + _ids(41, 3)
    want = generate(windowed, v1_tokenizer, [turn], [SamplingParams(max_tokens=5)])[0].tokens
    events = []
    assert batch.admit(_request(windowed, turn, 5, events))
    _run(batch)
    assert [e.token for e in events if e.token is not None] == want
    assert batch.prefix_tokens == len(first.fed)


@pytest.mark.parametrize("generated, reused", [(4, 6), (11, 0)])
def test_a_prompt_that_branches_off_a_row_reuses_it_only_unwrapped(windowed, v1_tokenizer, generated, reused):
    """A prompt that leaves a row's tokens at position 6: a row that fed 8 tokens (its capacity, the ring
    not wrapped) still holds positions 0..5; one that fed 15 holds only 7..14, so nothing is reused."""
    batch, events = Batch(windowed, v1_tokenizer, max_batch=1), []
    first = _request(windowed, _ids(50, 5), generated, events)
    assert batch.admit(first)
    _run(batch)
    branch = first.fed[:6] + _ids(51, 4)
    want = generate(windowed, v1_tokenizer, [branch], [SamplingParams(max_tokens=5)])[0].tokens
    events = []
    assert batch.admit(_request(windowed, branch, 5, events))
    _run(batch)
    assert [e.token for e in events if e.token is not None] == want and batch.prefix_tokens == reused
