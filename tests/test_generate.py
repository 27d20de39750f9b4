"""Generation against transformers: greedy identical, batched == alone, sampling processors equal HF's."""


import pytest
import torch
from conftest import TINY, TINY_FULL, hf_model, ventoux_from_hf
from hypothesis import given, settings
from hypothesis import strategies as st

from ventoux.api import LLM, compile_decode
from ventoux.cache import KVCache
from ventoux.errors import VentouxError
from ventoux.events import TextState
from ventoux.generate import generate, stream
from ventoux.sampling import Sampler, SamplingParams


@pytest.fixture(scope="module")
def tokenizer(v1_tokenizer):
    return v1_tokenizer


@pytest.fixture(scope="module")
def windowed():
    hf = hf_model(TINY.replace(vocab_size=32000), seed=3)
    return hf, ventoux_from_hf(hf)


@pytest.fixture(scope="module")
def full():
    hf = hf_model(TINY_FULL.replace(vocab_size=32000), seed=4)
    return hf, ventoux_from_hf(hf)


def greedy(model, tok, prompts, n, **kw):
    return generate(model, tok, prompts, [SamplingParams(max_tokens=n, **kw)] * len(prompts))


def prompt_ids(seed, n):
    # Start above the control ids so EOS is not in the prompt.
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_greedy_past_three_windows_matches_transformers(windowed, tokenizer):
    hf, vx = windowed
    w = vx.config.sliding_window
    prompt = prompt_ids(0, 5)
    n = 3 * w + 9
    out = greedy(vx, tokenizer, [prompt], n)[0]
    assert len(out.tokens) == n or out.finish_reason == "stop"
    seq = torch.tensor([prompt + out.tokens])
    with torch.no_grad():
        ref = hf(seq).logits[0, len(prompt) - 1: -1]  # the reference's logits for every generated token
    chosen = ref.gather(-1, torch.tensor(out.tokens)[:, None])[:, 0]
    # Teacher-forced: each token ventoux chose is the reference's argmax (up to float ties).
    torch.testing.assert_close(chosen, ref.max(-1).values, atol=1e-4, rtol=0)
    # And transformers' own greedy generate (with its cache) gives the same tokens.
    with torch.no_grad():
        hf_tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=len(out.tokens), do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert hf_tokens == out.tokens


@pytest.mark.parametrize("which", ["windowed", "full"])
def test_batched_equals_one_by_one(which, windowed, full, tokenizer):
    _, vx = windowed if which == "windowed" else full
    prompts = [prompt_ids(1, 3), prompt_ids(2, 17), prompt_ids(3, 9)]
    alone = [greedy(vx, tokenizer, [p], 20)[0].tokens for p in prompts]
    batched = [c.tokens for c in greedy(vx, tokenizer, prompts, 20)]
    assert batched == alone


def test_compiled_decode_step_gives_the_eager_tokens_and_compiles_once(windowed, tokenizer):
    _, model = windowed
    prompts = [prompt_ids(7, 5), prompt_ids(8, 3)]
    params = [SamplingParams(max_tokens=24)] * 2  # 24 + 5 positions: three windows of 8, the buffer rolls
    eager = generate(model, tokenizer, prompts, params)
    decode = compile_decode(model)
    assert [c.tokens for c in generate(model, tokenizer, prompts, params, decode)] == [c.tokens for c in eager]
    with torch._dynamo.config.patch(error_on_recompile=True):  # static shapes: the next call reuses the graph
        assert [c.tokens for c in generate(model, tokenizer, prompts, params, decode)] == [c.tokens for c in eager]


def test_prefill_chunk_size_does_not_change_tokens(windowed, tokenizer):
    _, vx = windowed
    p = prompt_ids(5, 30)
    runs = [greedy(vx, tokenizer, [p], 12, prefill_chunk=c)[0].tokens for c in (1, 5, 8, 64)]
    assert all(r == runs[0] for r in runs)


def test_full_attention_stops_with_length_at_context(full, tokenizer):
    _, vx = full
    ctx = vx.config.max_seq_len
    p = prompt_ids(6, ctx - 10)
    out = greedy(vx, tokenizer, [p], 50)[0]
    assert out.finish_reason == "length" and len(out.tokens) == 10
    with pytest.raises(VentouxError, match="context"):
        greedy(vx, tokenizer, [prompt_ids(7, ctx)], 5)


def test_rolling_cache_memory_is_flat_past_the_window(windowed):
    _, vx = windowed
    w = vx.config.sliding_window
    cache = KVCache(vx.config, 1, capacity=1)
    sizes = {}
    with torch.no_grad():
        for p in range(10 * w):
            vx(torch.tensor([[p % 100 + 3]]), torch.tensor([[p]]), cache=cache)
            if p + 1 in (w, 10 * w):
                sizes[p + 1] = cache.nbytes
    assert sizes[w] == sizes[10 * w] == 2 * vx.config.n_layers * (w + 1) * vx.config.n_kv_heads * vx.config.head_dim * 4


