"""Sampling pinned against independent references: transformers' logits processors (min_p, repetition
penalty, top-k, top-p), OpenAI's definitions of presence / frequency penalties (counts over generated tokens
only) and of logprobs (log-softmax of the raw logits, before any processor), through the public functions
of sampling.py and through a real multi-step generation (ventoux.load + llm.generate) checked against a
full forward of transformers' model on the same weights.
"""

import math
import shutil

import pytest
import torch
from conftest import TINY_FULL, V1, hf_model

import ventoux
from ventoux.errors import VentouxError
from ventoux.sampling import Sampler, SamplingParams, apply_min_p, apply_penalties, apply_top_k, apply_top_p

VOCAB = 32000


def col(values):
    return torch.tensor([[float(v)] for v in values])


def random_logits(rows=3, vocab=64, seed=0, scale=3.0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# ---- the functions against transformers, per row ----------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_p_equals_transformers_per_row(seed):
    from transformers import MinPLogitsWarper

    logits = random_logits(seed=seed, scale=1.0)
    values = [0.05, 0.3, 0.9]
    ours = apply_min_p(logits, col(values))
    for row, m in enumerate(values):
        ref = MinPLogitsWarper(m)(None, logits[row:row + 1].clone())[0]
        assert torch.equal(ours[row], ref), (row, m)
    assert 1 < int((~torch.isinf(ours[0])).sum()) < 64  # the filter removed some tokens, not all


@pytest.mark.parametrize("seed", [0, 1])
def test_repetition_penalty_equals_transformers_per_row(seed):
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = random_logits(seed=seed)
    history = [[1, 5, 5, 7, 40], [2, 9], [0, 63, 30, 31]]
    penalties = [1.3, 0.7, 2.0]
    seen = torch.zeros(3, 64, dtype=torch.bool)
    for row, ids in enumerate(history):
        seen[row, ids] = True
    ours = apply_penalties(logits, seen, torch.zeros(3, 64), col(penalties), col([0] * 3), col([0] * 3))
    for row, (ids, pen) in enumerate(zip(history, penalties)):
        ref = RepetitionPenaltyLogitsProcessor(pen)(torch.tensor([ids]), logits[row:row + 1].clone())[0]
        torch.testing.assert_close(ours[row], ref, atol=0, rtol=0)
    assert not torch.equal(ours, logits)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([[-2.0, -0.5, 0.0, 0.5, 2.0, 1.0]])
    seen = torch.tensor([[True, True, True, True, True, False]])
    ours = apply_penalties(logits, seen, torch.zeros(1, 6), col([2.0]), col([0]), col([0]))
    assert ours.tolist() == [[-4.0, -1.0, 0.0, 0.25, 1.0, 1.0]]
    assert torch.equal(ours, RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1, 2, 3, 4]]), logits.clone()))


def test_presence_and_frequency_follow_openais_formula():
    """OpenAI: mu[j] - c[j] * frequency - (c[j] > 0) * presence, c = counts in the generated text only;
    the repetition penalty (HF) is the only one that reads the prompt."""
    logits = random_logits(rows=2, vocab=10, seed=4)
    counts = torch.tensor([[0, 3, 1, 0, 0, 0, 0, 2, 0, 0], [5, 0, 0, 0, 1, 0, 0, 0, 0, 1]], dtype=torch.float)
    prompt_seen = torch.zeros(2, 10, dtype=torch.bool)
    prompt_seen[:, 5] = True  # a prompt token: untouched while the repetition penalty is 1
    presence, frequency = [0.5, -1.25], [0.25, 1.5]
    ours = apply_penalties(logits, prompt_seen | (counts > 0), counts, col([1, 1]), col(presence), col(frequency))
    for row in range(2):
        for j in range(10):
            c = counts[row, j].item()
            expected = logits[row, j].item() - c * frequency[row] - (c > 0) * presence[row]
            assert math.isclose(ours[row, j].item(), expected, rel_tol=0, abs_tol=1e-6), (row, j)


