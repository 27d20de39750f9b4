"""The serving engine: one thread owns the model and its cache; requests join and leave between steps.

    engine = llm.engine(max_batch=8, kv_cache_bytes=2**30)      # starts the engine thread
    handle = engine.submit(prompt_ids, SamplingParams(max_tokens=50, seed=1))
    for ev in handle: print(ev.text, end="")                      # or: async for ev in handle
    handle.cancel()                                               # frees its row within a step
    engine.stats()                                                # running, waiting, cache use, prefix hits
    engine.close()                                                # or: with llm.engine() as engine: ...

submit() checks a request at once: an empty prompt, a token id outside the vocabulary, or a prompt that can
never fit (a full-attention model's context, or more cache than kv_cache_bytes holds for one row) raises
RequestError; a full queue (max_queue waiting requests) raises QueueFull. kv_cache_bytes (row buffers and
prefix snapshots) defaults to max_batch rows at the model's window or context, twice (the second half for
snapshots), but at most half the memory free when the engine starts. Admitted requests share one
batch (batch.py: rows, chunked prefill under `prefill_budget` tokens per step, batched decode, prefix
cache); a request that does not fit yet waits, first come first served. A handle yields the Events of
generate.stream() (index 0); its last event has a finish_reason: "stop", "length", or "cancelled" after
cancel(). If a step fails, every request it was running gets an EngineError on iteration; the engine goes on.

Cache layout (batch.py): R rows x C slots, one capacity for all rows so a decode step stays one batched
product with static shapes (torch.compile works, one graph per layout); C follows the largest need among
the running requests (a power of two, capped at the window or context), R = kv_cache_bytes // row bytes
(at most max_batch). Not paged: a long request shrinks R while it runs, and a relayout copies the cache.
LoRA: a request's adapter (checked at submit) is set per forward row through lora.set_rows.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from dataclasses import dataclass

import torch

from .batch import Batch, Request
from .errors import EngineError, VentouxError  # EngineError: its home was here (ventoux.engine.EngineError)
from .events import Event
from .lora import check_adapter
from .params import SamplingParams


class RequestError(VentouxError):
    """A request that can never run as given (HTTP 400); `param`: the request field at fault, if not the prompt."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(VentouxError):
    """Too many requests waiting (HTTP 429); retry later."""


def free_memory(device: torch.device) -> int:
    """Bytes free now on a CUDA device, or in the machine for anything else."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no such query here (macOS): no cap from memory
        return 1 << 62


def check_request(config, ids, params: SamplingParams, name: str = "the prompt",
                  vocab_size: int | None = None) -> tuple[int, int]:
    """Raise RequestError unless the prompt can run; return (cache positions it can use, tokens it may make).
    vocab_size: the tokenizer's, where a model pads its vocabulary beyond it (those ids are no tokens)."""
    vocab = min(config.vocab_size, vocab_size or config.vocab_size)
    if not ids:
        raise RequestError(f"{name} is empty: give at least one token of text")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids) or max(ids) >= vocab or min(ids) < 0:
        raise RequestError(f"{name} has a token id outside the vocabulary [0, {vocab})")
    if params.logit_bias and max(params.logit_bias) >= vocab:
        raise RequestError(f"logit_bias names token id {max(params.logit_bias)}, outside the vocabulary "
                           f"[0, {vocab})", param="logit_bias")
    if config.sliding_window is None and len(ids) >= config.max_seq_len:
        raise RequestError(f"{name} has {len(ids)} tokens but the model's context is {config.max_seq_len} "
                           "(full attention): shorten the prompt")
    max_new = params.max_tokens if config.sliding_window else min(params.max_tokens, config.max_seq_len - len(ids))
    limit = min(config.sliding_window or config.max_seq_len, config.max_seq_len)
    return min(len(ids) + max_new, limit), max_new


@dataclass
class EngineStats:
    running: int  # requests holding a row (prefilling or decoding)
    waiting: int  # submitted, not yet admitted
    kv_cache_used_bytes: int  # what the running requests can use (their prompt + max new tokens)
    kv_cache_total_bytes: int  # the budget (kv_cache_bytes)
    usage_ratio: float  # used / total, in [0, 1]
    kv_cache_allocated_bytes: int  # the row buffers and prefix snapshots allocated now (<= total)
    prefix_hits: int  # requests that reused a cached prefix
    prefix_tokens: int  # prompt tokens not recomputed thanks to it
    max_batch: int


