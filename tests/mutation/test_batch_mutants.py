"""Batch behaviours that mutation testing (mutation/README.md) found unpinned: the cancelled event, a reset
after a failed step, the cache budget's arithmetic (the default, a request that fits exactly, the rows a
budget allows), the prefill chunk per model, the cache's dtype, and how many prompt tokens a finished row
lends to the next request (the whole prompt but its last token; a wrapped ring that a chat continues)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, TINY_FULL, adapter_model, engine_model, random_ids

from ventoux.batch import Batch, Request, default_chunk
from ventoux.engine import check_request
from ventoux.errors import EngineError
from ventoux.generate import generate
from ventoux.sampling import SamplingParams


@pytest.fixture(scope="module")
def tuned():
    return adapter_model()


@pytest.fixture(scope="module")
def windowed():  # window 8
    return engine_model(TINY, 3)


@pytest.fixture(scope="module")
def full():  # full attention, context 96
    return engine_model(TINY_FULL, 4)


def _request(model, prompt, n, events, index=0, adapter=None):
    params = SamplingParams(max_tokens=n)
    need, max_new = check_request(model.config, prompt, params)
    return Request(prompt, params, need, max_new, emit=events.append, index=index, adapter=adapter)


def _run(batch, steps=200):
    with torch.inference_mode():
        for _ in range(steps):
            if not batch.active():
                return
            batch.step()
    pytest.fail(f"requests still running after {steps} steps")


def test_cancel_ends_with_one_empty_event_of_the_requests_index(windowed, v1_tokenizer):
    batch, events = Batch(windowed, v1_tokenizer, max_batch=2), []
    req = _request(windowed, random_ids(1, 4), 50, events, index=7)
    assert batch.admit(req)
    with torch.inference_mode():
        batch.step()
    batch.cancel(req)
    last = events[-1]
    assert (last.index, last.text, last.token, last.finish_reason) == (7, "", None, "cancelled")
    count = len(events)
    batch.cancel(req)  # cancelled already: nothing more
    done = _request(windowed, random_ids(2, 4), 2, events, index=8)
    assert batch.admit(done)
    _run(batch)
    assert events[-1].finish_reason == "length"
    count = len(events)
    batch.cancel(done)  # finished already: nothing more
    assert len(events) == count and not batch.active()


def test_reset_ends_every_running_request_and_forgets_the_prefixes(windowed, v1_tokenizer):
    batch, events = Batch(windowed, v1_tokenizer, max_batch=2), []
    system = random_ids(3, 20)
    first = _request(windowed, system + random_ids(4, 3), 2, events)
    assert batch.admit(first)
    _run(batch)
    second = _request(windowed, system + random_ids(5, 3), 30, events)  # shares 20 tokens: snapshotted on the way
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
    a, b = _request(full, random_ids(6, 10), 5, events), _request(full, random_ids(7, 20), 7, events)
    exact = Batch(full, v1_tokenizer, max_batch=2, kv_cache_bytes=(a.need + 1) * slot)
    assert exact.fits_ever(a.need) and not exact.fits_ever(a.need + 1)  # one row and its scratch slot, exactly
    roomy = Batch(full, v1_tokenizer, max_batch=4)
    assert roomy.admit(a) and roomy.admit(b)
    assert roomy.used_bytes() == (a.need + 1 + b.need + 1) * slot
    # just under three rows at the limit: two rows, never three
    tight = Batch(full, v1_tokenizer, max_batch=4, kv_cache_bytes=3 * (limit + 1) * slot - 1)
    reqs = [_request(full, random_ids(10 + i, 40), limit - 40, events) for i in range(3)]
    assert [tight.admit(r) for r in reqs] == [True, True, False]
    assert tight.cache.nbytes <= tight.budget_bytes


def test_prefill_chunks_and_the_cache_dtype(windowed, full, v1_tokenizer):
    assert default_chunk(windowed) == 8 and default_chunk(full) == 2048
    assert default_chunk(SimpleNamespace(config=SimpleNamespace(sliding_window=4096))) == 1024
    batch, events = Batch(windowed, v1_tokenizer, max_batch=1), []
    req = _request(windowed, random_ids(20, 5), 2, events)
    assert batch.admit(req) and req.chunk == 8
    half = engine_model(TINY, 3, torch.bfloat16)
    assert Batch(half, v1_tokenizer, max_batch=1).cache.k[0].dtype == torch.bfloat16


def test_a_finished_row_lends_all_but_the_last_prompt_token(full, v1_tokenizer):
    """The same prompt again reuses every prompt token but the last (whose logits the new request needs)."""
    prompt = random_ids(30, 12)
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
    prompt = random_ids(40, 5)
    batch, events = Batch(windowed, v1_tokenizer, max_batch=1), []
    first = _request(windowed, prompt, generated, events)
    assert batch.admit(first)
    _run(batch)
    assert batch.cache.capacity == 8 and len(first.fed) == 5 + generated - 1
    turn = first.fed + random_ids(41, 3)
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
    first = _request(windowed, random_ids(50, 5), generated, events)
    assert batch.admit(first)
    _run(batch)
    branch = first.fed[:6] + random_ids(51, 4)
    want = generate(windowed, v1_tokenizer, [branch], [SamplingParams(max_tokens=5)])[0].tokens
    events = []
    assert batch.admit(_request(windowed, branch, 5, events))
    _run(batch)
    assert [e.token for e in events if e.token is not None] == want and batch.prefix_tokens == reused


def _tokens_of(events):
    return [e.token for e in events if e.token is not None]


def test_prefill_goes_to_the_prompt_with_the_fewest_tokens_left(windowed, v1_tokenizer):
    """A prompt 4 tokens from its end goes before a new 10-token one (not by prompt + fed, 36 > 10)."""
    batch, events = Batch(windowed, v1_tokenizer, max_batch=2, prefill_budget=8), []
    long = _request(windowed, random_ids(60, 20), 3, events)
    assert batch.admit(long)
    with torch.inference_mode():
        batch.step()
        batch.step()
        assert len(long.fed) == 16
        short = _request(windowed, random_ids(61, 10), 3, events)
        assert batch.admit(short)
        batch.step()
    assert len(long.fed) >= 20 and len(short.fed) == 0  # its whole 8-token chunk no longer fit the budget


def test_the_longest_reusable_row_is_the_source_whatever_the_row_order(full, v1_tokenizer):
    """Two finished rows: row 0 shares 10 tokens with the new prompt, row 1 shares 4. The keys come from row 0;
    borrowing row 1's with row 0's count would feed the model wrong keys."""
    common = random_ids(70, 10)
    batch = Batch(full, v1_tokenizer, max_batch=2)
    for prompt in (common + random_ids(71, 3), common[:4] + random_ids(72, 9)):
        assert batch.admit(_request(full, prompt, 2, []))
    _run(batch)
    prompt = common + random_ids(73, 2)  # need 12 + 4: the rows' capacity (16), so no relayout reorders them
    want = generate(full, v1_tokenizer, [prompt], [SamplingParams(max_tokens=4)])[0].tokens
    assert [batch._reusable(r, prompt) for r in batch.rows] == [10, 4] and batch.cache.capacity == 16
    events = []
    assert batch.admit(_request(full, prompt, 4, events))
    _run(batch)
    assert _tokens_of(events) == want and batch.prefix_tokens == 10


def test_a_new_prompt_takes_a_free_row_before_a_finished_one(full, v1_tokenizer):
    """With a free row and a finished one, an unrelated prompt takes the free row, and then the oldest finished
    one: the prefixes the rows hold stay reusable as long as can be."""
    a, b = random_ids(85, 6), random_ids(86, 6)
    batch = Batch(full, v1_tokenizer, max_batch=2)
    assert batch.admit(_request(full, a, 2, []))  # row 0; row 1 stays free
    _run(batch)
    assert batch.admit(_request(full, b, 2, []))  # the free row 1, not a's
    _run(batch)
    assert batch.admit(_request(full, a + [5], 2, []))  # a's keys are still there
    _run(batch)
    assert batch.prefix_tokens == 6
    assert batch.admit(_request(full, random_ids(87, 4), 2, []))  # takes b's row (used longest ago), not a's (row 0)
    _run(batch)
    assert batch.admit(_request(full, a + [5, 6], 2, []))
    _run(batch)
    assert batch.prefix_tokens == 6 + 7


def test_a_new_prompt_takes_the_least_recently_used_finished_row(full, v1_tokenizer):
    """Rows keep finished requests' keys; an unrelated prompt takes the row used longest ago, so the newer
    prefix stays reusable. Counts: every reuse is a hit, and the tokens add up."""
    a, b = random_ids(80, 6), random_ids(81, 6)
    batch = Batch(full, v1_tokenizer, max_batch=2)
    for prompt in (a, b):  # a in row 0, b in row 1
        assert batch.admit(_request(full, prompt, 2, []))
    _run(batch)
    assert batch.admit(_request(full, a, 2, []))  # a again, in its own row: row 0 is now the newer
    _run(batch)
    assert (batch.prefix_hits, batch.prefix_tokens) == (1, 5)
    assert batch.admit(_request(full, random_ids(82, 6), 2, []))  # unrelated: it takes row 1 (b's)
    _run(batch)
    assert batch.admit(_request(full, a + [7], 2, []))  # a is still there: 6 tokens reused
    _run(batch)
    assert (batch.prefix_hits, batch.prefix_tokens) == (2, 11)
    assert batch.admit(_request(full, [9, 8], 5, []))
    with torch.inference_mode():
        batch.step()
    assert batch.admit(_request(full, [9, 8], 2, []))  # a running one lends its one token: a hit of 1
    assert (batch.prefix_hits, batch.prefix_tokens) == (3, 12)


@pytest.mark.parametrize("shared", [16, 15])  # SNAPSHOT_MIN_TOKENS: a shorter shared prefix is not kept
def test_a_shared_prefix_is_snapshotted_from_16_tokens(windowed, v1_tokenizer, shared):
    system = random_ids(90, shared)
    batch = Batch(windowed, v1_tokenizer, max_batch=1)
    assert batch.admit(_request(windowed, system + random_ids(91, 3), 4, []))
    _run(batch)  # its ring wrapped: its row lends nothing back to position 0
    assert batch.admit(_request(windowed, system + random_ids(92, 3), 4, []))
    _run(batch)
    assert (batch.store.nbytes > 0) == (shared >= 16)


def test_snapshots_serve_only_requests_of_their_adapter(tuned, v1_tokenizer):
    """A system prompt shared under adapter "a", then with no adapter, then under "a" again: each request's
    tokens are those it gets alone, so no request starts from keys another adapter made."""
    model = tuned
    system = random_ids(100, 20)
    slot = Batch(model, v1_tokenizer, 1).slot_bytes
    batch = Batch(model, v1_tokenizer, max_batch=1, kv_cache_bytes=100 * slot)  # room for both snapshots
    params = SamplingParams(max_tokens=4)
    for i, adapter in enumerate(["a", "a", None, None, "a", None]):
        prompt = system + random_ids(101 + i, 3)
        want = generate(model, v1_tokenizer, [prompt], [params], adapters=[adapter])[0].tokens
        events = []
        assert batch.admit(_request(model, prompt, 4, events, adapter=adapter))
        _run(batch)
        assert _tokens_of(events) == want, (i, adapter)
    assert batch.prefix_tokens == 2 * 20 and len(batch.store.snapshots) == 2
    prompt = system + random_ids(101, 3)  # the adapter changes the tokens: keys of the wrong one would show
    with_a, plain = (generate(model, v1_tokenizer, [prompt], [params], adapters=[a])[0].tokens for a in ("a", None))
    assert with_a != plain


def test_a_row_of_another_adapter_does_not_end_the_search_for_a_prefix(tuned, v1_tokenizer):
    """Row 0 holds a request under adapter "a", row 1 one with no adapter: a prompt with no adapter that starts
    like row 1's reuses it (rows of other adapters are skipped, not the end of the search)."""
    batch = Batch(tuned, v1_tokenizer, max_batch=2)
    base = random_ids(110, 5)  # with 2 new tokens, 6 fed: the ring (8) has not wrapped
    assert batch.admit(_request(tuned, random_ids(111, 5), 2, [], adapter="a"))
    assert batch.admit(_request(tuned, base, 2, []))
    _run(batch)
    assert [r.adapter for r in batch.rows] == ["a", None]
    prompt = base + random_ids(112, 2)
    want = generate(tuned, v1_tokenizer, [prompt], [SamplingParams(max_tokens=4)])[0].tokens
    events = []
    assert batch.admit(_request(tuned, prompt, 4, events))
    _run(batch)
    assert _tokens_of(events) == want and batch.prefix_tokens == 5


