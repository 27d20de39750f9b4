"""LoRA behaviours that mutation testing (mutation/README.md) found unpinned: the adapter's blocked product with
more tokens than inputs (its blocks go over rows, not columns), and its gradients when one factor is frozen
(each gradient made for its own input). The reference is autograd on the float32 expression."""

from __future__ import annotations

import pytest
import torch

from ventoux import lora


@pytest.mark.parametrize("frozen", ["A", "B", "x"])
def test_adapter_gradients_with_a_frozen_input_and_more_tokens_than_inputs(frozen, monkeypatch):
    monkeypatch.setattr(lora, "BLOCK", 64)  # blocks of 8 rows of 8 inputs, or of one column of 120 tokens
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 8, generator=gen), torch.randn(5, 3, generator=gen)
    adapter = lora.Adapter(a, b, scaling=1.5)
    x = torch.randn(4, 30, 8, generator=gen).requires_grad_(frozen != "x")  # 120 tokens of 8 inputs
    {"A": adapter.lora_A, "B": adapter.lora_B, "x": x}[frozen].requires_grad_(False)
    dy = torch.randn(4, 30, 5, generator=gen)
    y = adapter(x)
    y.backward(dy)
    x2, a2, b2 = (t.detach().clone().requires_grad_(t.requires_grad) for t in (x, adapter.lora_A, adapter.lora_B))
    expected = (x2 @ a2.T @ b2.T) * 1.5
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-5)
    expected.backward(dy)
    for got, want in ((x.grad, x2.grad), (adapter.lora_A.grad, a2.grad), (adapter.lora_B.grad, b2.grad)):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_low_rank_backward_makes_dx_in_the_input_dtype():
    """The adapter's input gradient is made in x's dtype (bf16), not in its float32 factors' dtype and cast
    by autograd afterwards: a float32 dx would be twice the memory at training's peak. Called directly, as
    autograd's cast would hide it."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=gen).to(torch.bfloat16)
    a, b = torch.randn(4, 32, generator=gen), torch.randn(16, 4, generator=gen)
    ctx = SimpleNamespace(saved_tensors=(x, x.float() @ a.T, a, b), scaling=2.0, needs_input_grad=(True, True, True))
    dx, da, db, _ = lora._LowRank.backward(ctx, torch.randn(6, 16, generator=gen).to(torch.bfloat16))
    assert dx.dtype == torch.bfloat16 and dx.shape == x.shape
    assert da.dtype == db.dtype == torch.float32
