"""generate()/stream() behaviours that mutation testing (mutation/README.md) found unpinned: the prompt token
count, the decode callable actually used, which prompt an error names, and each prompt's LoRA adapter (checked
against the model-wide set_active path, which tests/test_lora.py pins to peft) ending with the call."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, hf_model, ventoux_from_hf

from ventoux.errors import VentouxError
from ventoux.generate import generate, stream
from ventoux.lora import LoraConfig, add_adapter, set_active, trainable_parameters
from ventoux.sampling import SamplingParams


@pytest.fixture
def model():
    return ventoux_from_hf(hf_model(TINY.replace(vocab_size=32000), seed=5))


def _greedy(n):
    return SamplingParams(max_tokens=n)


def test_prompt_tokens_and_the_decode_callable(model, v1_tokenizer):
    calls = []

    def decode(*args, **kw):
        calls.append(args[0].shape)
        return model(*args, **kw)

    prompts = [[5, 6, 7], [8, 9]]
    plain = generate(model, v1_tokenizer, prompts, [_greedy(4)] * 2)
    out = generate(model, v1_tokenizer, prompts, [_greedy(4)] * 2, decode=decode)
    assert [c.prompt_tokens for c in out] == [3, 2] and [c.tokens for c in out] == [c.tokens for c in plain]
    assert calls and all(s[1] == 1 for s in calls)  # the one-token decode steps went through `decode`


def test_errors_name_the_prompt(model, v1_tokenizer):
    with pytest.raises(VentouxError) as err:
        list(stream(model, v1_tokenizer, [], []))
    assert str(err.value) == "no prompt given: pass a string, a list of token ids, or a list of prompts"
    with pytest.raises(VentouxError, match="^prompt 1 has a token id outside the vocabulary"):
        generate(model, v1_tokenizer, [[5, 6], [5, 10**6]], [_greedy(2)] * 2)


def test_each_prompts_adapter_applies_to_its_row_and_ends_with_the_call(model, v1_tokenizer):
    add_adapter(model, LoraConfig(), name="a", activate=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.copy_(0.5 * torch.randn_like(p))
    prompts, params = [[5, 6, 7], [5, 6, 7]], [_greedy(6)] * 2
    base = generate(model, v1_tokenizer, prompts[:1], params[:1])[0].tokens
    set_active(model, "a")
    with_a = generate(model, v1_tokenizer, prompts[:1], params[:1])[0].tokens
    set_active(model, None)
    assert with_a != base  # the adapter changes the tokens
    rows = generate(model, v1_tokenizer, prompts, params, adapters=["a", None])
    assert [c.tokens for c in rows] == [with_a, base]
    with torch.no_grad():  # after the call, a forward applies the active adapters (none) again
        ids = torch.tensor([[5, 6, 7]])
        logits = model(ids)
        set_active(model, None)
        torch.testing.assert_close(logits, model(ids))
        assert [c.tokens for c in generate(model, v1_tokenizer, prompts[:1], params[:1])] == [base]