@pytest.mark.parametrize("room", [8, 7])  # slots beyond the row's 9 (8 and its scratch): a snapshot takes 8
def test_snapshots_stay_within_the_budget_and_the_newest_is_kept(windowed, v1_tokenizer, room):
    slot = Batch(windowed, v1_tokenizer, 1).slot_bytes
    batch = Batch(windowed, v1_tokenizer, max_batch=1, kv_cache_bytes=(9 + room) * slot)
    kept = []
    for system in (random_ids(120, 20), random_ids(121, 20)):
        for i in range(2):  # the second request shares the first's 20 tokens: a snapshot, if it fits
            assert batch.admit(_request(windowed, system + random_ids(122 + i, 3), 4, []))
            _run(batch)
            assert batch.cache.nbytes + batch.store.nbytes <= batch.budget_bytes
        kept.append([s.tokens for s in batch.store.snapshots])
    if room == 8:  # one fits exactly; the second system prompt's replaces the first's
        assert kept == [[random_ids(120, 20)], [random_ids(121, 20)]]
    else:
        assert kept == [[], []]


def test_a_relayout_keeps_the_newest_finished_rows_it_has_room_for(full, v1_tokenizer):
    """Three finished rows at capacity 16; a 40-position request needs capacity 64, where the budget holds two
    rows: the relayout keeps the newest finished row (and the request takes the other), so its prompt is still
    reusable after."""
    slot = Batch(full, v1_tokenizer, 1).slot_bytes
    batch = Batch(full, v1_tokenizer, max_batch=3, kv_cache_bytes=2 * (64 + 1) * slot)
    prompts = [random_ids(130 + i, 6) for i in range(3)]
    for prompt in prompts:
        assert batch.admit(_request(full, prompt, 2, []))
    _run(batch)
    assert (batch.cache.batch_size, batch.cache.capacity) == (3, 16)
    assert batch.admit(_request(full, random_ids(134, 30), 10, []))
    _run(batch)
    assert (batch.cache.batch_size, batch.cache.capacity) == (2, 64)
    newest = prompts[-1] + [5]
    want = generate(full, v1_tokenizer, [newest], [SamplingParams(max_tokens=3)])[0].tokens
    events = []
    assert batch.admit(_request(full, newest, 3, events))
    _run(batch)
    assert _tokens_of(events) == want and batch.prefix_tokens == 6


