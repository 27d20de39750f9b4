"""The serving engine: continuous batching gives every request the tokens it gets alone (greedy, and seeded
sampling), however requests arrive and leave; the cache budget; prefix reuse; cancel; errors; async use."""

import asyncio
import random
import threading
import time

import pytest
import torch
from conftest import TINY, TINY_FULL
from conftest import engine_model as tiny
from conftest import random_ids as ids

from ventoux.batch import Batch, Request
from ventoux.engine import Engine, EngineError, QueueFull, RequestError, check_request
from ventoux.errors import VentouxError
from ventoux.generate import generate
from ventoux.model import Transformer
from ventoux.sampling import SamplingParams


@pytest.fixture(scope="module")
def tok(v1_tokenizer):
    return v1_tokenizer


@pytest.fixture(scope="module")
def windowed():  # window 8: every sequence here outgrows it, the ring wraps
    return tiny(TINY, 3)


@pytest.fixture(scope="module")
def full():  # full attention, context 96
    return tiny(TINY_FULL, 4)


def alone(model, tok, prompt, params):
    return generate(model, tok, [prompt], [params])[0].tokens


def schedule(model, tok, jobs, seed, cancel_some=False, **batch_kw):
    """Drive a Batch by hand: requests arrive at random steps in a random order (some cancelled at random);
    returns each job's tokens and finish reason. The cache never holds more than the budget."""
    rng = random.Random(seed)
    batch = Batch(model, tok, **batch_kw)
    pending = list(range(len(jobs)))
    rng.shuffle(pending)
    out = {i: [[], None, []] for i in range(len(jobs))}  # tokens, finish reason, logprobs

    def emit(i):
        def on(ev):
            if ev.token is not None:
                out[i][0].append(ev.token)
                out[i][2].append(ev.logprob)
            out[i][1] = ev.finish_reason or out[i][1]
        return on

    reqs = {}
    with torch.inference_mode():
        while pending or batch.active():
            while pending and rng.random() < 0.5:
                i = pending[0]
                need, max_new = check_request(model.config, jobs[i][0], jobs[i][1])
                reqs[i] = Request(jobs[i][0], jobs[i][1], need, max_new, emit=emit(i), index=i)
                if not batch.admit(reqs[i]):
                    break
                pending.pop(0)
            if cancel_some and batch.active() and rng.random() < 0.1:
                batch.cancel(rng.choice(batch.active()))
            batch.step()
            assert batch.cache.nbytes + batch.store.nbytes <= batch.budget_bytes
    return out, batch


@pytest.mark.parametrize("which", ["windowed", "full"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_arrivals_give_the_tokens_of_each_request_alone(which, seed, windowed, full, tok):
    """Rows free up in any order, so a prefilling or idle row often sits below decoding ones."""
    model = windowed if which == "windowed" else full
    rng = random.Random(seed)
    jobs = [(ids(100 * seed + i, rng.choice([1, 3, 9, 17, 40])),
             SamplingParams(max_tokens=rng.choice([1, 4, 12, 30]), logprobs=0)) for i in range(10)]
    want = [generate(model, tok, [p], [sp])[0] for p, sp in jobs]
    out, _ = schedule(model, tok, jobs, seed, max_batch=3, prefill_budget=8)
    assert [out[i][0] for i in range(len(jobs))] == [c.tokens for c in want]
    torch.testing.assert_close(torch.tensor(sum((out[i][2] for i in range(len(jobs))), [])),
                               torch.tensor(sum((c.logprobs for c in want), [])), atol=1e-5, rtol=0)


def test_cancelled_requests_leave_and_the_others_are_unchanged(windowed, tok):
    jobs = [(ids(200 + i, 5 + 3 * i), SamplingParams(max_tokens=25)) for i in range(6)]
    want = [alone(windowed, tok, p, sp) for p, sp in jobs]
    out, batch = schedule(windowed, tok, jobs, 5, cancel_some=True, max_batch=3)
    reasons = [out[i][1] for i in range(len(jobs))]
    assert "cancelled" in reasons
    for i, (tokens, reason, _) in out.items():
        assert tokens == (want[i] if reason != "cancelled" else want[i][: len(tokens)])
    assert not batch.active()


def test_seeded_sampling_does_not_depend_on_the_batch(windowed, tok):
    sampled = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, repetition_penalty=1.2, seed=7)
    prompt = ids(300, 6)
    want = alone(windowed, tok, prompt, sampled)
    others = [(ids(301 + i, 4 + i), SamplingParams(max_tokens=12, temperature=0.8, seed=i)) for i in range(3)]
    jobs = others[:1] + [(prompt, sampled)] + others[1:] + [(ids(310, 9), SamplingParams(max_tokens=5))]
    out, _ = schedule(windowed, tok, jobs, 3, max_batch=4)
    assert out[1][0] == want
    assert want != alone(windowed, tok, prompt, SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9,
                                                                 repetition_penalty=1.2, seed=8))