@pytest.mark.parametrize("k", [1, 5, 64, 0])
def test_top_k_equals_transformers(k):
    from transformers import TopKLogitsWarper

    logits = random_logits(rows=1, seed=5)
    ours = apply_top_k(logits, col([k]))
    ref = logits if k == 0 else TopKLogitsWarper(k)(None, logits.clone())
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.95, 1.0])
def test_top_p_equals_transformers(p):
    from transformers import TopPLogitsWarper

    logits = random_logits(rows=1, seed=6)
    ours = apply_top_p(logits, col([p]))
    ref = TopPLogitsWarper(p)(None, logits.clone()) if p < 1 else logits
    assert torch.equal(ours, ref)


def test_exact_boundaries_follow_transformers():
    """A token whose probability is exactly min_p times the top one stays; a token whose higher-ranked mass is
    exactly top_p goes (probabilities 1/2, 1/4, 1/4 are exact in float32)."""
    from transformers import MinPLogitsWarper, TopPLogitsWarper

    at_floor = torch.tensor([[0.0, math.log(0.5), -3.0]])  # p1 == 0.5 * p0 exactly
    assert torch.equal(apply_min_p(at_floor, col([0.5])), MinPLogitsWarper(0.5)(None, at_floor.clone()))
    assert torch.isinf(apply_min_p(at_floor, col([0.5]))).tolist() == [[False, False, True]]
    halves = torch.tensor([[0.0, math.log(0.5), math.log(0.5)]])
    assert torch.equal(apply_top_p(halves, col([0.5])), TopPLogitsWarper(0.5)(None, halves.clone()))
    assert torch.isinf(apply_top_p(halves, col([0.5]))).tolist() == [[False, True, True]]


def test_a_vanishing_top_p_keeps_the_top_token():
    """1e-46 is 0 in a float32 column: the top token must still stay (as transformers keeps one)."""
    logits = random_logits(rows=2, seed=7)
    out = apply_top_p(logits, col([1e-46, 1e-46]))
    assert torch.equal(out.max(-1).values, logits.max(-1).values) and (out == -math.inf).sum(-1).tolist() == [63, 63]


def test_sampler_rows_default_to_every_row_in_order():
    """Three rows that are greedy in effect (temperature 0, top_k 1, a vanishing top_p): the tokens are the
    argmax of each row's logits, whether rows are implied or given in another order."""
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1, seed=3),
              SamplingParams(temperature=0.8, top_p=1e-9, seed=4)]
    logits = random_logits(rows=3, seed=8)
    assert Sampler.for_batch(params, [[1], [2], [3]], 64, "cpu")(logits).tolist() == logits.argmax(-1).tolist()
    sampler = Sampler.for_batch(params, [[1], [2], [3]], 64, "cpu")
    assert sampler(logits.flip(0), [2, 1, 0]).tolist() == logits.flip(0).argmax(-1).tolist()


def test_a_top_k_beyond_the_vocabulary_keeps_every_token():
    """top_k = 2^63 - 1 is valid (an integer >= 0) and keeps the whole vocabulary, as any k >= V does: the same
    draws as top_k off. In the sampler's float32 column it became 2^63, whose .long() overflowed (an index error
    that failed the whole batch)."""
    logits = random_logits(rows=2, seed=10)
    draws = {}
    for k in (0, 64, 2**63 - 1):
        params = [SamplingParams(temperature=1.0, top_k=k, seed=s) for s in (1, 2)]
        sampler = Sampler.for_batch(params, [[1], [2]], 64, "cpu")
        draws[k] = [sampler(logits).tolist() for _ in range(20)]
    assert draws[2**63 - 1] == draws[64] == draws[0]


def test_greedy_rows_skip_the_processors_and_pick_what_they_would_pick():
    """Greedy rows with every filter set take the raw logits' argmax without running the processors (the decode
    step's shortcut); that is the token the processed logits give, and a row with a penalty still gets one."""
    params = [SamplingParams(top_k=3, top_p=0.3, min_p=0.5), SamplingParams(top_k=1), SamplingParams(min_p=0.9)]
    logits = random_logits(rows=3, seed=9)
    sampler = Sampler.for_batch(params, [[1], [2], [3]], 64, "cpu")
    ran = []
    sampler.process = lambda *a: ran.append(a) or Sampler.process(sampler, *a)
    assert sampler(logits).tolist() == Sampler.process(sampler, logits).argmax(-1).tolist() and not ran
    penalised = Sampler.for_batch([SamplingParams(repetition_penalty=5.0)], [[int(logits[0].argmax())]], 64, "cpu")
    penalised.process = lambda *a: ran.append(a) or Sampler.process(penalised, *a)
    assert penalised(logits[:1]).tolist() != logits[:1].argmax(-1).tolist() and ran