def test_released_row_is_reused_by_a_new_sequence(windowed):
    """Continuous batching: row 0 runs a long sequence, then a new one starts there from position 0
    while row 1 carries on; both rows match fresh full forwards."""
    _, vx = windowed
    a, b, c = (torch.tensor([prompt_ids(s, n)]) for s, n in ((8, 30), (9, 40), (10, 12)))
    cache = KVCache(vx.config, 2)
    with torch.no_grad():
        vx(a, torch.arange(30)[None], cache=cache.rows(slice(0, 1)))
        vx(b[:, :30], torch.arange(30)[None], cache=cache.rows(slice(1, 2)))
        vx(c[:, :11], torch.arange(11)[None], cache=cache.rows(slice(0, 1)))  # row 0 reused
        out = vx(torch.stack([c[0, 11:12], b[0, 30:31]]), torch.tensor([[11], [30]]), cache=cache)
        torch.testing.assert_close(out[0, 0], vx(c)[0, -1], atol=1e-4, rtol=0)
        torch.testing.assert_close(out[1, 0], vx(b[:, :31])[0, -1], atol=1e-4, rtol=0)


def test_sampling_processors_match_transformers():
    from transformers import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(2, 50) * 3
    prompts = [[1, 5, 7], [2, 9]]
    p = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.3)
    ours = Sampler.for_batch([p, p], prompts, 50, "cpu").process(logits)
    ids = torch.tensor([[1, 5, 7], [2, 9, 9]])
    ref = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                 TopPLogitsWarper(0.8), MinPLogitsWarper(0.05)):
        ref = proc(ids, ref)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(1, 6)
    s = Sampler.for_batch([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], [[0]], 6, "cpu")
    s.counts[0, 2], s.counts[0, 3] = 2, 1  # token 2 generated twice, token 3 once
    out = s.process(logits)[0].tolist()
    assert out == [0, 0, -(0.5 + 0.5), -(0.5 + 0.25), 0, 0]


def test_seed_repeats_and_top_k_1_is_greedy(windowed, tokenizer):
    _, vx = windowed
    p = [prompt_ids(11, 6)]
    run = lambda **kw: generate(vx, tokenizer, p, [SamplingParams(max_tokens=15, **kw)])[0].tokens  # noqa: E731
    assert run(temperature=1.0, seed=5) == run(temperature=1.0, seed=5)
    assert run(temperature=1.0, seed=5) != run(temperature=1.0, seed=6)
    assert run(temperature=1.0, top_k=1, seed=1) == run(temperature=0.0)


