"""HalfLinear's routing, pinned where mutation testing found it loose (mutation/README.md; which entry point
eager decode takes is test_fastlinear.py's): torch.compile takes the custom ops, the bias on the fallback, the
input's gradient through each kernel path, float16 and float32 activations, weights or inputs off the CPU, and
whether half_gemm replaces PyTorch's product for prefill on each CPU."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_ISAS
from torch import nn

from ventoux import cpu_kernels, fastlinear
from ventoux.fastlinear import HalfLinear

pytestmark = pytest.mark.skipif(not KERNEL_ISAS, reason="no kernel build on this machine")


def _linear(dtype=torch.bfloat16, bias=True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(128, 48, bias=bias).to(dtype).requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_torch_compile_the_custom_ops_give_the_eager_product(dtype):
    """fullgraph: a graph break (the unchecked entry point's ctypes call) would be an error."""
    fast = HalfLinear(_linear(dtype))
    compiled = torch.compile(fast, backend="eager", fullgraph=True)
    for rows in (1, 8):
        x = torch.randn(rows, 128).to(dtype)
        y = compiled(x)
        assert y.dtype == dtype and y.shape == (rows, 48)
        assert torch.equal(y, fast(x))
        torch.testing.assert_close(y.float(), F.linear(x.float(), fast.weight.float(), fast.bias.float()),
                                   rtol=0.02, atol=0.02)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("rows", [1, 8, 40])
def test_the_input_gets_its_gradient_through_every_kernel_path(monkeypatch, compiled, rows):
    """LoRA on a frozen 16-bit base: dx = dy @ W through gemv, gemm (40 rows) and the compiled custom op."""
    monkeypatch.setattr(fastlinear, "gemm_beats_pytorch", lambda: True)
    fast = HalfLinear(_linear())
    run = torch.compile(fast, backend="eager") if compiled else fast
    x = torch.randn(rows, 128).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn(rows, 48).to(torch.bfloat16)
    run(x).backward(dy)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), (dy.float() @ fast.weight.float()), rtol=0.02, atol=0.05)


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float16, torch.float16), (torch.float32, torch.bfloat16)])
def test_activations_keep_their_dtype_forward_and_backward(dtype, weight_dtype):
    """A float16 model, or float32 activations on a bf16 weight: the gemv computes in float32, the layer answers in
    x's dtype, and the input's gradient comes in it too (the weight is converted to dy's dtype for the backward)."""
    fast = HalfLinear(_linear(weight_dtype))
    x = torch.randn(2, 128).to(dtype).requires_grad_(True)
    y = fast(x)
    assert y.dtype == dtype
    expected = F.linear(x.detach().double(), fast.weight.double(), fast.bias.double())
    torch.testing.assert_close(y.detach().double(), expected, rtol=0.01, atol=0.01)
    y.backward(torch.ones_like(y))
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), fast.weight.double().sum(0).expand(2, -1), rtol=0.01, atol=0.01)


def test_a_trained_layer_takes_pytorchs_product_with_its_bias():
    linear = _linear().requires_grad_(True)
    fast = HalfLinear(linear)
    x = torch.randn(3, 128).to(torch.bfloat16)
    y = fast(x)
    assert torch.equal(y, F.linear(x, linear.weight, linear.bias))
    y.sum().backward()
    assert linear.weight.grad is not None and linear.bias.grad is not None


def test_a_weight_or_input_off_the_cpu_never_reaches_the_kernels(monkeypatch):
    """The meta device stands for a GPU: a kernel would read a host pointer that is not there."""
    def refuse(x, w):
        raise AssertionError("a kernel got a tensor off the CPU")

    fastlinear.kernel_works()
    for name in ("half_gemv", "half_gemv_unchecked", "half_gemm"):
        monkeypatch.setattr(cpu_kernels, name, refuse)
    monkeypatch.setattr(fastlinear, "gemm_beats_pytorch", lambda: True)
    x = torch.randn(2, 128).to(torch.bfloat16)
    for x_device, w_device in (("meta", "cpu"), ("cpu", "meta"), ("meta", "meta")):
        fast = HalfLinear(_linear().to(w_device))
        for rows in (2, 16):
            with contextlib.suppress(RuntimeError):  # F.linear's device error, or its answer
                fast(x.expand(rows // 2, 2, 128).to(x_device))


def test_half_gemm_replaces_pytorchs_product_where_onednn_lacks_fast_bf16(monkeypatch):
    """AMX, or AMD's vdpbf16ps, make oneDNN's bf16 product the faster; the AVX2 build (no AVX-512) never has them."""
    def beats(isa, flags, vendor="GenuineIntel"):
        monkeypatch.setattr(cpu_kernels, "isa", lambda: isa)
        monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(cpu_kernels, "cpu_vendor", lambda: vendor)
        fastlinear._gemm_beats_pytorch.cache_clear()
        return fastlinear.gemm_beats_pytorch()

    try:
        assert beats("avx512", {"avx512f"}) is True
        assert beats("avx512", {"avx512f", "amx_bf16"}) is False
        assert beats("avx512", {"avx512f", "avx512_bf16"}, "AuthenticAMD") is False
        assert beats("avx512", {"avx512f", "avx512_bf16"}) is True  # Intel's avx512_bf16 without AMX
        assert beats("avx2", {"avx2", "amx_bf16"}) is True
        assert beats(None, {"amx_bf16"}) is True
    finally:
        fastlinear._gemm_beats_pytorch.cache_clear()