def test_a_relayout_that_shrinks_the_rows_evicts_snapshots_to_stay_in_the_budget(v1_tokenizer):
    """Window 32, a budget of one row at capacity 32 (33 slots) and a 20-slot snapshot. Two short requests then
    relayout to two rows of capacity 16 (34 slots): the snapshot must go for the budget to hold."""
    model = engine_model(TINY.replace(sliding_window=32), 6)
    slot = Batch(model, v1_tokenizer, 1).slot_bytes
    batch = Batch(model, v1_tokenizer, max_batch=2, kv_cache_bytes=(33 + 20) * slot)
    system = random_ids(140, 20)
    for i in range(2):  # the first wraps its ring; the second shares its 20 tokens: a snapshot
        assert batch.admit(_request(model, system + random_ids(141 + i, 3), 20, []))
        _run(batch)
    assert (batch.cache.batch_size, batch.cache.capacity, batch.store.nbytes) == (1, 32, 20 * slot)
    assert batch.admit(_request(model, random_ids(143, 4), 8, []))  # the free row
    with torch.inference_mode():
        batch.step()
    assert batch.admit(_request(model, random_ids(144, 4), 8, []))  # no free row: two rows of 16
    assert (batch.cache.batch_size, batch.cache.capacity, batch.store.nbytes) == (2, 16, 0)
    assert batch.cache.nbytes + batch.store.nbytes <= batch.budget_bytes


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_decode_steps_broken_row_fails_alone_and_the_others_get_their_tokens(full, v1_tokenizer, bad):
    # Logits of a step's rows, one holding a NaN or a +inf (no distribution): that request gets the EngineError and
    # leaves; the other rows get their tokens, in order, from their own logits. -inf is a banned token, not broken.
    batch, events = Batch(full, v1_tokenizer, max_batch=3), [[], [], []]
    reqs = [_request(full, random_ids(10 + i, 4), 20, events[i], index=i) for i in range(3)]
    assert all(batch.admit(r) for r in reqs)
    with torch.inference_mode():
        batch.step()  # the prompts: each request now has a token to decode
    logits = torch.randn(3, 32000, generator=torch.Generator().manual_seed(0))
    logits[0, 7] = -float("inf")
    logits[1, 123] = bad
    before = [len(e) for e in events]
    batch._deliver(reqs, logits)
    assert [len(e) - n for e, n in zip(events, before)] == [1, 1, 1]
    error = events[1][-1]
    assert isinstance(error, EngineError) and reqs[1].done and batch.rows[reqs[1].row] is None
    assert str(error) == ("the model's next-token logits hold NaN or inf after 4 tokens of this request: its weights "
                          "overflow in this dtype (try float32 or bfloat16) or are broken")
    assert [events[i][-1].token for i in (0, 2)] == [int(logits[0].argmax()), int(logits[2].argmax())]
    assert [r.done for r in reqs] == [False, True, False]
