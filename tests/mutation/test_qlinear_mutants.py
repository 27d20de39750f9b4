"""Quantized-linear behaviours that mutation testing (mutation/README.md) found unpinned: quantizing more rows
than one chunk, the dequantized weight the backward multiplies by (in slices, each kernel's layout), the kernels
listed per device, device and dtype moves, the alignment the raw-pointer kernels need. References are the
schemes written out here in float64 (w = q * scale; w = (q - 8) * scale + zero; int6: w = (q - 32) * scale + zero,
q's top two bits four to a byte) and plain matmuls."""

from __future__ import annotations

import pytest
import torch

from ventoux import cpu_kernels, qlinear
from ventoux.qlinear import Int4Linear, Int6Linear, Int8Linear, dequantize_int8

HAVE_KERNELS = cpu_kernels.library() is not None


def _w(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * (1 + torch.rand(n, 1, generator=gen))


def _ref_int8(qweight, scales):
    """(N, K) codes times their row's scale (scales (N,)) or their group's (scales (N, K/g))."""
    s = scales.double()
    s = s[:, None] if s.dim() == 1 else s.repeat_interleave(qweight.shape[1] // s.shape[1], 1)
    return qweight.double() * s


def _ref_int4(qweight, scales, zeros):
    """(N, K/2) bytes, even input in the low nibble -> (N, K) float64."""
    q = torch.stack([qweight & 0xF, qweight >> 4], -1).reshape(qweight.shape[0], -1).double()
    g = q.shape[1] // scales.shape[1]
    return (q - 8) * scales.double().repeat_interleave(g, 1) + zeros.double().repeat_interleave(g, 1)


def _ref_int6(qweight, qhigh, scales, zeros):
    """(N, K/2) low nibbles as int4's and (N, K/4) top bits, input 4j + p at bits 2p of byte j -> (N, K) float64."""
    n = qweight.shape[0]
    low = torch.stack([qweight & 0xF, qweight >> 4], -1).reshape(n, -1).double()
    top = torch.stack([(qhigh >> 2 * p) & 3 for p in range(4)], -1).reshape(n, -1).double()
    g = low.shape[1] // scales.shape[1]
    return (low + 16 * top - 32) * scales.double().repeat_interleave(g, 1) + zeros.double().repeat_interleave(g, 1)


def _quantize_int8_ref(w, group=None):
    """The int8 scheme written out: scale = max|w| / 127 rounded to bfloat16, q = round(w / scale)."""
    n, k = w.shape
    wg = w.double().reshape(n, k // (group or k), group or k)
    s = (wg.abs().amax(-1).float() / 127).to(torch.bfloat16)
    q = (wg / s.double().masked_fill(s == 0, 1)[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(n, k)
    return q, s if group else s[:, 0]


@pytest.mark.parametrize("group", [None, 32])
def test_int8_quantizes_every_row_of_a_tall_matrix(group):
    w = _w(2100, 128)  # three chunks of the row-wise quantizer (1024 rows each), the last one short
    w[5] = 0  # an all-zero row: scale 0, codes 0
    q, s = qlinear.quantize_int8(w, group)
    rq, rs = _quantize_int8_ref(w, group)
    assert q.shape == rq.shape and s.shape == rs.shape and q.dtype == torch.int8 and s.dtype == torch.bfloat16
    assert (q.int() - rq.int()).abs().max() <= 1  # float32 vs float64 division may round a tie the other way
    assert (q != rq).float().mean() < 1e-3 and torch.equal(s, rs) and not q[5].any()


def test_int4_quantizes_every_row_of_a_tall_matrix():
    w = _w(2100, 128, seed=1)
    packed, s, z = qlinear.quantize_int4(w, 32)
    assert packed.shape == (2100, 64) and s.shape == z.shape == (2100, 4)
    w_hat = _ref_int4(packed, s, z)
    step = s.double().repeat_interleave(32, 1)
    assert ((w_hat - w.double()).abs() <= 0.5 * step * 1.01 + 1e-6).all()  # every row, the last chunk's too


def test_int6_quantizes_every_row_of_a_tall_matrix():
    w = _w(2100, 128, seed=1)
    w[7, :64] = 0.5  # a group of equal weights: scale 0, every code 32
    q, h, s, z = qlinear.quantize_int6(w, 64)
    assert q.shape == (2100, 64) and h.shape == (2100, 32) and s.shape == z.shape == (2100, 2)
    assert q.dtype == h.dtype == torch.uint8 and s.dtype == z.dtype == torch.bfloat16
    w_hat = _ref_int6(q, h, s, z)
    step = s.double().repeat_interleave(64, 1)
    assert ((w_hat - w.double()).abs() <= 0.5 * step * 1.01 + 1e-6).all()  # every row, the last chunk's too
    assert s[7, 0] == 0 and torch.equal(w_hat[7, :64], w[7, :64].double())
    groups = w_hat.view(2100, 2, 64)  # 63 steps from the group's least to its largest weight
    torch.testing.assert_close(groups.amax(-1) - groups.amin(-1), 63 * s.double(), rtol=1e-9, atol=1e-9)
    assert torch.equal(qlinear.dequantize_int6(q, h, s, z).double(), w_hat.float().double())


def test_int6_codes_are_the_schemes_clamped_to_0_63():
    """The scheme written out: scale = (max - min) / 63 and zero = min + 32 scale, each rounded to bfloat16, q =
    round((w - zero) / scale + 32) clamped to 0..63. Groups far from 0 against their spread (a zero rounded to
    bfloat16 by more than a step) put the unclamped codes out of range."""
    w = _w(4, 128, seed=9)  # every group off zero: a bfloat16 step of 0.03-0.06 there, scales of about 0.005
    offsets = torch.tensor([10.0, -10.0, 9.0, -9.0, 11.0, -11.0, 6.0, -6.0]).view(4, 2, 1)
    w = (offsets + 0.05 * w.view(4, 2, 64)).view(4, 128)
    q, h, s, z = qlinear.quantize_int6(w, 64)
    codes = (torch.stack([q & 15, q >> 4], -1).reshape(4, -1) + 16 * torch.stack([(h >> 2 * p) & 3 for p in range(4)],
                                                                                   -1).reshape(4, -1)).long()
    wg = w.double().view(4, 2, 64)
    rs = ((wg.amax(-1) - wg.amin(-1)).float() / 63).to(torch.bfloat16)
    rz = (wg.amin(-1).float() + 32 * rs.float()).to(torch.bfloat16)
    raw = ((wg - rz.double()[..., None]) / rs.double()[..., None] + 32).round()
    assert raw.min() < 0 and raw.max() > 63  # the far groups do leave the range
    expected = raw.clamp(0, 63).long().view(4, 128)
    assert torch.equal(s, rs) and torch.equal(z, rz)
    assert (codes - expected).abs().max() <= 1 and (codes != expected).float().mean() < 0.01  # float32 ties


@pytest.mark.parametrize("quantize, args", [(qlinear.quantize_int8, (None,)), (qlinear.quantize_int8, (32,)),
                                           (qlinear.quantize_int4, (32,)), (qlinear.quantize_int6, (64,))])
def test_a_meta_matrix_quantizes_to_the_shapes_and_dtypes_of_a_real_one(quantize, args):
    """A quantized checkpoint's skeleton is quantized on the meta device (whole, not 1024 rows at a time)."""
    real = quantize(_w(2100, 128), *args)
    meta = quantize(torch.empty(2100, 128, device="meta"), *args)
    assert [(t.shape, t.dtype) for t in meta] == [(t.shape, t.dtype) for t in real]
    assert all(t.is_meta for t in meta)


def test_dequantize_int8_per_row_and_per_group():
    w = _w(16, 256)
    for group in (None, 64):
        q, s = qlinear.quantize_int8(w, group)
        torch.testing.assert_close(dequantize_int8(q, s).double(), _ref_int8(q, s), rtol=1e-6, atol=0)


# ---- the backward: the dequantized weight, in slices -------------------------------------------------
def _layers():
    w = _w(48, 384, seed=2)  # K = 3 x 128: three column slices at the smallest width
    out = []
    for cls, args, kernels in ((Int8Linear, {}, ("vnni", "int8pack", "fallback")),
                               (Int8Linear, {"group_size": 64}, ("vnni", "fallback")),
                               (Int4Linear, {"group_size": 32}, ("vnni", "int4pack", "fallback")),
                               (Int6Linear, {"group_size": 64}, ("vnni", "fallback"))):
        for kernel in kernels:
            if kernel in cls.kernels("cpu"):
                out.append(cls.from_float(w, kernel=kernel, **args))
    return w, out


def _dequantized(layer):
    canonical = [t.cpu() for t in layer.canonical()]
    return {Int8Linear: _ref_int8, Int4Linear: _ref_int4, Int6Linear: _ref_int6}[type(layer)](*canonical)


@pytest.mark.parametrize("budget,block", [(1 << 24, 1 << 18), (48 * 128, 256), (48 * 200, 1000), (48 * 256, 700),
                                          (1, 1)])
def test_weight_columns_are_the_dequantized_weight(budget, block):
    _, layers = _layers()
    assert {layer.kernel for layer in layers} >= {"fallback"}
    for layer in layers:
        ref = _dequantized(layer)
        seen = 0
        for start, cols in layer._weight_columns(torch.float32, budget, block):
            assert start == seen and cols.dtype == torch.float32
            torch.testing.assert_close(cols.double(), ref[:, start:start + cols.shape[1]], rtol=1e-6, atol=0,
                                       msg=f"{type(layer).__name__} {layer.kernel} columns from {start}")
            seen += cols.shape[1]
        assert seen == layer.stored_in


def test_backward_reaches_the_input_through_every_kernel():
    _, layers = _layers()
    x = torch.randn(3, 384, generator=torch.Generator().manual_seed(5))
    dy = torch.randn(3, 48, generator=torch.Generator().manual_seed(6))
    for layer in layers:
        xg = x.clone().requires_grad_()
        layer(xg).backward(dy)
        torch.testing.assert_close(xg.grad.double(), dy.double() @ _dequantized(layer), rtol=1e-5, atol=1e-5)
        xb = x.to(torch.bfloat16).requires_grad_()  # the slices come in dy's dtype, rounded once
        layer(xb).backward(dy.to(torch.bfloat16))
        assert xb.grad.dtype == torch.bfloat16
        dyb, w_hat = dy.to(torch.bfloat16).double(), _dequantized(layer)
        assert ((xb.grad.double() - dyb @ w_hat).abs() <= 2**-7 * (dyb.abs() @ w_hat.abs()) + 1e-6).all()


# ---- kernels per device, moves, alignment --------------------------------------------------------------
def test_kernels_listed_per_device(monkeypatch):
    for cls in (Int8Linear, Int4Linear, Int6Linear):
        assert cls.kernels("meta") == ["fallback"]  # the only product that runs on a skeleton
    for cls in (Int8Linear, Int4Linear, Int6Linear):
        assert cls.kernels("cpu")[-1] == "fallback"
        assert ("vnni" in cls.kernels("cpu")) == HAVE_KERNELS
    assert Int6Linear.kernels("cpu") == (["vnni"] if HAVE_KERNELS else []) + ["fallback"]
    monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, "none")  # no kernel build: vnni is not offered, nor picked
    for cls in (Int8Linear, Int4Linear, Int6Linear):
        kernels = cls.kernels("cpu")
        assert "vnni" not in kernels and kernels[-1] == "fallback"
        with pytest.raises(Exception) as e:
            cls.from_float(_w(32, 100), kernel="vnni")
        assert str(e.value) == f"kernel 'vnni' is not available for {cls.__name__} (32x100) on cpu; use kernel=None"
        layer = cls.from_float(_w(32, 128))
        assert layer.kernel == kernels[0]
        x = torch.randn(2, 128, generator=torch.Generator().manual_seed(9)).double()
        w_hat = _dequantized(layer)  # PyTorch's packed kernels: bfloat16 activations and outputs
        assert ((layer(x.float()).double() - x @ w_hat.T).abs() <= 2**-6 * (x.abs() @ w_hat.abs().T) + 1e-5).all()
    monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, "bogus")  # the variable concerns ventoux's kernels only
    if "int8pack" in kernels:
        assert Int8Linear.from_float(_w(32, 128), kernel="int8pack").kernel == "int8pack"
    assert Int8Linear.from_float(_w(32, 128), kernel="fallback").kernel == "fallback"


def test_unknown_kernel_and_width_that_does_not_fit_are_named():
    with pytest.raises(Exception) as e:
        Int8Linear.from_float(_w(32, 128), kernel="cublas")
    assert str(e.value) == "unknown kernel 'cublas' for Int8Linear; valid: ('vnni', 'int8pack', 'fallback')"
    with pytest.raises(Exception) as e:
        Int4Linear(torch.zeros(32, 128, dtype=torch.uint8), torch.ones(32, 8, dtype=torch.bfloat16),
                   torch.zeros(32, 8, dtype=torch.bfloat16), in_features=100)
    assert str(e.value) == "quantized weights 32x256 do not hold 100 inputs padded to a multiple of 128"


def test_raw_pointer_kernels_get_aligned_tensors_and_the_fallback_keeps_its_own():
    q, s = qlinear.quantize_int8(_w(64, 128))
    raw = torch.empty(64 * 128 + 1, dtype=torch.int8)[1:].view(64, 128)  # as a tensor inside a file can be
    raw.copy_(q)
    assert raw.data_ptr() % 64 != 0
    plain = Int8Linear(raw, s, kernel="fallback")
    assert plain.qweight.data_ptr() == raw.data_ptr()  # no copy
    if "int8pack" in Int8Linear.kernels("cpu"):
        packed = Int8Linear(raw, s, kernel="int8pack")
        assert packed.qweight.data_ptr() % 64 == 0 and torch.equal(packed.qweight, q)


@pytest.mark.parametrize("cls,args", [(Int8Linear, {}), (Int4Linear, {"group_size": 32}), (Int6Linear, {})])
def test_moves_to_meta_and_dtype_casts_on_meta(cls, args):
    layer = cls.from_float(_w(32, 128), **args)
    before = [t.clone() for t in layer.canonical()]
    layer.to(torch.bfloat16)  # a dtype cast changes nothing: the quantized tensors keep their dtypes
    assert all(torch.equal(a, b) for a, b in zip(before, layer.canonical()))
    layer.to("meta")
    assert layer.kernel == "fallback" and all(t.is_meta for t in layer._buffers.values())
    assert [(t.shape, t.dtype) for t in layer.canonical()] == [(t.shape, t.dtype) for t in before]
    layer.to(torch.float16)  # on the meta device, a skeleton stays there (no copy out of meta)
    assert all(t.is_meta for t in layer._buffers.values())


def test_aligned_copies_only_what_a_raw_pointer_kernel_cannot_read():
    base = torch.arange(64 * 65, dtype=torch.int8)
    aligned = base[:64 * 64].view(64, 64)
    assert aligned.data_ptr() % 64 == 0 and qlinear._aligned(aligned) is aligned  # no copy of a whole model
    for t in (base[1:64 * 64 + 1].view(64, 64), base[:64 * 64].view(64, 64).T):  # off by a byte; transposed
        a = qlinear._aligned(t)
        assert a.is_contiguous() and a.data_ptr() % 64 == 0 and torch.equal(a, t)


# ---- outputs in the input's dtype; state_dict loading ------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_kernel_answers_in_the_input_dtype(dtype):
    _, layers = _layers()
    x = torch.randn(2, 384, generator=torch.Generator().manual_seed(7)).to(dtype)
    for layer in layers:
        y = layer(x)
        assert y.dtype == dtype, (type(layer).__name__, layer.kernel, layer.group_size)
        w_hat = _dequantized(layer)
        x64 = x.double()
        assert ((y.double() - x64 @ w_hat.T).abs() <= 0.03 * (x64.abs() @ w_hat.abs().T) + 1e-3).all()


def test_int8pack_runs_in_bfloat16():
    """PyTorch's packed kernel takes bfloat16 activations and answers in bfloat16 (module docstring): its float32
    output holds bfloat16 values, where the fallback's does not."""
    if "int8pack" not in Int8Linear.kernels("cpu"):
        pytest.skip("no int8pack kernel in this PyTorch build")
    w = _w(48, 256, seed=3)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(8))
    packed, plain = Int8Linear.from_float(w, kernel="int8pack"), Int8Linear.from_float(w, kernel="fallback")
    y, ref = packed(x), plain(x)
    assert torch.equal(y, y.bfloat16().float()) and not torch.equal(ref, ref.bfloat16().float())
    assert ((y - ref).abs() <= 0.02 * ref.abs().max()).all()


@pytest.mark.parametrize("cls,args", [(Int8Linear, {}), (Int8Linear, {"group_size": 32}),
                                      (Int4Linear, {"group_size": 64}), (Int6Linear, {"group_size": 64})])
def test_load_state_dict_checks_each_tensor(cls, args):
    w = _w(32, 256, seed=4)
    src, dst = cls.from_float(w, kernel="fallback", **args), cls.from_float(_w(32, 256, seed=5), **args)
    sd = src.state_dict()
    # floating tensors may come in any float dtype (the loader casts them to the model's dtype)
    dst.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    assert [t.dtype for t in dst.canonical()] == [t.dtype for t in src.canonical()]  # cast back to the layout's
    assert all(torch.equal(a, b) for a, b in zip(dst.canonical(), src.canonical()))
    name = cls.__name__
    q = sd["qweight"]
    for bad, got in ((q[:16], f"{q.dtype} [16, {q.shape[1]}]"), (q.float(), f"torch.float32 {list(q.shape)}")):
        with pytest.raises(Exception) as e:
            dst.load_state_dict({**sd, "qweight": bad})
        assert str(e.value) == (f"tensor 'qweight' is {got} but this {name} expects {q.dtype} {list(q.shape)}; "
                                "the checkpoint's quantization config contradicts its tensors")
    with pytest.raises(RuntimeError, match="Missing key.*\"qweight\""):
        dst.load_state_dict({k: v for k, v in sd.items() if k != "qweight"})


def _int4_error(q_shape, s_shape, z_shape):
    return (f"int4 qweight {list(q_shape)}, scales {list(s_shape)} and zeros {list(z_shape)} do not match: "
            "expected (N, K/2), (N, K/group), (N, K/group)")


@pytest.mark.parametrize("q,s,z", [
    ((32, 64), (32,), (32,)),  # scales not per group
    ((32, 64), (33, 4), (33, 4)),  # another row count
    ((32, 64), (32, 4), (32, 2)),  # zeros unlike scales
    ((32, 64), (32, 3), (32, 3)),  # groups that do not divide K = 128
])
def test_int4_tensors_that_do_not_match_are_named(q, s, z):
    with pytest.raises(Exception) as e:
        Int4Linear(torch.zeros(q, dtype=torch.uint8), torch.ones(s, dtype=torch.bfloat16),
                   torch.zeros(z, dtype=torch.bfloat16))
    assert str(e.value) == _int4_error(q, s, z)


@pytest.mark.parametrize("q,h,s,z", [
    ((32, 64), (32, 32), (32,), (32,)),  # scales not per group
    ((32, 64), (32, 32), (33, 2), (33, 2)),  # another row count
    ((32, 64), (32, 32), (32, 2), (32, 1)),  # zeros unlike scales
    ((32, 64), (32, 32), (32, 3), (32, 3)),  # groups that do not divide K = 128
    ((32, 64), (32, 64), (32, 2), (32, 2)),  # top bits of 256 inputs
    ((32, 64), (31, 32), (32, 2), (32, 2)),  # top bits of another row count
])
def test_int6_tensors_that_do_not_match_are_named(q, h, s, z):
    with pytest.raises(Exception) as e:
        Int6Linear(torch.zeros(q, dtype=torch.uint8), torch.zeros(h, dtype=torch.uint8),
                   torch.ones(s, dtype=torch.bfloat16), torch.zeros(z, dtype=torch.bfloat16))
    assert str(e.value) == (f"int6 qweight {list(q)}, qhigh {list(h)}, scales {list(s)} and zeros {list(z)} do not "
                            "match: expected (N, K/2), (N, K/4), (N, K/group), (N, K/group)")
    layer = Int6Linear(torch.zeros(q, dtype=torch.uint8), torch.zeros(32, 32, dtype=torch.uint8),
                       torch.ones(32, 2, dtype=torch.bfloat16), torch.zeros(32, 2, dtype=torch.bfloat16))
    assert (layer.out_features, layer.in_features, layer.group_size) == (32, 128, 64)
    with pytest.raises(Exception) as e:
        Int6Linear.from_float(_w(32, 128), 48)
    assert str(e.value) == "int6 group size 48 must be one of (32, 64, 128)"


@pytest.mark.parametrize("q,s", [((32, 128), (31,)), ((32, 128), (32, 3)), ((32, 128), (32, 8)), ((32, 128), (31, 4)),
                                 ((32, 128), (32, 0)), ((4, 32, 128), (4,)), ((32, 128), (32, 1, 4))])
def test_int8_tensors_that_do_not_match_are_named(q, s):
    with pytest.raises(Exception) as e:
        Int8Linear(torch.zeros(q, dtype=torch.int8), torch.ones(s, dtype=torch.bfloat16))
    assert str(e.value) == (f"int8 qweight {list(q)} and scales {list(s)} do not match: expected (N, K) and (N,), "
                            f"or (N, K/group) with a group in (32, 64, 128)")
    for ok in ((32,), (32, 4), (32, 2), (32, 1)):  # per row; groups of 32, 64 and 128
        layer = Int8Linear(torch.zeros(32, 128, dtype=torch.int8), torch.ones(ok, dtype=torch.bfloat16))
        assert layer.out_features == 32 and layer.in_features == 128


@pytest.mark.skipif(not HAVE_KERNELS, reason="no kernel build on this machine")
@pytest.mark.parametrize("cls", [Int4Linear, Int6Linear])
def test_int4_vnni_under_torch_compile_gives_the_eager_product(cls):
    """Under torch.compile the vnni product takes its checked entry point (the eager path skips the checks)."""
    w = _w(48, 256, seed=6)
    layer = cls.from_float(w, group_size=32, kernel="vnni")
    compiled = torch.compile(layer, backend="eager")  # dynamo traces _mm; no inductor build
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 256, generator=torch.Generator().manual_seed(10)).to(dtype)
        y = compiled(x)
        assert y.dtype == dtype and torch.equal(y, layer(x))


def test_weight_columns_come_in_slices_of_about_budget_values():
    _, layers = _layers()
    n, k = 48, 384
    for budget, width in ((1 << 24, k), (n * 256, 256), (n * 300, 256), (n * 100, 128), (1, 128)):
        for layer in layers:  # the widest multiple of 128 inputs within the budget, at least 128, at most K
            widths = [cols.shape[1] for _, cols in layer._weight_columns(torch.float32, budget)]
            assert widths == [width] * (k // width) + ([k % width] if k % width else []), (budget, widths)


@pytest.mark.skipif(not HAVE_KERNELS, reason="no kernel build on this machine")
@pytest.mark.parametrize("group", [None, 32])
def test_int8_vnni_keeps_its_kernel_and_gives_the_schemes_product(group):
    """Built inside the test (mutmut attributes construction to the test that runs it): per row and per group of
    32, the vnni layer is the int8 scheme written out times x, within the activations' int8 rounding."""
    w, x = _w(48, 256, seed=7), torch.randn(3, 256, generator=torch.Generator().manual_seed(11))
    layer = Int8Linear.from_float(w, group_size=group, kernel="vnni")
    assert layer.kernel == "vnni" and layer.group_size == group
    q, s = _quantize_int8_ref(w, group)
    ref = x.double() @ _ref_int8(q, s).T
    assert ((layer(x).double() - ref).abs() <= 0.02 * ref.abs().max()).all()


@pytest.mark.skipif(not HAVE_KERNELS, reason="no kernel build on this machine")
@pytest.mark.parametrize("group", [None, 32])
def test_int8_vnni_under_torch_compile_gives_the_eager_product(group):
    """As int4's: under torch.compile the checked entry point, the same numbers and dtype as eager."""
    layer = Int8Linear.from_float(_w(48, 256, seed=8), group_size=group, kernel="vnni")
    compiled = torch.compile(layer, backend="eager")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 256, generator=torch.Generator().manual_seed(12)).to(dtype)
        y = compiled(x)
        assert y.dtype == dtype and torch.equal(y, layer(x))


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear, Int6Linear])
def test_a_meta_skeleton_takes_the_fallback_whatever_kernel_was_asked(cls):
    """quantize-then-load builds layers on the meta device first: no kernel can be checked or packed there."""
    w = torch.empty(32, 128, device="meta")
    layer = cls.from_float(w, kernel="vnni") if cls is Int8Linear else cls.from_float(w, 32, kernel="vnni")
    assert layer.kernel == "fallback" and layer.qweight.device.type == "meta"
