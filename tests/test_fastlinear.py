"""The 16-bit CPU kernels (cpu_kernels.half_gemv, half_gemm) and HalfLinear, against float64 products and nn.Linear,
under every kernel build this CPU runs (the kernel_isa fixture: AVX-512 and AVX2 on an AVX-512 machine)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_ISAS, TINY, hf_model, ventoux_from_hf
from torch import nn

from ventoux import cpu_kernels, fastlinear
from ventoux.api import load_model  # the pipeline: quantize, read, kernels
from ventoux.fastlinear import HalfLinear, use_cpu_kernels
from ventoux.weights import save_hf


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n", [(1, 4096, 37), (3, 96, 130), (8, 1024, 64)])
def test_half_gemv_is_the_float32_product_of_the_16bit_weights(kernel_isa, dtype, m, k, n):
    gen = torch.Generator().manual_seed(m + k + n)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen).to(dtype)
    expected = (x.double() @ w.double().T).float()  # the stored 16-bit values, exactly
    y = cpu_kernels.half_gemv(x, w)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * k**0.5)
    # a wrong conversion (bf16 read as fp16 or the reverse) or a dropped row/column is far outside that
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    assert not torch.allclose(cpu_kernels.half_gemv(x, w.view(other)), expected, rtol=0.01, atol=0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n", [(1, 64, 5), (16, 2048, 24), (37, 4096, 29), (300, 544, 100)])
def test_half_gemm_is_the_rounded_float_product(kernel_isa, dtype, m, k, n):
    # every tile shape: full and partial 16-row blocks and 12-output groups, one and several input blocks,
    # and (300 rows) two row chunks
    gen = torch.Generator().manual_seed(m + k + n)
    x, w = torch.randn(m, k, generator=gen).to(dtype), torch.randn(n, k, generator=gen).to(dtype)
    exact = x.double() @ w.double().T
    y = cpu_kernels.half_gemm(x, w)
    assert y.dtype == dtype and y.shape == (m, n)
    # float32 sums in another order than float64's, then one rounding to 16 bits (relative 2^-9 / 2^-12)
    torch.testing.assert_close(y.double(), exact, rtol=2**-8, atol=1e-5 * k)
    assert (y == F.linear(x, w)).float().mean() > 0.95  # PyTorch's product rounds the same sums the same way
    assert not torch.allclose(cpu_kernels.half_gemm(x, w.roll(1, dims=1)).double(), exact, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("gemm_first", [True, False])  # whether half_gemm beats PyTorch's bf16 product here
def test_half_linear_runs_the_kernels_by_row_count(kernel_isa, monkeypatch, gemm_first):
    monkeypatch.setattr(fastlinear, "gemm_beats_pytorch", lambda: gemm_first)
    torch.manual_seed(0)
    linear = nn.Linear(128, 48, bias=True).to(torch.bfloat16).requires_grad_(False)
    fast = HalfLinear(linear)
    assert fast.weight is linear.weight and list(fast.state_dict()) == ["weight", "bias"]
    fastlinear.kernel_works()  # its own check runs the kernels: before the counting starts
    calls = []
    gemv, gemm = cpu_kernels.half_gemv_unchecked, cpu_kernels.half_gemm  # decode: the layer checked its weight
    checked = cpu_kernels.half_gemv  # torch.compile's entry point only (test_fastlinear_mutants.py)
    monkeypatch.setattr(cpu_kernels, "half_gemv_unchecked", lambda x, w: calls.append(("gemv", len(x))) or gemv(x, w))
    monkeypatch.setattr(cpu_kernels, "half_gemm", lambda x, w: calls.append(("gemm", len(x))) or gemm(x, w))
    monkeypatch.setattr(cpu_kernels, "half_gemv", lambda x, w: calls.append(("checked", len(x))) or checked(x, w))
    for shape in [(1, 1, 128), (2, 3, 128), (2, 4, 128), (1, 40, 128)]:  # decode steps up to 8 rows, a prefill
        x = torch.randn(shape).to(torch.bfloat16)
        expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())
        torch.testing.assert_close(fast(x).float(), expected, rtol=0.02, atol=0.02)
    assert calls == [("gemv", 1), ("gemv", 6), ("gemv", 8), *([("gemm", 40)] if gemm_first else [])]  # else F.linear


def test_training_keeps_autograd(kernel_isa):
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    fast = HalfLinear(linear)
    fast(torch.randn(1, 64).to(torch.bfloat16)).sum().backward()
    assert linear.weight.grad is not None


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model = ventoux_from_hf(hf_model(TINY))
    folder = tmp_path_factory.mktemp("tiny") / "bf16"
    save_hf(model, folder, dtype=torch.bfloat16)
    return folder


def test_loading_in_bfloat16_on_cpu_swaps_linears_and_keeps_logits(kernel_isa, tiny_dir):
    fast = load_model(tiny_dir, TINY, torch.bfloat16, "cpu")
    swapped = [n for n, m in fast.named_modules() if isinstance(m, HalfLinear)]
    assert len(swapped) == 7 * TINY.n_layers + 1  # every block linear and the output head
    plain = load_model(tiny_dir, TINY, torch.bfloat16, "cpu")
    for name in swapped:  # undo the swap: the same weights through F.linear
        parent, _, child = name.rpartition(".")
        m = plain.get_submodule(name)
        linear = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
        linear.weight = m.weight
        setattr(plain.get_submodule(parent), child, linear)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    tokens = torch.randint(0, TINY.vocab_size, (1, 12))
    with torch.inference_mode():
        for t in range(1, 12):  # one token at a time: the decode path
            a, b = fast(tokens[:, :t], last_only=True), plain(tokens[:, :t], last_only=True)
            torch.testing.assert_close(a, b, rtol=0.03, atol=0.03 * b.abs().max().item())
        a, b = fast(tokens), plain(tokens)  # 12 rows at once: the prefill path (half_gemm)
        torch.testing.assert_close(a, b, rtol=0.03, atol=0.03 * b.abs().max().item())


def test_float32_and_unsupported_widths_stay_plain():
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(40, 8).to(torch.bfloat16), nn.Linear(64, 8).to(torch.bfloat16))
    use_cpu_kernels(model)
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear  # float32; 40 inputs: not a multiple of 32
    assert isinstance(model[2], HalfLinear) == bool(KERNEL_ISAS)  # where the kernels build, they are used
