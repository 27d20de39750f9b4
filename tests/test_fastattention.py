"""Decoding's attention kernel (cpu_kernels.attend_decode, fastattention.KernelAttention) against float64
attention and against F.scaled_dot_product_attention in a loaded model, under every kernel build this CPU runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_ISAS, TINY, TINY_FULL, hf_model, ventoux_from_hf

from ventoux import cpu_kernels, fastattention
from ventoux.api import load_model
from ventoux.cache import KVCache
from ventoux.fastattention import KernelAttention
from ventoux.model import Attention
from ventoux.weights import save_hf

attend = cpu_kernels.attend_decode  # the kernel itself, before a test wraps it


def reference(q, k, v, allowed):
    """float64 attention of q (B, H, G, D) over k, v (B, H, S, D) where allowed (B, S); zeros where none is."""
    scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5  # (B, H, G, S)
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    weights = torch.nan_to_num(scores.softmax(-1))  # a row with no slot: 0/0 -> 0
    return weights @ v.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,g,s,d", [(1, 8, 4, 257, 128), (3, 2, 1, 5, 16), (2, 1, 6, 40, 48), (1, 2, 16, 19, 64)])
def test_attend_decode_is_attention_over_the_allowed_slots(kernel_isa, dtype, b, h, g, s, d):
    gen = torch.Generator().manual_seed(s + d)
    q, k, v = (3 * torch.randn(b, h, n, d, generator=gen).to(dtype) for n in (g, s, s))
    allowed = torch.rand(b, s, generator=gen) > 0.4
    allowed[:, 0] = True
    if b > 1:
        allowed[-1] = False  # a row that may attend to nothing (an idle row's mask never is, but it is defined)
    out = cpu_kernels.attend_decode(q, k, v, allowed)
    assert out.shape == q.shape and out.dtype == dtype
    expected = reference(q, k, v, allowed)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    else:  # float32 sums, one rounding to bf16 (2^-9 relative)
        torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=1e-3)
    # the mask is honoured: another mask's attention is far from it
    assert not torch.allclose(cpu_kernels.attend_decode(q, k, v, allowed.roll(1, 1)).double(), expected, atol=0.05)


def test_attend_decode_rejects_what_it_cannot_take():
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 9, 16)
    with pytest.raises(ValueError, match="one dtype"):
        cpu_kernels.attend_decode(q, k.bfloat16(), k.bfloat16(), torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="D % 16"):
        cpu_kernels.attend_decode(q[..., :8], k[..., :8], k[..., :8], torch.ones(1, 9, dtype=torch.bool))


@pytest.fixture(scope="module", params=["windowed", "full"])
def tiny_dir(request, tmp_path_factory):
    cfg = TINY if request.param == "windowed" else TINY_FULL
    folder = tmp_path_factory.mktemp("tiny") / request.param
    save_hf(ventoux_from_hf(hf_model(cfg)), folder)
    return folder, cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_models_decode_on_the_kernel_as_on_pytorchs_attention(kernel_isa, tiny_dir, dtype, monkeypatch):
    """Loading swaps in the kernel; decode steps over a cache that wraps (the windowed model) give the logits that
    PyTorch's attention gives, for two rows at different positions."""
    folder, cfg = tiny_dir
    model = load_model(folder, cfg, dtype, "cpu")
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert attentions and all(type(m) is KernelAttention for m in attentions)
    calls = []
    monkeypatch.setattr(cpu_kernels, "attend_decode", lambda *a: calls.append(1) or attend(*a))
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    logits = {}
    for cls in (KernelAttention, Attention):
        for m in attentions:
            m.__class__ = cls
        cache = KVCache(cfg, 2, dtype=dtype, capacity=16)
        steps = []
        with torch.inference_mode():
            model(tokens[:, :3], torch.arange(3).expand(2, 3), cache=cache)
            for t in range(3, 20):  # row 1 runs 2 positions ahead of row 0
                positions = torch.tensor([[t], [t + 2]])
                steps.append(model(tokens[:, t:t + 1], positions, cache=cache))
        logits[cls] = torch.cat(steps, 1)
    assert len(calls) == 17 * cfg.n_layers  # every decode step of every layer ran on the kernel
    tol = 1e-5 if dtype == torch.float32 else 0.03
    torch.testing.assert_close(logits[KernelAttention], logits[Attention], rtol=tol, atol=tol)