def test_cache_budget_bounds_the_buffers_and_requests_wait_for_room(full, tok):
    slot = Batch(full, tok, 1).slot_bytes
    budget = 2 * (40 + 1) * slot  # two rows of 40 positions
    jobs = [(ids(400 + i, 10 + i), SamplingParams(max_tokens=20)) for i in range(5)]
    want = [alone(full, tok, p, sp) for p, sp in jobs]
    out, batch = schedule(full, tok, jobs, 2, max_batch=8, kv_cache_bytes=budget)
    assert [out[i][0] for i in range(5)] == want
    assert batch.cache.batch_size <= 2
    with Engine(full, tok, max_batch=8, kv_cache_bytes=budget) as engine:
        with pytest.raises(RequestError, match="kv_cache_bytes"):
            engine.submit(ids(1, 30), SamplingParams(max_tokens=60))  # 90 positions: never fits
        handles = [engine.submit(p, sp) for p, sp in jobs]
        assert max(engine.stats().running for _ in range(3)) <= 2
        assert [[e.token for e in h if e.token is not None] for h in handles] == want
        s = engine.stats()
        assert s.kv_cache_allocated_bytes <= s.kv_cache_total_bytes == budget and 0 <= s.usage_ratio <= 1


@pytest.mark.parametrize("which", ["windowed", "full"])
def test_prefix_reuse_gives_the_same_tokens_and_logprobs(which, windowed, full, tok):
    model = windowed if which == "windowed" else full
    system = ids(500, 24)
    sp = SamplingParams(max_tokens=8, logprobs=0)
    out_first = alone(model, tok, system + ids(501, 6), sp)
    prompts = [system + ids(501, 6),
               system + ids(502, 5),  # shares the system prompt only
               system + ids(501, 6) + out_first[:-1] + ids(503, 4),  # continues the first
               system[:10] + ids(504, 7),  # a shorter shared prefix
               system + ids(505, 3)]  # windowed: from the snapshot the second one left
    want = [generate(model, tok, [p], [sp])[0] for p in prompts]
    for cache_on in (False, True):
        with Engine(model, tok, max_batch=2, prefix_cache=cache_on) as engine:
            for p, ref in zip(prompts, want):  # one after another: each finds the previous ones' rows kept
                events = [e for e in engine.submit(p, sp) if e.token is not None]
                assert [e.token for e in events] == ref.tokens
                torch.testing.assert_close(torch.tensor([e.logprob for e in events]), torch.tensor(ref.logprobs),
                                           atol=1e-5, rtol=0)
            hits = engine.stats().prefix_hits
        assert hits == (0 if not cache_on else 4 if which == "full" else 2)  # the ring: the continuation, the snapshot


def test_prefix_copied_from_a_running_request(full, tok):
    system = ids(600, 30)
    jobs = [(system + ids(601, 3), SamplingParams(max_tokens=40)), (system + ids(602, 4), SamplingParams(max_tokens=5))]
    want = [alone(full, tok, p, sp) for p, sp in jobs]
    out = {0: [], 1: []}
    batch = Batch(full, tok, max_batch=2)
    with torch.inference_mode():
        for i, (p, sp) in enumerate(jobs):
            need, max_new = check_request(full.config, p, sp)
            assert batch.admit(Request(p, sp, need, max_new, emit=lambda ev, i=i: out[i].append(ev.token), index=i))
            batch.step()
        while batch.active():
            batch.step()
    assert batch.prefix_tokens == 30
    assert [[t for t in out[i] if t is not None] for i in (0, 1)] == want


