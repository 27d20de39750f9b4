"""Engine behaviours that mutation testing (mutation/README.md) found unpinned: each setting's refusal whole (and
the smallest value each takes), prefix caching on by default, the waiting count, the memory the default budget
is taken from, the request field a refusal names, and a handle that has failed ending at once when read again."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from conftest import TINY, adapter_model, engine_model, random_ids

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
        assert engine._batch.prefill_budget == 8
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
