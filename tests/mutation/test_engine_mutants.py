"""Engine behaviours that mutation testing (mutation/README.md) found unpinned: each setting's refusal whole (and
the smallest value each takes), prefix caching on by default, the waiting count, the memory the default budget
is taken from, the request field a refusal names, and a handle that has failed ending at once when read again."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from conftest import TINY, engine_model, random_ids

from ventoux.engine import Engine, EngineError, RequestError, check_request, free_memory
from ventoux.errors import VentouxError
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