def test_without_kernels_the_model_keeps_pytorchs_attention(tiny_dir, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, "none")
    folder, cfg = tiny_dir
    model = load_model(folder, cfg, torch.float32, "cpu")
    assert all(type(m) is Attention for m in model.modules() if isinstance(m, Attention))
    assert bool(KERNEL_ISAS) or cpu_kernels.library() is None


def step_inputs(dtype=torch.bfloat16, g=2, d=16, s=11, float_mask=False):
    gen = torch.Generator().manual_seed(g * d + s)
    q, k, v = (torch.randn(2, 3, n, d, generator=gen).to(dtype) for n in (g, s, s))
    mask = torch.rand(2, 1, 1, s, generator=gen) > 0.3
    mask[..., 0] = True
    if float_mask:  # an additive mask, as SDPA also takes
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    return q, k, v, mask


@pytest.fixture
def kernel_step(kernel_isa, monkeypatch):
    """A KernelAttention, and the list of its calls to the kernel (after its one-time check, which calls it too)."""
    assert fastattention.kernel_works()
    calls = []
    monkeypatch.setattr(cpu_kernels, "attend_decode", lambda *a: calls.append(a) or attend(*a))
    module = Attention(TINY)
    module.__class__ = KernelAttention
    return module, calls


@pytest.mark.parametrize("case", ["float16", "float mask", "D % 16", "G > 16", "no kernel"])
def test_the_step_is_pytorchs_where_the_kernel_does_not_apply(kernel_step, monkeypatch, case):
    module, calls = kernel_step
    q, k, v, mask = step_inputs(dtype=torch.float16 if case == "float16" else torch.bfloat16,
                                float_mask=case == "float mask", d=8 if case == "D % 16" else 16,
                                g=17 if case == "G > 16" else 2)
    if case == "no kernel":
        monkeypatch.setattr("ventoux.fastattention.kernel_works", lambda: False)
    out = module.attend_one(q, k, v, mask)
    assert not calls and torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_mixed_dtypes_never_reach_the_kernel(kernel_step):
    module, calls = kernel_step
    q, k, v, mask = step_inputs()
    with pytest.raises(RuntimeError):  # PyTorch's own error for q and k of two dtypes
        module.attend_one(q.float(), k, v, mask)
    assert not calls


def test_gradients_flow_through_pytorchs_attention_and_inference_takes_the_kernel(kernel_step):
    module, calls = kernel_step
    q, k, v, mask = step_inputs(dtype=torch.float32)
    q.requires_grad_(True)
    module.attend_one(q, k, v, mask).sum().backward()  # autograd on, q needs a gradient: PyTorch's attention
    assert not calls and q.grad is not None and q.grad.abs().sum() > 0
    with torch.no_grad():  # the same q without autograd, and a q needing none with it on: the kernel
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = module.attend_one(q, k, v, mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.attend_one(q.detach(), k, v, mask), expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
    assert calls[0][3].shape == (2, 11) and torch.equal(calls[0][3], mask[:, 0, 0])  # the (B, S) slots
    with torch.no_grad():
        module.attend_one(*step_inputs(g=cpu_kernels.ATTEND_MAX_G))  # as many query heads as the kernel takes
    assert len(calls) == 3


def test_a_kernel_that_disagrees_with_pytorch_is_not_used(kernel_isa, tiny_dir, monkeypatch):
    """The one-time check (as the products have): a kernel off by its last query head is refused at load."""
    folder, cfg = tiny_dir
    broken = lambda q, k, v, allowed: attend(q, k, v, allowed).index_fill(2, torch.tensor([q.shape[2] - 1]), 0.0)  # noqa: E731
    monkeypatch.setattr(cpu_kernels, "attend_decode", broken)
    fastattention.kernel_works.cache_clear()
    try:
        assert not fastattention.kernel_works()
        model = load_model(folder, cfg, torch.float32, "cpu")
        assert all(type(m) is Attention for m in model.modules() if isinstance(m, Attention))
    finally:
        fastattention.kernel_works.cache_clear()  # the next test checks the real kernel again