def test_logit_bias_then_the_processors_equal_transformers():
    """Each row's logit_bias is added before temperature and the filters, as transformers' SequenceBias
    processor (one-token sequences) runs before its warpers; rows without a bias are left as they are."""
    from transformers import SequenceBiasLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper

    logits = random_logits(rows=3, seed=10)
    top = logits.argmax(-1).tolist()
    biases = [{top[0]: -100.0, 7: 2.5, 9: 100.0}, None, {top[2]: -3.25}]
    params = [SamplingParams(temperature=0.7, top_k=5, logit_bias=b, seed=1) for b in biases]
    ours = Sampler.for_batch(params, [[1]] * 3, 64, "cpu").process(logits)
    for row, bias in enumerate(biases):
        ref = logits[row:row + 1].clone()
        if bias:
            ref = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])(torch.tensor([[1]]), ref)
        ref = TopKLogitsWarper(5)(None, TemperatureLogitsWarper(0.7)(None, ref))
        torch.testing.assert_close(ours[row:row + 1], ref, rtol=0, atol=1e-6)


def test_a_greedy_row_with_a_logit_bias_takes_the_biased_argmax_and_keeps_it_when_moved():
    logits = random_logits(rows=2, seed=11)
    first, second = logits[0].topk(2).indices.tolist()
    params = [SamplingParams(logit_bias={first: -100}), SamplingParams()]
    sampler = Sampler.for_batch(params, [[1], [2]], 64, "cpu")
    assert sampler(logits).tolist() == [second, int(logits[1].argmax())]
    moved = sampler.moved(3, [(0, 2), (1, 0)])  # a relayout: row 0's request now holds row 2
    assert moved(logits.flip(0), [0, 2]).tolist() == [int(logits[1].argmax()), second]
    moved.take(2, SamplingParams(), [1])  # a new request in that row: no bias left over
    assert moved(logits[:1], [2]).tolist() == [first]
    forced = Sampler.for_batch([SamplingParams(logit_bias={"63": 100})], [[1]], 64, "cpu")  # JSON's string key
    assert forced(logits[:1]).tolist() == [63]


@pytest.mark.parametrize("presence, frequency, expected", [(0.0, 1.0, [0, 0, 1, 0, 2]), (1.0, 0.0, [0, 0, 0, 0, 0]),
                                                            (2.0, 0.0, [0, 1, 0, 0, 0]), (0.5, 0.75, [0, 0, 1, 0, 2])])
def test_output_counts_grow_by_one_per_generated_token(presence, frequency, expected):
    """Fixed logits 2.5, 1, 0.4, -1, ...: what each step picks shows the counts the sampler holds (worked out by
    hand with OpenAI's formula, e.g. frequency 1: 2.5, 1.5, then 0.5 < 1 picks token 1, ...; the prompt token 5
    is never counted). Counts stuck at 1, or growing by 2, pick other tokens."""
    logits = torch.tensor([[2.5, 1.0, 0.4] + [-1.0] * 7])
    sampler = Sampler.for_batch([SamplingParams(presence_penalty=presence, frequency_penalty=frequency)], [[5]], 10,
                                "cpu")
    assert [int(sampler(logits)[0]) for _ in expected] == expected


# ---- through a multi-step generation ------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers' model, ventoux's LLM loaded from the folder it saved): equal weights."""
    hf = hf_model(TINY_FULL.replace(vocab_size=VOCAB), seed=21)
    folder = tmp_path_factory.mktemp("sampling") / "tiny"
    hf.save_pretrained(folder)
    shutil.copy(V1, folder / "tokenizer.model")
    return hf, ventoux.load(str(folder), dtype="float32", device="cpu")


