"""A decode step's residual add and RMS norm on the CPU kernel (cpu_kernels.add_rms_norm, fastnorm.KernelRMSNorm)
against RMSNorm, which tests/test_model.py pins bit for bit to transformers' MistralRMSNorm, under every kernel build
this CPU runs."""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_ISAS, TINY, hf_model, ventoux_from_hf

from ventoux import cpu_kernels, fastnorm
from ventoux.api import load_model
from ventoux.cache import KVCache
from ventoux.fastblock import KernelBlock
from ventoux.fastnorm import KernelRMSNorm
from ventoux.model import Block, RMSNorm, swap_class
from ventoux.weights import save_hf

add_rms_norm = cpu_kernels.add_rms_norm  # the kernel itself, before a test wraps it
unchecked = cpu_kernels.add_rms_norm_unchecked


def norm_of(dim, dtype, seed=0):
    norm = RMSNorm(dim, 1e-5).to(dtype)
    norm.weight.data.copy_(1 + torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 64), (2, 5, 48)])
def test_add_rms_norm_is_the_residual_add_then_rmsnorm(kernel_isa, dtype, shape):
    gen = torch.Generator().manual_seed(shape[-1])
    x, residual = (4 * torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    norm = norm_of(shape[-1], dtype)
    h, n = add_rms_norm(x, norm.weight.data, norm.eps, residual)
    assert torch.equal(h, x + residual)  # one rounding of the float sum, as PyTorch's add
    expected = norm(x + residual)
    assert n.shape == expected.shape and n.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(n, expected, rtol=1e-6, atol=1e-6)
    else:  # a sum of squares in another order can move a rounding by one bf16 step, rarely
        torch.testing.assert_close(n.float(), expected.float(), rtol=2**-7, atol=1e-6)
        assert (n != expected).float().mean() < 0.01
    torch.testing.assert_close(add_rms_norm(x, norm.weight.data, norm.eps).float(), norm(x).float(),
                               rtol=2**-7, atol=1e-6)  # no residual: the norm alone
    # the weight and eps are used: another weight's or eps's norm is far from it
    assert not torch.allclose(add_rms_norm(x, -norm.weight.data, norm.eps).float(), norm(x).float(), atol=0.1)
    assert not torch.allclose(add_rms_norm(x[..., :16] / 1e3, norm.weight.data[:16], 1.0).float(),
                              add_rms_norm(x[..., :16] / 1e3, norm.weight.data[:16], 1e-5).float(), atol=1e-3)


def test_add_rms_norm_rejects_what_it_cannot_take():
    x, w = torch.randn(2, 32), torch.ones(32)
    with pytest.raises(ValueError, match="one dtype"):
        add_rms_norm(x, w.bfloat16(), 1e-5)
    with pytest.raises(ValueError, match="one dtype"):
        add_rms_norm(x.half(), w.half(), 1e-5)
    with pytest.raises(ValueError, match="D % 16"):
        add_rms_norm(x[:, :24], w[:24], 1e-5)
    with pytest.raises(ValueError, match="D % 16"):
        add_rms_norm(x, w, 1e-5, torch.randn(1, 32))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "windowed"
    save_hf(ventoux_from_hf(hf_model(TINY)), folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_models_decode_on_the_kernel_as_on_pytorchs_norms(kernel_isa, tiny_dir, dtype, monkeypatch):
    """Loading swaps in the kernel; decode steps give the logits PyTorch's norms give, with every norm of every
    step on the kernel (a block's two and the final one), and the prefill on PyTorch's ops."""
    model = swap_class(load_model(tiny_dir, TINY, dtype, "cpu"), KernelBlock, Block)  # blocks on the module path
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * TINY.n_layers + 1 and all(type(m) is KernelRMSNorm for m in norms)
    calls = []
    monkeypatch.setattr(cpu_kernels, "add_rms_norm_unchecked", lambda *a: calls.append(len(a)) or unchecked(*a))
    tokens = torch.randint(0, TINY.vocab_size, (2, 60), generator=torch.Generator().manual_seed(5))
    logits, kernel_calls = {}, {}
    for cls in (KernelRMSNorm, RMSNorm):
        for m in norms:
            m.__class__ = cls
        calls.clear()
        cache = KVCache(TINY, 2, dtype=dtype, capacity=16)
        steps = []
        with torch.inference_mode():
            model(tokens[:, :40], torch.arange(40).expand(2, 40), cache=cache)  # 80 rows: PyTorch's ops
            assert not calls
            for t in range(40, 60):  # row 1 runs 2 positions ahead of row 0
                steps.append(model(tokens[:, t:t + 1], torch.tensor([[t], [t + 2]]), cache=cache))
        logits[cls], kernel_calls[cls] = torch.cat(steps, 1), list(calls)
    # per step: each block's attention norm (x alone) and its residual add with the feed-forward's norm, the final
    assert kernel_calls == {KernelRMSNorm: 20 * ([3, 4] * TINY.n_layers + [3]), RMSNorm: []}
    tol = 1e-5 if dtype == torch.float32 else 0.03
    torch.testing.assert_close(logits[KernelRMSNorm], logits[RMSNorm], rtol=tol, atol=tol)


def test_without_kernels_the_model_keeps_pytorchs_norms(tiny_dir, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, "none")
    model = load_model(tiny_dir, TINY, torch.float32, "cpu")
    assert all(type(m) is RMSNorm for m in model.modules() if isinstance(m, RMSNorm))
    assert bool(KERNEL_ISAS) or cpu_kernels.library() is None


@pytest.fixture
def kernel_norm(kernel_isa, monkeypatch):
    """A KernelRMSNorm of 64, and the list of its calls to the kernel (after its one-time check)."""
    assert fastnorm.kernel_works()
    calls = []
    monkeypatch.setattr(cpu_kernels, "add_rms_norm_unchecked", lambda *a: calls.append(a) or unchecked(*a))
    module = norm_of(64, torch.bfloat16)
    module.weight.requires_grad_(False)  # as loaded for inference: a weight that trains takes PyTorch's ops
    module.__class__ = KernelRMSNorm
    return module, calls


def test_up_to_max_rows_the_norm_runs_on_the_kernel(kernel_norm):
    """The control for the cases below: MAX_ROWS rows of bf16 with a residual of the same shape and dtype."""
    module, calls = kernel_norm
    x = torch.randn(fastnorm.MAX_ROWS, 64, dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    h, n = module.add_and_norm(x, residual)
    assert len(calls) == 1 and calls[0][3] is residual and torch.equal(h, x + residual)
    torch.testing.assert_close(n.float(), RMSNorm.forward(module, h).float(), rtol=2**-7, atol=1e-6)
    module(x)
    assert len(calls) == 2 and len(calls[1]) == 3


@pytest.mark.parametrize("case", ["float16", "mixed dtypes", "D % 16", "many rows", "shapes differ", "not contiguous",
                                  "no kernel"])
def test_the_norm_is_pytorchs_where_the_kernel_does_not_apply(kernel_norm, monkeypatch, case):
    module, calls = kernel_norm
    rows = fastnorm.MAX_ROWS + 1 if case == "many rows" else fastnorm.MAX_ROWS
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    if case == "float16":
        module.half()
        x, residual = x.half(), residual.half()
    elif case == "mixed dtypes":
        residual = residual.float()
    elif case == "D % 16":
        module.weight.data = module.weight.data[:56]
        x, residual = x[:, :56], residual[:, :56]
    elif case == "shapes differ":
        residual = residual[:1]
    elif case == "not contiguous":  # every other column of a wider row
        x = torch.randn(rows, 128, dtype=torch.bfloat16)[:, ::2]
    elif case == "no kernel":
        monkeypatch.setattr("ventoux.fastnorm.kernel_works", lambda: False)
    h, n = module.add_and_norm(x, residual)
    assert not [c for c in calls if len(c) == 4]  # the add never on the kernel (a broadcast sum's norm may be)
    assert calls == [] or case in ("shapes differ", "not contiguous")
    torch.testing.assert_close(n.float(), RMSNorm.forward(module, x + residual).float(), rtol=2**-7, atol=1e-6)
    assert torch.equal(h, x + residual)
    if case not in ("mixed dtypes", "shapes differ"):  # the norm alone
        before = len(calls)
        assert torch.equal(module(x), RMSNorm.forward(module, x)) and len(calls) == before
    if case == "float16":
        assert n.dtype == torch.float16


def test_gradients_flow_through_pytorchs_norm_and_inference_takes_the_kernel(kernel_norm):
    module, calls = kernel_norm
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    x.requires_grad_(True)
    module(x).float().sum().backward()  # autograd on, x needs a gradient: PyTorch's ops
    module.add_and_norm(x, x.detach())[1].float().sum().backward()
    assert not calls and x.grad is not None and x.grad.abs().sum() > 0
    module.weight.requires_grad_(True)
    module(x.detach())  # the weight trains (a full fine-tune): PyTorch's ops too
    module.add_and_norm(x.detach(), x.detach())
    assert not calls
    module.weight.requires_grad_(False)
    module.add_and_norm(x.detach(), x)  # the residual needs a gradient
    assert not calls
    with torch.no_grad():
        n = module(x)
        h, n2 = module.add_and_norm(x, x)
    assert len(calls) == 2 and torch.equal(h, x + x)
    torch.testing.assert_close(n.float(), RMSNorm.forward(module, x.detach()).float(), rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(n2.float(), RMSNorm.forward(module, h).float(), rtol=2**-7, atol=1e-6)
    assert len(module(x.detach()[:, None]).shape) == 3 and len(calls) == 3  # nothing needs a gradient: the kernel


def test_a_kernel_that_disagrees_with_rmsnorm_is_not_used(kernel_isa, tiny_dir, monkeypatch):
    """The one-time check (as the products have): a kernel that drops the residual is refused at load."""
    monkeypatch.setattr(cpu_kernels, "add_rms_norm_unchecked", lambda x, w, eps, residual=None: unchecked(x, w, eps)
                        if residual is None else (x + residual, unchecked(x, w, eps)))
    fastnorm.kernel_works.cache_clear()
    try:
        assert not fastnorm.kernel_works()
        model = load_model(tiny_dir, TINY, torch.float32, "cpu")
        assert all(type(m) is RMSNorm for m in model.modules() if isinstance(m, RMSNorm))
    finally:
        fastnorm.kernel_works.cache_clear()  # the next test checks the real kernel again