class Handle:
    """One request's events, for a plain or an async for loop; cancel() to stop it."""

    def __init__(self, engine: Engine, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self._engine = engine
        self._items: deque = deque()  # Events, or an exception to raise
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_ready: asyncio.Event | None = None
        self._finished = False
        self.request: Request | None = None

    def _push(self, item) -> None:  # engine thread
        with self._lock:
            self._items.append(item)
            self._ready.notify_all()
            loop, ready = self._loop, self._async_ready
        if loop is not None:  # an async reader: woken once per step with the others (Engine._wake_loops)
            self._engine._loop_wakes.setdefault(loop, set()).add(ready)

    def _next(self):
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if item.finish_reason is not None:
            self._finished = True
        return item

    def __iter__(self):
        while not self._finished:
            with self._lock:
                while not self._items:
                    self._ready.wait()
                ev = self._next()
            yield ev

    async def __aiter__(self):
        with self._lock:
            self._loop, self._async_ready = asyncio.get_running_loop(), asyncio.Event()
        while not self._finished:
            with self._lock:
                ev = self._next() if self._items else None
                if ev is None:
                    self._async_ready.clear()
            if ev is None:
                await self._async_ready.wait()
            else:
                yield ev

    def cancel(self) -> None:
        """Stop generating: the row is free within a step; iteration ends with finish_reason "cancelled"."""
        self._engine._cancel(self)


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 8, kv_cache_bytes: int | None = None,
                 max_queue: int | None = None, prefill_budget: int | None = None, decode=None,
                 prefix_cache: bool = True):
        # max_queue counts every request not yet in a row (each passes through the queue): 0 would refuse all
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 1),
                                 ("prefill_budget", prefill_budget, 1), ("kv_cache_bytes", kv_cache_bytes, 1)):
            if (value is not None or name == "max_batch") and (not isinstance(value, int) or value < low):
                raise VentouxError(f"{name}={value!r}: it must be an integer >= {low}")
        from .batch import default_chunk

        self.config = model.config
        self._batch = Batch(model, tokenizer, max_batch, kv_cache_bytes,
                            prefill_budget or default_chunk(model), decode, prefix_cache)
        if kv_cache_bytes is None:  # max_batch rows at the model's limit (+ snapshots), within half the free memory
            self._batch.budget_bytes = min(self._batch.budget_bytes, free_memory(self._batch.device) // 2)
        if not self._batch.fits_ever(1):
            raise VentouxError(f"kv_cache_bytes={kv_cache_bytes} holds not even one position "
                               f"({self._batch.slot_bytes * 2} bytes): give more")
        self.max_queue = max_queue
        self._waiting: deque[Handle] = deque()
        self._cancelled: list[Handle] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        # asyncio.Events of the async readers that got events this step, by loop: one cross-thread wake-up
        # (a write to the loop's self-pipe) per step and loop, not per token (engine thread only)
        self._loop_wakes: dict[asyncio.AbstractEventLoop, set[asyncio.Event]] = {}
        self._stats = self._snapshot()
        self._thread = threading.Thread(target=self._run, name="ventoux-engine", daemon=True)
        self._thread.start()

    # ---- clients (any thread) ----------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None) -> Handle:
        ids = list(prompt_ids)
        need, max_new = check_request(self.config, ids, params, vocab_size=self._batch.vocab_size)
        if adapter is not None:
            try:
                check_adapter(self._batch.model, adapter)
            except VentouxError as e:
                raise RequestError(str(e)) from None
        if not self._batch.fits_ever(need):
            raise RequestError(f"the prompt and max_tokens need {need} cache positions, more than "
                               f"kv_cache_bytes={self._batch.budget_bytes} holds: lower max_tokens or shorten it")
        handle = Handle(self, len(ids))
        handle.request = Request(ids, params, need, max_new, emit=handle._push, adapter=adapter)
        with self._lock:
            if self._closed:
                raise VentouxError("the engine is closed: start a new one with llm.engine()")
            if self.max_queue is not None and len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_queue={self.max_queue}): "
                                "retry later")
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    def _cancel(self, handle: Handle) -> None:
        with self._lock:
            self._cancelled.append(handle)
            self._wake.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            s = self._stats
            s.waiting = len(self._waiting)
            return EngineStats(**vars(s))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():  # per thread: this one runs every forward
            while self._next_step():
                self._wake_loops()
            self._shutdown()
            self._wake_loops()

    def _wake_loops(self) -> None:
        wakes, self._loop_wakes = self._loop_wakes, {}
        for loop, readies in wakes.items():
            try:
                loop.call_soon_threadsafe(_set_all, readies)
            except RuntimeError:  # the loop has closed: nobody is listening
                pass

    def _next_step(self) -> bool:
        """Cancel, admit (first come first served), one batch step; False once closed."""
        with self._lock:
            while not (self._closed or self._waiting or self._cancelled or self._batch.active()):
                self._wake.wait()
            if self._closed:
                return False
            cancelled, self._cancelled = self._cancelled, []
            for h in cancelled:
                if h in self._waiting:
                    self._waiting.remove(h)
                    h._push(Event(0, "", None, finish_reason="cancelled"))
        head = None
        try:
            for h in cancelled:
                self._batch.cancel(h.request)
            while True:  # only this thread removes from _waiting; submit() appends
                with self._lock:
                    head = self._waiting[0] if self._waiting else None
                if head is None or not self._batch.admit(head.request):
                    break
                with self._lock:
                    self._waiting.popleft()
                    self._stats = self._snapshot()
            head = None
            self._batch.step()
        except Exception as e:  # fail what was running (and a request whose admission failed); serve on
            err = EngineError(f"generation failed: {type(e).__name__}: {e}")
            err.__cause__ = e
            failed = self._batch.reset()
            if head is not None:  # still first in the queue: only this thread removes from it
                with self._lock:
                    self._waiting.popleft()
                failed += [head.request] if head.request not in failed else []
            for req in failed:
                req.emit(err)
        with self._lock:
            self._stats = self._snapshot()
        return True

    def _shutdown(self) -> None:
        err = VentouxError("the engine was closed before this request finished")
        for req in self._batch.reset():
            req.emit(err)
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for h in waiting:
            h._push(err)

    def _snapshot(self) -> EngineStats:
        b = self._batch
        used = b.used_bytes()
        return EngineStats(running=len(b.active()), waiting=len(self._waiting), kv_cache_used_bytes=used,
                           kv_cache_total_bytes=b.budget_bytes, usage_ratio=min(1.0, used / b.budget_bytes),
                           kv_cache_allocated_bytes=b.cache.nbytes + b.store.nbytes, prefix_hits=b.prefix_hits,
                           prefix_tokens=b.prefix_tokens, max_batch=b.max_batch)


def _set_all(readies: set[asyncio.Event]) -> None:
    for ready in readies:
        ready.set()