def test_engine_streams_cancels_and_counts(windowed, tok):
    with Engine(windowed, tok, max_batch=2) as engine:
        long = engine.submit(ids(700, 5), SamplingParams(max_tokens=100000))
        first = next(iter(long))
        assert first.token is not None and long.prompt_tokens == 5
        assert engine.stats().running == 1
        long.cancel()
        rest = list(long)
        assert rest[-1].finish_reason == "cancelled"
        deadline = time.time() + 10
        while engine.stats().running and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats().running == 0
        short = engine.submit(ids(701, 4), SamplingParams(max_tokens=6))
        assert [e.token for e in short if e.token is not None] == alone(windowed, tok, ids(701, 4),
                                                                         SamplingParams(max_tokens=6))


def test_bad_requests_and_a_full_queue(full, tok):
    for bad in (dict(max_batch=0), dict(max_queue=-1), dict(prefill_budget=0), dict(kv_cache_bytes=10)):
        with pytest.raises(VentouxError, match=next(iter(bad))):
            Engine(full, tok, **bad)
    with Engine(full, tok, max_batch=1, max_queue=1) as engine:
        for bad, words in (([], "empty"), ([5, 32000], "vocabulary"), (ids(1, 96), "context")):
            with pytest.raises(RequestError, match=words):
                engine.submit(bad, SamplingParams())
        busy = engine.submit(ids(800, 3), SamplingParams(max_tokens=10**6))
        next(iter(busy))  # admitted: it holds the only row
        engine.submit(ids(801, 3), SamplingParams(max_tokens=2))  # waits
        with pytest.raises(QueueFull, match="max_queue"):
            engine.submit(ids(802, 3), SamplingParams(max_tokens=2))
        busy.cancel()


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(windowed, tok, monkeypatch):
    with Engine(windowed, tok, max_batch=2) as engine:
        real = windowed.forward
        monkeypatch.setattr(windowed, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(EngineError, match="boom"):
            list(engine.submit(ids(900, 4), SamplingParams(max_tokens=5)))
        monkeypatch.setattr(windowed, "forward", real)
        assert len([e for e in engine.submit(ids(901, 4), SamplingParams(max_tokens=5)) if e.token]) >= 1
        admit = engine._batch.admit
        monkeypatch.setattr(engine._batch, "admit", lambda req: (_ for _ in ()).throw(MemoryError("no room")))
        with pytest.raises(EngineError, match="no room"):
            list(engine.submit(ids(902, 4), SamplingParams(max_tokens=5)))
        monkeypatch.setattr(engine._batch, "admit", admit)
        assert len([e for e in engine.submit(ids(903, 4), SamplingParams(max_tokens=5)) if e.token]) >= 1


def test_async_iteration_does_not_block_the_event_loop(windowed, tok):
    prompts = [ids(1000 + i, 3 + i) for i in range(4)]
    want = [alone(windowed, tok, p, SamplingParams(max_tokens=20)) for p in prompts]

    async def main(engine):
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        async def collect(p):
            return [e.token async for e in engine.submit(p, SamplingParams(max_tokens=20)) if e.token is not None]

        t = asyncio.create_task(ticker())
        got = await asyncio.gather(*(collect(p) for p in prompts))
        t.cancel()
        return got, ticks

    with Engine(windowed, tok, max_batch=4) as engine:
        got, ticks = asyncio.run(main(engine))
    assert got == want and ticks > 10


def test_threads_submitting_at_once(windowed, tok):
    jobs = [(ids(1100 + i, 2 + 3 * i), SamplingParams(max_tokens=4 + i)) for i in range(6)]
    want = [alone(windowed, tok, p, sp) for p, sp in jobs]
    got = [None] * len(jobs)
    with Engine(windowed, tok, max_batch=3, prefill_budget=4) as engine:
        def client(i):
            got[i] = [e.token for e in engine.submit(*jobs[i]) if e.token is not None]
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert got == want


def greedy(model, i, prompt, n, tokens=None):
    """A greedy Request for Batch driven by hand: its tokens go to tokens[i] (None: dropped)."""
    need, max_new = check_request(model.config, prompt, SamplingParams(max_tokens=n))
    emit = (lambda ev: None) if tokens is None else (lambda ev: tokens[i].append(ev.token))
    return Request(prompt, SamplingParams(max_tokens=n), need, max_new, emit=emit, index=i)


def test_a_long_prompt_is_prefilled_in_budgeted_chunks_between_decode_steps(windowed, tok):
    batch = Batch(windowed, tok, max_batch=2, prefill_budget=8)
    tokens = {0: [], 1: []}

    with torch.inference_mode():
        assert batch.admit(greedy(windowed, 0, ids(1200, 3), 30, tokens))
        batch.step()
        long = greedy(windowed, 1, ids(1201, 60), 5, tokens)
        assert batch.admit(long)
        for k in range(1, 8):  # 60 prompt tokens at 8 a step; the other request decodes at every step
            batch.step()
            assert len(long.fed) == min(8 * k, 60) and len(tokens[0]) == 1 + k  # step 1 gave its first token
        while batch.active():
            batch.step()
    assert tokens[1] == alone(windowed, tok, ids(1201, 60), SamplingParams(max_tokens=5))


def test_a_short_prompt_is_not_held_behind_a_long_prefill(windowed, tok):
    """A short prompt admitted while a long one prefills gets its chunk (and its first token) at the next
    step, not after the long prompt's last chunk; both still give the tokens they get alone."""
    batch = Batch(windowed, tok, max_batch=2, prefill_budget=8)
    tokens = {0: [], 1: []}

    with torch.inference_mode():
        long = greedy(windowed, 0, ids(1210, 80), 3, tokens)
        assert batch.admit(long)
        batch.step()
        assert batch.admit(greedy(windowed, 1, ids(1211, 5), 4, tokens))
        batch.step()  # the short prompt's 5 tokens leave 3 of the budget: less than the long one's chunk
        assert len(tokens[1]) == 1 and len(long.fed) == 8  # its first token (it decodes from the next step)
        batch.step()
        assert len(long.fed) == 16 and len(tokens[1]) == 2  # the long prefill goes on between decode steps
        while batch.active():
            batch.step()
    assert tokens[0] == alone(windowed, tok, ids(1210, 80), SamplingParams(max_tokens=3))
    assert tokens[1] == alone(windowed, tok, ids(1211, 5), SamplingParams(max_tokens=4))


def test_a_stream_of_short_prompts_does_not_starve_a_long_one(windowed, tok):
    """A new short prompt every step would take part of every step's budget, and the long prompt's whole chunk
    would never fit: the one the last step left out goes first, so it gets a chunk every other step."""
    batch = Batch(windowed, tok, max_batch=4, prefill_budget=8)

    with torch.inference_mode():
        long = greedy(windowed, 0, ids(1220, 40), 2)
        assert batch.admit(long)
        batch.step()
        for k in range(1, 10):
            assert batch.admit(greedy(windowed, k, ids(1220 + k, 3), 1))  # one token: its row frees at once
            batch.step()
        assert len(long.fed) >= len(long.prompt)  # 8 at the first step, then 8 at least every other step


def test_relayouts_carry_sampling_state_along(full, tok, monkeypatch):
    """A running request's row moves to new buffers when a longer one arrives (the budget fits two rows of
    exactly the longer need): its generator and token history (penalties that boost repeats) move with it."""
    from ventoux.sampling import Sampler

    moved = []
    real = Sampler.moved
    monkeypatch.setattr(Sampler, "moved", lambda self, rows, moves: (moved.append(moves), real(self, rows, moves))[1])
    slot = Batch(full, tok, 1).slot_bytes
    boost = SamplingParams(max_tokens=20, temperature=0.9, seed=1, repetition_penalty=0.2, presence_penalty=-2,
                           frequency_penalty=-2)
    jobs = [(ids(1300, 8), boost), (ids(1301, 20), SamplingParams(max_tokens=22, temperature=0.7, seed=2))]
    want = [alone(full, tok, p, sp) for p, sp in jobs]
    out = {0: [], 1: []}
    batch = Batch(full, tok, max_batch=4, kv_cache_bytes=2 * (42 + 1) * slot)
    with torch.inference_mode():
        for i, (p, sp) in enumerate(jobs):
            need, max_new = check_request(full.config, p, sp)
            assert batch.admit(Request(p, sp, need, max_new, emit=lambda ev, i=i: out[i].append(ev.token), index=i))
            for _ in range(5):
                batch.step()
        while batch.active():
            batch.step()
    assert [[t for t in out[i] if t is not None] for i in (0, 1)] == want
    assert moved[-1] == [(0, 0)] and batch.cache.capacity == 42  # the first request, mid-run
    assert len(set(want[0])) < len(want[0])  # the boosted history shows (repeats)


def test_a_vocabulary_padded_past_the_tokenizer_never_yields_its_padding(tok):
    # A model may pad its vocabulary beyond its tokenizer's (load_tokenizer); those ids are no tokens: their
    # logits are dropped (as vLLM drops them), so greedy decoding, sampling and logprobs see the tokenizer's
    # 32000 ids only, as a model without the padding would. Here the padding's logits dwarf the rest.
    torch.manual_seed(3)
    padded = Transformer(TINY_FULL.replace(vocab_size=32064)).eval()
    with torch.no_grad():
        padded.output.weight[32000:] *= 5
    prompt = ids(40, 5)
    with torch.inference_mode():
        assert padded(torch.tensor([prompt]), torch.arange(5)[None])[0, -1].argmax() >= 32000  # it would win
    out = generate(padded, tok, [prompt], [SamplingParams(max_tokens=6, logprobs=3)])[0]
    tokens, seq = [], list(prompt)
    with torch.inference_mode():
        for _ in range(6):  # the reference: a whole forward a token, the argmax over the tokenizer's ids
            logits = padded(torch.tensor([seq]), torch.arange(len(seq))[None])[0, -1, :32000]
            tokens.append(int(logits.argmax()))
            seq.append(tokens[-1])
            assert out.logprobs[len(tokens) - 1] == pytest.approx(float(logits.log_softmax(-1).max()), abs=1e-5)
    assert out.tokens == tokens
    assert all(t < 32000 for top in out.top_logprobs for t in top)
    sampled = generate(padded, tok, [prompt], [SamplingParams(max_tokens=20, temperature=1.0, seed=1)])[0]
    assert all(t < 32000 for t in sampled.tokens)
    with pytest.raises(RequestError, match=r"logit_bias .*32010.*\[0, 32000\)"):
        generate(padded, tok, [prompt], [SamplingParams(logit_bias={32010: 5})])
    with Engine(padded, tok, max_batch=1) as engine:
        with pytest.raises(RequestError, match=r"logit_bias .*32010.*\[0, 32000\)"):
            engine.submit(prompt, SamplingParams(logit_bias={32010: 5}))
        with pytest.raises(RequestError, match=r"vocabulary \[0, 32000\)"):
            engine.submit([*prompt, 32010], SamplingParams())


def test_a_request_whose_logits_turn_nan_fails_alone(tok):
    # Token 77's embedding is NaN: a prompt holding it has NaN logits, no distribution to sample from. That
    # request ends with an error naming it; a request decoding beside it, and the next one in its freed row,
    # get the tokens they get alone. Sampling NaN logits gave token 0 silently, greedy the NaN's index.
    model = tiny(TINY_FULL, 8)
    with torch.no_grad():
        model.tok_embeddings.weight[77] = float("nan")
    poisoned, clean, later = [5, 77, 9], ids(41, 6), ids(42, 6)
    greedy, sampled = SamplingParams(max_tokens=8), SamplingParams(max_tokens=8, temperature=1.0, seed=3)
    with pytest.raises(VentouxError, match="NaN or inf"):
        generate(model, tok, [poisoned], [sampled])
    with Engine(model, tok, max_batch=2) as engine:
        beside = engine.submit(clean, sampled)
        with pytest.raises(EngineError, match="NaN or inf after 3 tokens"):
            list(engine.submit(poisoned, greedy))
        assert [e.token for e in beside if e.token is not None] == alone(model, tok, clean, sampled)
        after = engine.submit(later, greedy)
        assert [e.token for e in after if e.token is not None] == alone(model, tok, later, greedy)
