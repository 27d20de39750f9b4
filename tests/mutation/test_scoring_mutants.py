"""eval/scoring.score, the loop behind perplexity, tasks and lm-eval, against transformers' Mistral scoring each
request alone: requests of mixed lengths in batches (sorted, padded on the right), the greedy flag both ways,
integer ids of any width, the batches the model sees, the progress bar, and the refusal whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_FULL, hf_model, ventoux_from_hf

from ventoux.eval.scoring import score


@pytest.fixture(scope="module")
def models():
    hf = hf_model(TINY_FULL, seed=11)
    return hf, ventoux_from_hf(hf)


def reference(hf, tokens, n):
    """transformers' log-probability of the last n tokens, and whether each is its argmax."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    with torch.no_grad():
        logprobs = hf(ids[None, :-1]).logits[0, -n:].float().log_softmax(-1)
    target = ids[-n:]
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


class Spy:
    """The model, recording the shape of every batch it is given."""

    def __init__(self, model):
        self.model, self.device, self.shapes = model, model.device, []

    def __call__(self, inputs):
        self.shapes.append(tuple(inputs.shape))
        return self.model(inputs)


def greedy_continuation(hf, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def test_scores_are_transformers_request_by_request(models):
    hf, model = models
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 17, 9, 30, 2, 12, 17, 8, 21]
    requests = [(torch.randint(0, TINY_FULL.vocab_size, (k,), generator=gen).tolist(), max(1, k // 3)) for k in lengths]
    greedy = greedy_continuation(hf, requests[0][0][:3], 4)
    requests += [(greedy, 4), (greedy, 1)]  # the argmax at every scored position
    requests.append((np.asarray(requests[1][0], dtype=np.int32), 3))  # ids as int32: gathered as int64 all the same
    spy = Spy(model)
    got = score(spy, requests)
    for (tokens, n), (logprob, is_greedy) in zip(requests, got):
        want, want_greedy = reference(hf, tokens, n)
        assert logprob == pytest.approx(want, abs=1e-4) and is_greedy == want_greedy
    flags = [g for _, g in got]
    assert flags[9] and flags[10] and not all(flags[:9])
    # longest first, 8 to a batch, each as wide as its longest input
    assert spy.shapes == [(8, 29), (4, 6)]
    spy.shapes.clear()
    again = score(spy, requests, batch_size=5)  # other batches, other padding: the same scores within rounding
    assert [g for _, g in again] == flags and [lp for lp, _ in again] == pytest.approx([lp for lp, _ in got], abs=1e-4)
    assert spy.shapes == [(5, 29), (5, 11), (2, 4)]


def test_no_scored_token_the_greedy_one_or_some(models):
    """is_greedy holds when every scored token is the argmax: not when none is, nor when only some are."""
    hf, model = models
    greedy = greedy_continuation(hf, [5, 6, 7], 3)
    wrong = [t + 1 for t in greedy[3:]]
    requests = [(greedy, 3), (greedy[:3] + wrong, 3), (greedy[:5] + wrong[2:], 3)]
    assert [g for _, g in score(model, requests)] == [True, False, False]


def test_the_progress_bar_shows_only_when_asked(models, capsys):
    _, model = models
    requests = [([1, 2, 3], 1)] * 3
    score(model, requests, batch_size=1)
    assert capsys.readouterr().err == ""
    score(model, requests, batch_size=1, progress=True)
    err = capsys.readouterr().err
    assert "scoring: 100%" in err and "3/3" in err and "batch/s" in err
    score(model, requests, progress=True, desc="hellaswag")
    assert "hellaswag: 100%" in capsys.readouterr().err


@pytest.mark.parametrize("n", [0, 4, 5])
def test_a_request_without_a_token_to_predict_it_is_refused_whole(models, n):
    _, model = models
    with pytest.raises(ValueError) as e:
        score(model, [([1, 2, 3], 1), ([1, 2, 3, 4], n)])
    assert str(e.value) == f"cannot score {n} of 4 tokens: the first token has nothing to predict it"
    assert score(model, [([1, 2, 3, 4], 3)])[0][0] < 0  # every token but the first can be scored
