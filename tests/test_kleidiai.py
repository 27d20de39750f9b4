"""Int4Linear's kleidiai kernel: PyTorch's _dyn_quant_pack_4bit_weight / _dyn_quant_matmul_4bit (Arm's KleidiAI
micro-kernels in aarch64 wheels; PyTorch's plain C++ reference elsewhere, which these tests run on x86).

The ops are symmetric int4 with int8 activations quantized per row; ventoux's zero points come in as a float32
product of group sums. Against the plain dequantize-and-matmul, within the int8 activations' error; codes read
back bit for bit; chosen only where KleidiAI is compiled in; gradients as the fallback's. Small shapes: the
reference ops are slow.
"""

from __future__ import annotations

import pytest
import torch
from test_quantize import BF16_EPS, _kernel_error, _ref_int4

from ventoux import cpu_kernels, kleidiai, qlinear
from ventoux.qlinear import Int4Linear, quantize_int4

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_dyn_quant_matmul_4bit"),
                                reason="PyTorch before 2.6 has no KleidiAI ops")


def _offset_weights(n=48, k=256, seed=0):
    """Rows of varied scale around a nonzero mean: every group's zero (the value of code 8) is far from 0, so
    the zero points' correction carries much of each output."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * (1 + torch.rand(n, 1, generator=gen))
    return w + 2 * torch.rand(n, 1, generator=gen)


def _rms_error(layer, x, y, ref):
    """The error's root mean square against that of uniform rounding over each row's int8 step, which is
    1 / sqrt(12) = 0.29 for a kernel doing what it should (a wrong layout or term: ~100)."""
    x64 = x.double()
    step = (x64.amax(-1, keepdim=True).clamp(min=0) - x64.amin(-1, keepdim=True).clamp(max=0)) / 255
    qweight, scales, zeros = layer.canonical()
    scale = step * _ref_int4(qweight, scales, torch.zeros_like(zeros)).pow(2).sum(-1).sqrt()
    return ((y - ref).pow(2).mean() / scale.pow(2).mean()).sqrt().item()


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kleidiai_agrees_with_the_fallback_within_int8_activations(group_size, rows, dtype):
    w = _offset_weights()
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    layer = Int4Linear.from_float(w, group_size, kernel="kleidiai")
    plain = Int4Linear.from_float(w, group_size, kernel="fallback")
    assert layer.kernel == "kleidiai"
    w_hat = _ref_int4(*plain.canonical())
    bound = _kernel_error(layer, x, w_hat)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (rows, 48)
    y64, ref = y.double(), x.double() @ w_hat.T
    if dtype == torch.bfloat16:  # the output rounded once to bfloat16
        bound = bound + BF16_EPS * ref.abs()
    assert ((y64 - ref).abs() <= bound).all()
    assert ((y64 - plain(x.float()).double()).abs() <= bound + 1e-5 * ref.abs()).all()
    # the worst case bound is ~10x the typical error: on average, the error is that of rounding to int8 steps
    assert _rms_error(layer, x, y64, ref) < 0.5
    # the symmetric product alone (no zero points' term) is far off: the test can fail
    symmetric = torch.ops.aten._dyn_quant_matmul_4bit(x.float(), layer.packed, group_size, 256, 48).double()
    assert _rms_error(layer, x, symmetric, ref) > 20 and ((symmetric - ref).abs() > bound).any()


def test_kleidiai_keeps_only_the_packed_weight_and_reads_its_codes_back_bit_for_bit():
    n, k, g = 32, 256, 32
    w = _offset_weights(n, k, seed=2)
    qweight, scales, zeros = quantize_int4(w, g)
    gen = torch.Generator().manual_seed(3)
    # groups the product cannot read (a zero scale, a scale far below float32's exact range) with codes other
    # than 8: quantize_int4 never makes those, a checkpoint from elsewhere may; kept aside, read back too
    scales[3, 2], scales[7, 0], scales[20, 7] = 0, 0, 2.0**-120
    qweight[3, 32:48] = torch.randint(0, 256, (16,), generator=gen, dtype=torch.uint8)
    qweight[20, 112:128] = torch.randint(0, 256, (16,), generator=gen, dtype=torch.uint8)
    layer = Int4Linear(qweight, scales, zeros, kernel="kleidiai")
    assert set(dict(layer.named_buffers())) == {"packed", "scales", "zeros", "unread"}
    assert layer.unread.shape == (3, g // 2)  # the three unreadable groups only
    for a, b in zip(layer.canonical(), (qweight, scales, zeros)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    plain = Int4Linear(qweight, scales, zeros, kernel="fallback")
    for (name, a), b in zip(layer.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(2, k, generator=gen)
    bound = _kernel_error(layer, x, _ref_int4(*plain.canonical()))
    assert ((layer(x).double() - plain(x).double()).abs() <= bound).all()
    # the read-back checks itself: scales other than the packed buffer's do not give integers
    layer.scales = layer.scales * 1.37
    with pytest.raises(RuntimeError, match="did not read back"):
        layer.canonical()


def test_kleidiai_layer_reloads_and_pads_odd_widths():
    w = _offset_weights(48, 200, seed=4)  # 200 inputs stored as 256: the last group (g = 32) all zero columns
    layer = Int4Linear.from_float(w, 32, kernel="kleidiai")
    assert (layer.in_features, layer.stored_in) == (200, 256) and layer.unread.shape == (48, 16)
    plain = Int4Linear.from_float(w, 32, kernel="fallback")
    twin = Int4Linear.from_float(torch.zeros_like(w), 32, kernel="kleidiai")
    twin.load_state_dict(plain.state_dict())
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(5))
    assert torch.equal(twin(x), layer(x))
    w_hat = _ref_int4(*plain.canonical())[:, :200]
    assert ((layer(x).double() - x.double() @ w_hat.T).abs() <= _kernel_error(layer, x, w_hat)).all()


@pytest.mark.parametrize("native", [True, False])
def test_kleidiai_is_chosen_only_where_pytorch_runs_kleidiai(monkeypatch, native):
    monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, "none")  # as on Arm: no vnni build
    monkeypatch.setattr(torch.backends.kleidiai, "is_available", lambda: native)
    monkeypatch.setattr(kleidiai, "packs", lambda: True)  # this CPU takes KleidiAI's packing
    w = _offset_weights(32, 128)
    expected = "kleidiai" if native else "int4pack"
    assert Int4Linear.kernels("cpu")[0] == expected
    assert Int4Linear.from_float(w, 32).kernel == expected
    assert Int4Linear.from_float(w, 128).kernel == "int4pack"  # one group a row: KleidiAI's channelwise kernel
    assert Int4Linear.from_float(w, 32, kernel="kleidiai").kernel == "kleidiai"  # asked for: runs anywhere
    # compiled in, but the CPU lacks the dot-product instructions (PyTorch packs for its reference): not chosen
    monkeypatch.setattr(kleidiai, "packs", lambda: False)
    assert Int4Linear.from_float(w, 32).kernel == "int4pack" and "kleidiai" not in Int4Linear.kernels("cpu")


def test_kleidiai_probe_of_the_packing_reports_pytorchs_reference_here():
    # x86 wheels (and builds without KleidiAI) pack into PyTorch's reference layout: float32 values
    if torch.backends.kleidiai.is_available():
        pytest.skip("KleidiAI is compiled in here")
    assert not kleidiai.packs() and not kleidiai.native()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_through_a_frozen_kleidiai_layer_equal_the_fallbacks(dtype):
    w = _offset_weights(48, 256, seed=6) / 8
    layer = Int4Linear.from_float(w, 64, kernel="kleidiai")
    plain = Int4Linear.from_float(w, 64, kernel="fallback")
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 256, generator=gen).to(dtype)
    dy = torch.randn(4, 48, generator=gen).to(dtype)
    grads = []
    for m in (layer, plain):
        xg = x.clone().requires_grad_()
        m(xg).backward(dy)
        grads.append(xg.grad)
    assert grads[0].dtype == dtype and torch.equal(grads[0], grads[1])  # the same dequantized weight, in slices
    w_hat = _ref_int4(*plain.canonical())
    tol = 2**-7 if dtype == torch.bfloat16 else 1e-6  # dx rounded once to the activations' dtype
    assert ((grads[0].double() - dy.double() @ w_hat).abs() <= tol * (dy.double().abs() @ w_hat.abs()) + 1e-6).all()


def test_kernel_check_refuses_kleidiai_where_its_codes_do_not_read_back(monkeypatch):
    check = qlinear._kernel_check.__wrapped__  # uncached
    assert check(Int4Linear, "kleidiai", "cpu", None)
    assert not check(Int4Linear, "kleidiai", "meta", None)
    monkeypatch.setattr(kleidiai, "unpack", lambda packed, scales, unread, *rest: torch.zeros_like(unread[:0]))
    assert not check(Int4Linear, "kleidiai", "cpu", None)  # a read-back that differs: never chosen nor allowed
    monkeypatch.setattr(kleidiai, "unpack", lambda *args: (_ for _ in ()).throw(RuntimeError("inexact")))
    assert not check(Int4Linear, "kleidiai", "cpu", None)
