"""Engine behaviours that mutation testing (mutation/README.md) found unpinned: each setting's refusal whole (and
the smallest value each takes), prefix caching on by default, the waiting count, the memory the default budget
is taken from, the request field a refusal names, and a handle that has failed ending at once when read again."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from conftest import TINY, TINY_FULL, adapter_model, engine_model, random_ids

from ventoux.engine import Engine, EngineError, QueueFull, RequestError, check_request, free_memory
from ventoux.errors import VentouxError
from ventoux.generate import generate
from ventoux.sampling import SamplingParams


@pytest.fixture(scope="module")
def windowed():
    return engine_model(TINY, 3)


@pytest.mark.parametrize("name, value, low", [("max_batch", 0, 1), ("max_batch", None, 1), ("max_queue", 0, 1),
                                              ("prefill_budget", 0, 1), ("kv_cache_bytes", 0, 1)])
def test_each_setting_is_refused_whole_below_its_floor(windowed, v1_tokenizer, name, value, low):
    with pytest.raises(VentouxError) as e:
        Engine(windowed, v1_tokenizer, **{name: value})
    assert str(e.value) == f"{name}={value!r}: it must be an integer >= {low}"


def test_the_floors_themselves_are_taken_and_prefix_caching_is_on(windowed, v1_tokenizer):
    with Engine(windowed, v1_tokenizer, max_batch=1, max_queue=1, prefill_budget=1) as engine:
        assert engine._batch.prefix_cache and engine.max_queue == 1 and engine._batch.prefill_budget == 1
        handle = engine.submit(random_ids(1, 3), SamplingParams(max_tokens=2))
        assert len([e for e in handle if e.token is not None]) == 2


def test_stats_count_the_waiting_requests(windowed, v1_tokenizer):
    with Engine(windowed, v1_tokenizer, max_batch=1) as engine:
        assert engine.stats().waiting == 0
        busy = engine.submit(random_ids(2, 3), SamplingParams(max_tokens=10**6))
        next(iter(busy))  # admitted: it holds the only row
        queued = [engine.submit(random_ids(3 + i, 3), SamplingParams(max_tokens=2)) for i in range(2)]
        assert engine.stats().waiting == 2
        busy.cancel()
        for h in queued:
            list(h)
        assert engine.stats().waiting == 0


def test_the_default_budget_comes_from_the_free_memory(monkeypatch):
    pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    assert abs(free_memory(torch.device("cpu")) - pages * size) <= 256 * size  # memory moves while we ask
    monkeypatch.setattr(os, "sysconf", lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert free_memory(torch.device("cpu")) == 1 << 62  # a system that cannot say: no cap from memory


def test_a_refusal_names_the_request_field_at_fault(windowed):
    with pytest.raises(RequestError) as e:
        check_request(windowed.config, [5, 6], SamplingParams(logit_bias={40000: 1.0}))
    assert e.value.param == "logit_bias"
    with pytest.raises(RequestError) as e:
        check_request(windowed.config, [], SamplingParams())
    assert e.value.param is None  # the prompt's: the caller names it


def test_a_failed_handle_read_again_ends_at_once(windowed, v1_tokenizer, monkeypatch):
    with Engine(windowed, v1_tokenizer, max_batch=1) as engine:
        monkeypatch.setattr(windowed, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        handle = engine.submit(random_ids(9, 4), SamplingParams(max_tokens=5))
        with pytest.raises(EngineError, match="boom"):
            list(handle)
        again = []
        reader = threading.Thread(target=lambda: again.append(list(handle)), daemon=True)
        reader.start()
        reader.join(5)
        assert again == [[]]  # no event and no wait: the handle has finished


def test_the_engines_defaults_prefill_budget_and_memory_cap(windowed, v1_tokenizer, monkeypatch):
    from ventoux import engine as engine_module
    from ventoux.batch import Batch

    with Engine(windowed, v1_tokenizer) as engine:  # a prefill budget of one default chunk (the window here)
        assert engine._batch.prefill_budget == 8 and engine.stats().max_batch == 8
    slot = Batch(windowed, v1_tokenizer, 1).slot_bytes
    monkeypatch.setattr(engine_module, "free_memory", lambda device: 201 * slot + 1)
    with Engine(windowed, v1_tokenizer, max_batch=8) as engine:  # half the free memory, below the default
        assert engine._batch.budget_bytes == (201 * slot + 1) // 2  # the default: 2 x 8 rows x 9 slots = 144
    with Engine(windowed, v1_tokenizer, kv_cache_bytes=1000 * slot) as engine:  # a budget given is kept whole
        assert engine._batch.budget_bytes == 1000 * slot


def test_the_smallest_budget_holds_one_position_and_its_scratch_slot(windowed, v1_tokenizer):
    from ventoux.batch import Batch

    slot = Batch(windowed, v1_tokenizer, 1).slot_bytes
    Engine(windowed, v1_tokenizer, kv_cache_bytes=2 * slot).close()
    with pytest.raises(VentouxError) as e:
        Engine(windowed, v1_tokenizer, kv_cache_bytes=2 * slot - 1)
    assert str(e.value) == f"kv_cache_bytes={2 * slot - 1} holds not even one position ({2 * slot} bytes): give more"


def test_a_compiled_decode_step_given_is_the_one_that_decodes(windowed, v1_tokenizer):
    calls = []

    def step(*args, **kwargs):
        calls.append(args[0].shape)
        return windowed(*args, **kwargs)

    with Engine(windowed, v1_tokenizer, max_batch=2, decode=step) as engine:
        tokens = [e.token for e in engine.submit(random_ids(20, 4), SamplingParams(max_tokens=4)) if e.token]
    assert len(tokens) == 4 and len(calls) == 3 and all(shape == (2, 1) for shape in calls)  # every row, always


def test_the_engine_thread_is_named_a_daemon_and_joined_on_close(windowed, v1_tokenizer):
    engine = Engine(windowed, v1_tokenizer)
    assert engine._thread.name == "ventoux-engine" and engine._thread.daemon  # never holds the process open
    engine.close()
    assert not engine._thread.is_alive()
    with pytest.raises(VentouxError) as e:
        engine.submit([5, 6], SamplingParams())
    assert str(e.value) == "the engine is closed: start a new one with llm.engine()"


def test_a_full_queue_and_a_request_cancelled_while_it_waits(windowed, v1_tokenizer):
    with Engine(windowed, v1_tokenizer, max_batch=1, max_queue=1) as engine:
        busy = engine.submit(random_ids(30, 3), SamplingParams(max_tokens=10**6))
        next(iter(busy))  # it holds the only row
        waiting = engine.submit(random_ids(31, 3), SamplingParams(max_tokens=2))
        with pytest.raises(QueueFull) as e:
            engine.submit(random_ids(32, 3), SamplingParams(max_tokens=2))
        assert str(e.value) == "1 requests are already waiting (max_queue=1): retry later"
        waiting.cancel()
        events = list(waiting)
        busy.cancel()
    assert [(ev.index, ev.text, ev.token, ev.finish_reason) for ev in events] == [(0, "", None, "cancelled")]


def test_requests_run_on_the_adapter_they_name(v1_tokenizer):
    model = adapter_model()
    prompt, params = random_ids(40, 5), SamplingParams(max_tokens=5)
    with Engine(model, v1_tokenizer, max_batch=2) as engine:
        got = {a: [ev.token for ev in engine.submit(prompt, params, adapter=a) if ev.token is not None]
               for a in ("a", None)}
        with pytest.raises(RequestError, match="unknown adapter 'nope'"):
            engine.submit(prompt, params, adapter="nope")
    assert got == {a: generate(model, v1_tokenizer, [prompt], [params], adapters=[a])[0].tokens for a in ("a", None)}
    assert got["a"] != got[None]


def test_stats_while_a_request_runs(windowed, v1_tokenizer):
    from ventoux.batch import Batch

    slot = Batch(windowed, v1_tokenizer, 1).slot_bytes
    with Engine(windowed, v1_tokenizer, max_batch=2, kv_cache_bytes=40 * slot) as engine:
        busy = engine.submit(random_ids(50, 3), SamplingParams(max_tokens=10**6))
        next(iter(busy))
        s, b = engine.stats(), engine._batch
        assert (s.running, s.waiting, s.max_batch) == (1, 0, 2)
        assert (s.kv_cache_used_bytes, s.kv_cache_total_bytes) == ((8 + 1) * slot, 40 * slot)  # need: the window
        assert s.usage_ratio == 9 / 40 and s.kv_cache_allocated_bytes == b.cache.nbytes + b.store.nbytes > 0
        assert (s.prefix_hits, s.prefix_tokens) == (0, 0)
        busy.cancel()


def test_closing_ends_running_and_waiting_requests_with_one_line(windowed, v1_tokenizer):
    engine = Engine(windowed, v1_tokenizer, max_batch=1)
    busy = engine.submit(random_ids(60, 3), SamplingParams(max_tokens=10**6))
    next(iter(busy))
    waiting = engine.submit(random_ids(61, 3), SamplingParams(max_tokens=2))
    engine.close()
    for handle in (busy, waiting):
        with pytest.raises(VentouxError) as e:
            list(handle)
        assert str(e.value) == "the engine was closed before this request finished"


@pytest.mark.parametrize("cfg, prompt, params, want", [
    (TINY, [0, 210], SamplingParams(max_tokens=3), (5, 3)),  # the vocabulary's ends are token ids
    (TINY, list(range(3, 200)), SamplingParams(max_tokens=4), (8, 4)),  # a window: any length, the window's slots
    (TINY.replace(sliding_window=512), [5] * 10, SamplingParams(max_tokens=1000), (256, 1000)),  # window > context
    (TINY_FULL, [5] * 95, SamplingParams(max_tokens=10), (96, 1)),  # full attention: max_tokens cut to the context
    (TINY_FULL, [5] * 90, SamplingParams(max_tokens=3), (93, 3)),
    (TINY, [5], SamplingParams(logit_bias={0: 1.0, 210: -1.0}), (8, 256)),
])
def test_what_a_request_may_use(cfg, prompt, params, want):
    assert check_request(cfg, prompt, params) == want


@pytest.mark.parametrize("cfg, prompt, params, message", [
    (TINY, [], SamplingParams(), "the prompt is empty: give at least one token of text"),
    (TINY, [211], SamplingParams(), "the prompt has a token id outside the vocabulary [0, 211)"),
    (TINY, [5, -1], SamplingParams(), "the prompt has a token id outside the vocabulary [0, 211)"),
    (TINY, [5, True], SamplingParams(), "the prompt has a token id outside the vocabulary [0, 211)"),
    (TINY, [5, 1.5], SamplingParams(), "the prompt has a token id outside the vocabulary [0, 211)"),
    (TINY, [5], SamplingParams(logit_bias={5: 1.0, 211: 1.0}),
     "logit_bias names token id 211, outside the vocabulary [0, 211)"),
    (TINY_FULL, [5] * 96, SamplingParams(),
     "the prompt has 96 tokens but the model's context is 96 (full attention): shorten the prompt"),
])
def test_each_refusal_of_a_request_whole(cfg, prompt, params, message):
    with pytest.raises(RequestError) as e:
        check_request(cfg, prompt, params)
    assert str(e.value) == message
    if "empty" in message:
        with pytest.raises(RequestError, match="^prompt 2 is empty"):
            check_request(cfg, prompt, params, name="prompt 2")


def _fails_once(model, monkeypatch):
    """model.forward raises RuntimeError("boom") at its next call, then works again."""
    real = model.forward

    def forward(*args, **kwargs):
        monkeypatch.setattr(model, "forward", real)
        raise RuntimeError("boom")
    monkeypatch.setattr(model, "forward", forward)


def test_a_failed_step_spares_the_request_waiting_for_a_row(windowed, v1_tokenizer, monkeypatch):
    with Engine(windowed, v1_tokenizer, max_batch=1) as engine:
        busy = engine.submit(random_ids(70, 3), SamplingParams(max_tokens=10**6))
        events = iter(busy)
        next(events)  # it holds the only row
        waiting = engine.submit(random_ids(71, 3), SamplingParams(max_tokens=2))
        _fails_once(windowed, monkeypatch)
        with pytest.raises(EngineError) as e:
            list(events)
        assert str(e.value) == "generation failed: RuntimeError: boom" and str(e.value.__cause__) == "boom"
        got = list(waiting)  # never admitted when the step failed: it runs after
    assert [ev.finish_reason for ev in got] == [None, "length"]
    assert [ev.token for ev in got] == generate(windowed, v1_tokenizer, [random_ids(71, 3)],
                                                [SamplingParams(max_tokens=2)])[0].tokens


def test_a_failed_admission_fails_that_request_once_and_the_next_one_runs(windowed, v1_tokenizer, monkeypatch):
    with Engine(windowed, v1_tokenizer, max_batch=2) as engine:
        admit = engine._batch.admit
        first = random_ids(80, 3)

        def admit_then_fail(req):  # the request holds a row when its admission fails
            admitted = admit(req)
            if req.prompt == first:
                raise MemoryError("no room")
            return admitted
        monkeypatch.setattr(engine._batch, "admit", admit_then_fail)
        failing = engine.submit(first, SamplingParams(max_tokens=2))
        after = engine.submit(random_ids(81, 3), SamplingParams(max_tokens=2))
        with pytest.raises(EngineError, match="^generation failed: MemoryError: no room$"):
            list(failing)
        assert not failing._items  # one error, not one from the reset and one as the head
        assert [ev.finish_reason for ev in after] == [None, "length"]


def test_a_failed_cancel_fails_what_was_running_and_the_engine_goes_on(windowed, v1_tokenizer, monkeypatch):
    with Engine(windowed, v1_tokenizer, max_batch=1) as engine:
        busy = engine.submit(random_ids(90, 3), SamplingParams(max_tokens=10**6))
        events = iter(busy)
        next(events)
        cancel = engine._batch.cancel

        def fail_once(req):
            monkeypatch.setattr(engine._batch, "cancel", cancel)
            raise RuntimeError("cannot free the row")
        monkeypatch.setattr(engine._batch, "cancel", fail_once)
        busy.cancel()
        with pytest.raises(EngineError, match="^generation failed: RuntimeError: cannot free the row$"):
            list(events)
        after = list(engine.submit(random_ids(91, 3), SamplingParams(max_tokens=2)))
    assert [ev.finish_reason for ev in after] == [None, "length"]


def test_allocated_bytes_count_the_prefix_snapshots(windowed, v1_tokenizer):
    system = random_ids(95, 20)  # shared by two requests, past the window: a snapshot keeps it
    with Engine(windowed, v1_tokenizer, max_batch=2) as engine:
        busy = engine.submit(system + random_ids(96, 3), SamplingParams(max_tokens=10**6))
        next(iter(busy))
        list(engine.submit(system + random_ids(97, 3), SamplingParams(max_tokens=2)))
        for _ in range(3000):  # the stats of the step after the second one's last: busy keeps the engine stepping
            if engine.stats().running == 1:
                break
            time.sleep(0.01)
        s, b = engine.stats(), engine._batch  # busy decodes: nothing is allocated or freed meanwhile
        assert b.store.nbytes > 0 and s.kv_cache_allocated_bytes == b.cache.nbytes + b.store.nbytes
        busy.cancel()


def test_an_async_reader_waits_without_blocking_its_loop_after_a_late_wake_up(windowed, v1_tokenizer, monkeypatch):
    """Wake-ups queued while the loop was busy arrive after the reader has taken every event; it must wait
    again, not spin on the stale wake-up and hold its loop (here the loop's own timer then never lets the
    engine, stalled until it fires, make the rest)."""
    import asyncio

    gate, calls, real = threading.Event(), [], windowed.forward

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # the prompt and 3 decode steps done: stall until the loop's timer opens the gate
            gate.wait(60)
        return real(*args, **kwargs)
    monkeypatch.setattr(windowed, "forward", forward)

    async def read(handle):
        got = []
        async for ev in handle:
            got.append(ev.token)
            if len(got) == 1:
                time.sleep(0.5)  # the loop busy: tokens 2-4 arrive, their wake-ups queue behind this
            if len(got) == 4:
                asyncio.get_running_loop().call_later(0.05, gate.set)
        return got

    with Engine(windowed, v1_tokenizer, max_batch=1) as engine:
        handle = engine.submit(random_ids(98, 3), SamplingParams(max_tokens=8))
        result = []
        reader = threading.Thread(target=lambda: result.append(asyncio.run(read(handle))), daemon=True)
        reader.start()
        reader.join(30)
        gate.set()  # unstick a reader that spun, so the engine can close
        reader.join(30)
    assert len(result) == 1 and len(result[0]) == 8
    assert calls[4:] and not reader.is_alive()
