"""The model (model.py) where mutation testing (mutation/README.md) found it unpinned: which norm trains its gain (a
frozen-gain norm under a trainable one would leave the gain without a gradient), _SiluMul's gradients when only one
of its inputs needs one and over more rows than columns, the decode step's grouped-query attention call, and a
feed-forward whose gate alone trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, hf_model, ventoux_from_hf

from ventoux import model as model_module
from ventoux.cache import KVCache
from ventoux.model import FeedForward, RMSNorm, _SiluMul


def reference_norm(x, weight, eps):
    """RMSNorm's arithmetic in plain autograd ops: statistics in float32, rounded to x's dtype, times the gain."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gain_trains", [True, False])
def test_a_norm_gives_autograd_gradients_to_its_input_and_to_a_trainable_gain(dtype, gain_trains):
    gen = torch.Generator().manual_seed(1)
    norm = RMSNorm(48, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(48, generator=gen).to(dtype))
    norm.weight.requires_grad_(gain_trains)
    x0 = (3 * torch.randn(5, 48, generator=gen)).to(dtype)
    dy = torch.randn(5, 48, generator=gen).to(dtype)

    x = x0.clone().requires_grad_()
    norm(x).backward(dy)
    gain = norm.weight.detach().clone().requires_grad_(gain_trains)
    x_ref = x0.clone().requires_grad_()
    reference_norm(x_ref, gain, 1e-5).backward(dy)

    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(x.grad, x_ref.grad, **tolerance)
    if gain_trains:
        assert norm.weight.grad is not None
        torch.testing.assert_close(norm.weight.grad, gain.grad, **tolerance)
    else:
        assert norm.weight.grad is None


@pytest.mark.parametrize("needs", [(True, False), (False, True), (True, True)])
def test_silu_mul_gives_each_input_that_needs_one_autograd_gradient_over_more_rows_than_columns(monkeypatch, needs):
    """Rows 3 at a time (ROWS), 50 rows of 8: every block of rows gets its gradient, for a alone, b alone, or both."""
    monkeypatch.setattr(_SiluMul, "ROWS", 3 * 8)
    gen = torch.Generator().manual_seed(2)
    a0, b0, dy = (torch.randn(50, 8, generator=gen) for _ in range(3))
    a, b = a0.clone().requires_grad_(needs[0]), b0.clone().requires_grad_(needs[1])
    _SiluMul.apply(a, b).backward(dy.clone())
    a_ref, b_ref = a0.clone().requires_grad_(needs[0]), b0.clone().requires_grad_(needs[1])
    (F.silu(a_ref) * b_ref).backward(dy)
    for got, want, needed in ((a.grad, a_ref.grad, needs[0]), (b.grad, b_ref.grad, needs[1])):
        if needed:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        else:
            assert got is None


def test_a_feed_forward_whose_gate_alone_trains_keeps_silu_out_of_its_activations(monkeypatch):
    """LoRA on w1 only: a needs a gradient, b does not. The product still goes through _SiluMul (which keeps no
    silu(a)), with autograd's gradients."""
    torch.manual_seed(3)
    ffn = FeedForward(TINY)
    for p in ffn.parameters():
        p.requires_grad_(False)
    ffn.w1.weight.requires_grad_(True)
    calls = []
    apply = _SiluMul.apply
    monkeypatch.setattr(_SiluMul, "apply", lambda a, b: calls.append(1) or apply(a, b))
    x = torch.randn(2, 5, TINY.dim)
    ffn(x).square().sum().backward()
    assert calls == [1]
    got = ffn.w1.weight.grad.clone()
    ffn.w1.weight.grad = None
    (ffn.w2(F.silu(ffn.w1(x)) * ffn.w3(x))).square().sum().backward()
    torch.testing.assert_close(got, ffn.w1.weight.grad, atol=1e-5, rtol=1e-5)


def test_decode_steps_attend_through_attend_one_and_two_token_chunks_do_not(monkeypatch):
    """A one-token step over the cache is the grouped-query call (attend_one, which fastattention.py puts on a kernel);
    a two-token chunk is not one token a row. Both give transformers' logits."""
    hf = hf_model(TINY)
    vx = ventoux_from_hf(hf)
    calls = []
    attend_one = model_module.Attention.attend_one
    monkeypatch.setattr(model_module.Attention, "attend_one",
                        lambda self, q, k, v, mask: calls.append(q.shape) or attend_one(self, q, k, v, mask))
    tokens = torch.randint(0, TINY.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(tokens).logits[0]
        cache = KVCache(TINY, 1, capacity=4)
        out = [vx(tokens[:, p:p + 2], torch.arange(p, p + 2)[None], cache=cache)[0] for p in range(0, 10, 2)]
        assert calls == []
        out += [vx(tokens[:, p:p + 1], torch.tensor([[p]]), cache=cache)[0] for p in (10, 11)]
    g = TINY.n_heads // TINY.n_kv_heads
    assert calls == [(1, TINY.n_kv_heads, g, TINY.head_dim)] * (2 * TINY.n_layers)
    torch.testing.assert_close(torch.cat(out), ref, atol=1e-4, rtol=0)


def test_hidden_states_are_every_position_by_default():
    """hidden_states (the chunked training loss reads it) is every position's output unless asked for the last."""
    vx = ventoux_from_hf(hf_model(TINY))
    tokens = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hidden = vx.hidden_states(tokens)
        assert hidden.shape == (2, 9, TINY.dim)
        torch.testing.assert_close(vx.logits(hidden), vx(tokens), atol=0, rtol=0)