PROMPT = [1, 1014, 2232, 3423, 907, 1014, 5]


def raw_logits(hf, ids):
    """The reference's raw next-token logits after every prefix of `ids` longer than the prompt."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].double()


def test_repetition_penalty_over_steps_equals_transformers_generate(models):
    hf, llm = models
    out = llm.generate(PROMPT, max_tokens=24, repetition_penalty=1.5)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=len(out.tokens), do_sample=False,
                          repetition_penalty=1.5, eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert out.tokens == ref
    assert out.tokens != llm.generate(PROMPT, max_tokens=24).tokens  # the penalty changed the text


def openai_penalised_greedy(hf, prompt, n, presence, frequency, count_prompt=False):
    """Greedy decoding with OpenAI's penalties, one full forward per step: the reference loop."""
    ids = list(prompt)
    for _ in range(n):
        logits = raw_logits(hf, ids)[-1]
        counted = ids if count_prompt else ids[len(prompt):]
        c = torch.bincount(torch.tensor(counted, dtype=torch.long), minlength=VOCAB).double()
        ids.append(int((logits - c * frequency - (c > 0) * presence).argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("presence, frequency", [(0.0, 0.7), (1.5, 0.0), (0.5, 0.4)])
def test_presence_frequency_over_steps_follow_openai(models, presence, frequency):
    hf, llm = models
    n = 24
    penalties = dict(presence_penalty=presence, frequency_penalty=frequency)
    out = llm.generate(PROMPT, max_tokens=n, **penalties)
    assert out.tokens == openai_penalised_greedy(hf, PROMPT, n, presence, frequency)
    assert out.tokens != llm.generate(PROMPT, max_tokens=n).tokens  # this model repeats itself unpenalised
    # A prompt holding the tokens the model likes next: counting the prompt would give other tokens.
    prompt = PROMPT + raw_logits(hf, PROMPT)[-1].topk(40).indices.tolist()
    out = llm.generate(prompt, max_tokens=n, **penalties)
    assert out.tokens == openai_penalised_greedy(hf, prompt, n, presence, frequency)
    assert out.tokens != openai_penalised_greedy(hf, prompt, n, presence, frequency, count_prompt=True)


def test_logit_bias_over_steps_equals_transformers_generate(models):
    """Greedy decoding with the model's two favourite first tokens banned and a third pushed up: the same tokens
    as transformers' generate with that sequence_bias, and other tokens than without it."""
    hf, llm = models
    banned = raw_logits(hf, PROMPT)[-1].topk(2).indices.tolist()
    bias = {banned[0]: -100.0, banned[1]: -100.0, 1014: 4.0}
    out = llm.generate(PROMPT, max_tokens=16, logit_bias=bias)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                          pad_token_id=0, sequence_bias={(t,): b for t, b in bias.items()})[0, len(PROMPT):]
    assert out.tokens == ref.tolist()
    assert not set(banned) & set(out.tokens) and out.tokens != llm.generate(PROMPT, max_tokens=16).tokens


def test_logprobs_are_the_raw_log_softmax_whatever_the_processors(models):
    """We chose OpenAI's definition: logprobs / top_logprobs are the log-softmax of the model's raw logits,
    before penalties, temperature and filters; the chosen token's entry is there even when it is not in the
    top n. Checked against transformers' full forward, to 1e-4 (an offset of 0.01 fails)."""
    hf, llm = models
    out = llm.generate(PROMPT, max_tokens=12, logprobs=5, temperature=1.3, top_k=40, min_p=0.02,
                       repetition_penalty=1.2, frequency_penalty=0.5, seed=3)
    ref = raw_logits(hf, PROMPT + out.tokens)[len(PROMPT) - 1:-1].log_softmax(-1)
    chosen = ref.gather(-1, torch.tensor(out.tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs, dtype=torch.double), chosen, atol=1e-4, rtol=0)
    assert len(out.top_logprobs) == len(out.tokens)
    for top, row in zip(out.top_logprobs, ref):
        values, indices = row.topk(5)
        assert list(top) == indices.tolist()
        torch.testing.assert_close(torch.tensor(list(top.values()), dtype=torch.double), values, atol=1e-4, rtol=0)


def test_logprobs_zero_gives_the_chosen_token_only(models):
    hf, llm = models
    out = llm.generate(PROMPT, max_tokens=4, logprobs=0)
    assert out.top_logprobs == [{}] * 4
    ref = raw_logits(hf, PROMPT + out.tokens)[len(PROMPT) - 1:-1].log_softmax(-1)
    torch.testing.assert_close(torch.tensor(out.logprobs, dtype=torch.double), ref.max(-1).values, atol=1e-4,
                               rtol=0)
    assert llm.generate(PROMPT, max_tokens=4).logprobs is None


def test_min_p_filters_every_sampled_token(models):
    """Each token drawn with min_p has a (temperature-scaled) probability >= min_p * the top one's; drawn
    without the filter, the same seeds pick tokens below that floor."""
    hf, llm = models
    temperature, min_p = 1.0, 0.5

    def below_floor(tokens):
        lp = (raw_logits(hf, PROMPT + tokens)[len(PROMPT) - 1:-1] / temperature).log_softmax(-1)
        chosen = lp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        return int((chosen < math.log(min_p) + lp.max(-1).values - 1e-6).sum())

    filtered = [llm.generate(PROMPT, max_tokens=16, temperature=temperature, min_p=min_p, seed=s).tokens
                for s in range(3)]
    unfiltered = [llm.generate(PROMPT, max_tokens=16, temperature=temperature, seed=s).tokens for s in range(3)]
    assert sum(below_floor(t) for t in filtered) == 0
    assert sum(below_floor(t) for t in unfiltered) > 10


# ---- parameters: the exact edges of each range ---------------------------------------------------------
@pytest.mark.parametrize("name, ok, bad", [
    ("max_tokens", [1, 10**6], [0, -1, 1.5, True, "3"]),
    ("temperature", [0, 0.0, 1e-4, 2, 100.0], [-1e-9, 1e-5, 100.5, 1e300, math.nan, math.inf, "0.7", None]),
    ("top_p", [1e-9, 0.5, 1.0], [0, 0.0, 1.0000001, -0.5, math.nan]),
    ("top_k", [0, 1, 10**9], [-1, 2.0, True]),
    ("min_p", [0, 0.0, 0.999], [1.0, -0.1, math.nan]),
    ("repetition_penalty", [0.01, 1, 100], [0, 0.0099, 100.5, -1, 1e300, math.inf]),
    ("presence_penalty", [-2, 0, 2.0], [-2.001, 2.001, math.nan]),
    ("frequency_penalty", [-2.0, 0, 2], [-2.001, 2.001, math.inf]),
    ("seed", [None, 0, 2**63 - 1, 2**64 - 1, -(2**63)], [2**64, -(2**63) - 1, 1.5, "1", True]),
    ("stop", [None, "x", ["a", "bc"]], [[""], [1], ""]),
    ("stop_token_ids", [None, [], [0, 5]], [[1.5], [-1], "5", [True]]),
    ("ignore_eos", [False, True], [None, 1, 0, "true"]),
    ("logit_bias", [None, {}, {0: -100, 5: 100, 7: 0.5}, {"12": -1}],
     [{-1: 1}, {1: 100.5}, {1: -101}, {1: math.nan}, {1.5: 1}, {True: 1}, {"x": 1}, {"-3": 1}, {1: "2"}, [1]]),
    ("logprobs", [None, 0, 20], [-1, 21, 1.0, True]),
    ("prefill_chunk", [None, 1, 4096], [0, -5, 2.5]),
])
def test_each_parameter_accepts_its_range_and_names_itself_outside(name, ok, bad):
    for value in ok:
        SamplingParams(**{name: value})
    for value in bad:
        with pytest.raises(VentouxError, match=f"invalid sampling parameter {name}="):
            SamplingParams(**{name: value})


def test_needs_history_only_with_a_penalty():
    assert not SamplingParams().needs_history
    assert SamplingParams(repetition_penalty=1.1).needs_history
    assert SamplingParams(presence_penalty=-0.1).needs_history
    assert SamplingParams(frequency_penalty=0.1).needs_history
    assert SamplingParams(stop="x").stop == ["x"]