def test_sampling_follows_the_distribution():
    """The exponential race draws from softmax: frequencies over many draws match the probabilities."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    s = Sampler.for_batch([SamplingParams(temperature=1.0, seed=i) for i in range(20000)], [[0]] * 20000, 4, "cpu")
    freq = torch.bincount(s(logits), minlength=4).float() / 20000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.015, rtol=0)


def test_logprobs_are_the_reference_log_softmax(windowed, tokenizer):
    hf, vx = windowed
    p = prompt_ids(12, 7)
    out = greedy(vx, tokenizer, [p], 6, logprobs=3)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([p + out.tokens])).logits[0, len(p) - 1: -1].log_softmax(-1)
    torch.testing.assert_close(torch.tensor(out.logprobs), ref.gather(-1, torch.tensor(out.tokens)[:, None])[:, 0],
                               atol=1e-4, rtol=0)
    for top, row in zip(out.top_logprobs, ref):
        assert list(top) == row.topk(3).indices.tolist()


def test_stop_strings_and_stop_tokens(windowed, tokenizer):
    _, vx = windowed
    p = [prompt_ids(13, 5)]
    full_out = greedy(vx, tokenizer, p, 30)[0]
    text = full_out.text
    assert len(text) > 12
    stop = text[6:9]
    cut = greedy(vx, tokenizer, p, 30, stop=[stop])[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
    streamed = "".join(e.text for e in stream(vx, tokenizer, p, [SamplingParams(max_tokens=30, stop=[stop])]))
    assert streamed == cut.text
    tok_cut = greedy(vx, tokenizer, p, 30, stop_token_ids=[full_out.tokens[4]])[0]
    first = full_out.tokens.index(full_out.tokens[4])
    assert tok_cut.finish_reason == "stop" and tok_cut.tokens == full_out.tokens[:first]


class _Pieces:
    """A stream decoder that hands back each piece as it is (TextState.flush asks it for the rest)."""

    def flush(self) -> str:
        return ""


def _held_back_by_definition(text: str, stops: list[str]) -> int:
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("ab", max_size=4), min_size=1, max_size=12),
       st.lists(st.text("ab", min_size=1, max_size=6), min_size=1, max_size=3))
def test_stop_strings_cut_and_hold_back_text_by_their_definition(pieces, stops):
    # Whatever the pieces, what is emitted plus what is held is the text up to the earliest stop string, and what
    # is held is the longest end of it that begins a stop string (it may complete with the next tokens)
    state, emitted, text = TextState(_Pieces(), stops), "", ""
    for piece in pieces:
        text += piece
        out, hit = state.push(piece)
        emitted += out
        if hit:
            found = [i for s in stops if (i := text.find(s)) >= 0]
            assert emitted == text[:min(found)]
            return
        assert emitted + state.held == text and len(state.held) == _held_back_by_definition(text, stops)
    assert emitted + state.flush() == text


class _CountedStop(str):
    """A stop string that counts how often TextState slices or compares it."""

    uses = 0

    def __getitem__(self, key):
        _CountedStop.uses += 1
        return str.__getitem__(self, key)

    def startswith(self, *args):
        _CountedStop.uses += 1
        return str.startswith(self, *args)


def test_a_long_stop_string_costs_what_the_held_text_costs():
    # Each token tried every prefix of every stop string, a slice each: a 900 KB stop string (under the server's
    # body limit) stalled the engine's thread, every client with it, for seconds a token. The work now follows
    # the text held back, a few characters here: a few uses of the stop string a token, not 20,000
    stop = _CountedStop("a" * 20_000)
    _CountedStop.uses = 0
    state = TextState(_Pieces(), [stop, "xyz"])
    emitted = "".join(state.push(piece)[0] for piece in ["The", " cat", " sat", " on", " a", " mat", " x", "y"])
    assert emitted == "The cat sat on a mat " and state.held == "xy"
    assert state.push("aa") == ("xy", False) and state.held == "aa"
    assert _CountedStop.uses <= 30


def test_ignore_eos_decodes_through_the_end_of_sequence_as_transformers_does(tokenizer):
    """vLLM's ignore_eos: the EOS token is chosen like any other and the sequence goes on, as transformers'
    generate does with eos_token_id=None; without it the sequence stops there."""
    hf = hf_model(TINY.replace(vocab_size=32000), seed=5)
    prompt, n = prompt_ids(21, 6), 16
    with torch.no_grad():
        free = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
        # EOS's output row becomes a copy of the 4th token's, a bit longer: EOS wins where that token won
        hf.lm_head.weight[tokenizer.eos_id] = 1.5 * hf.lm_head.weight[free[3]]
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    first_eos = ref.index(tokenizer.eos_id)
    assert 0 < first_eos < n - 2 and ref[first_eos + 1:] != [tokenizer.eos_id] * (n - first_eos - 1)
    vx = ventoux_from_hf(hf)
    through = greedy(vx, tokenizer, [prompt], n, ignore_eos=True)[0]
    assert through.tokens == ref and through.finish_reason == "length"
    assert through.text == tokenizer.decode(ref)  # EOS adds no text, as it is a control token
    stopped = greedy(vx, tokenizer, [prompt], n)[0]
    assert stopped.tokens == ref[:first_eos] and stopped.finish_reason == "stop"
    # in a batch, one row through EOS and one stopping at it
    both = generate(vx, tokenizer, [prompt, prompt], [SamplingParams(max_tokens=n, ignore_eos=True),
                                                      SamplingParams(max_tokens=n)])
    assert [c.tokens for c in both] == [ref, ref[:first_eos]]
    events = [e for e in stream(vx, tokenizer, [prompt], [SamplingParams(max_tokens=n, ignore_eos=True)])
              if e.token is not None]
    assert [e.token for e in events] == ref


def test_stream_deltas_concatenate_to_the_decoded_tokens(windowed, tokenizer):
    _, vx = windowed
    events = list(stream(vx, tokenizer, [prompt_ids(14, 4)], [SamplingParams(max_tokens=25, temperature=1.0,
                                                                               seed=0)]))
    tokens = [e.token for e in events if e.token is not None]
    assert "".join(e.text for e in events) == tokenizer.decode(tokens)
    assert events[-1].finish_reason in ("stop", "length")


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(min_p=1.0), dict(max_tokens=0), dict(repetition_penalty=0),
                                 dict(presence_penalty=3)])
def test_invalid_sampling_values_name_the_parameter(bad):
    with pytest.raises(VentouxError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_llm_api_generate_stream_chat(windowed, tokenizer):
    _, vx = windowed
    llm = LLM(vx, tokenizer, "tiny")
    one = llm.generate("Hello there", max_tokens=8)
    assert one.tokens == greedy(vx, tokenizer, [tokenizer.encode("Hello there")], 8)[0].tokens
    both = llm.generate(["Hello there", "A much longer prompt than the first"], max_tokens=8)
    assert both[0].tokens == one.tokens
    assert "".join(e.text for e in llm.stream("Hello there", max_tokens=8)) == one.text
    msgs = [{"role": "user", "content": "Hi"}]
    assert llm.chat(msgs, max_tokens=5).tokens == llm.generate(tokenizer.encode_chat(msgs), max_tokens=5).tokens
    with pytest.raises(VentouxError, match="empty"):
        llm.generate("")
    with pytest.raises(VentouxError, match="temprature"):
        llm.generate("x", temprature=0.5)
