"""Quantized linears against float references, the model swap, and the quantized checkpoint format.

The references are written here from the scheme's definition (w = q * s; w = (q - 8) * s + z, even input index
in the low nibble; int6: w = (q - 32) * s + z, q's low 4 bits as int4's, its top 2 bits four to a byte, the first
input lowest), independently of ventoux.qlinear's own dequantize functions.
"""

from __future__ import annotations

import copy
import json
import weakref

import pytest
import torch
from conftest import KERNEL_ISAS, TINY
from safetensors import safe_open
from torch import nn

from ventoux import cpu_kernels
from ventoux.api import load_model  # the pipeline: quantize, read, kernels
from ventoux.config import ModelConfig
from ventoux.errors import VentouxError
from ventoux.fastlinear import HalfLinear
from ventoux.model import Transformer
from ventoux.qlinear import Int4Linear, Int6Linear, Int8Embedding, Int8Linear, QuantizedLinear, dequantize_int8
from ventoux.quantize import (
    Scheme,
    load_quantized,
    parse_quantize,
    parse_scheme,
    quantize_model,
    quantizer,
    read_quantization,
    save_quantized,
)
from ventoux.weights import save_hf

# Dimensions every kernel takes (K % 128, N % 16); the vocabulary (211 rows) is one PyTorch's int4 packers
# refuse, so a quantized output head exercises the automatic choice of another kernel.
CFG = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=211, head_dim=32,
                  sliding_window=8, max_seq_len=64)
BF16_EPS = 2.0**-8  # bfloat16 rounding, relative (packed kernels take bfloat16 activations)


def _weights(n=64, k=256, seed=0, rows=(2, 3)):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * (1 + torch.rand(n, 1, generator=gen))  # rows of varied scale
    x = torch.randn(*rows, k, generator=gen)
    return w, x


def _ref_int8(qweight, scales):
    """(N, K) codes times their row's scale (scales (N,)) or their group's (scales (N, K/g), g consecutive inputs)."""
    s = scales.to(torch.float64)
    s = s[:, None] if s.dim() == 1 else s.repeat_interleave(qweight.shape[1] // s.shape[1], 1)
    return qweight.to(torch.float64) * s


def _ref_int4(qweight, scales, zeros):
    """(N, K/2) bytes -> (N, K) float64; even k in the low nibble."""
    n = qweight.shape[0]
    q = torch.stack([qweight & 0xF, qweight >> 4], -1).reshape(n, -1).to(torch.float64)
    g = q.shape[1] // scales.shape[1]
    s = scales.to(torch.float64).repeat_interleave(g, 1)
    z = zeros.to(torch.float64).repeat_interleave(g, 1)
    return (q - 8) * s + z


def _ref_int6(qweight, qhigh, scales, zeros):
    """(N, K/2) low-nibble bytes and (N, K/4) top-bit bytes -> (N, K) float64; input 4j + p at bits 2p of top byte j."""
    n = qweight.shape[0]
    low = torch.stack([qweight & 0xF, qweight >> 4], -1).reshape(n, -1)
    top = torch.stack([(qhigh >> (2 * p)) & 3 for p in range(4)], -1).reshape(n, -1)
    q = (low + 16 * top).to(torch.float64)
    g = q.shape[1] // scales.shape[1]
    return (q - 32) * scales.to(torch.float64).repeat_interleave(g, 1) + zeros.to(torch.float64).repeat_interleave(g, 1)


def _kernel_error(layer: QuantizedLinear, x, w_hat):
    """A bound on what the kernel's own roundings add to x @ w_hat^T: bfloat16 activations and output for
    PyTorch's packed kernels; for ventoux's vnni kernel, activations rounded to int8 steps of max|x| / 127 per
    block of 32 inputs (half a step each at most); for kleidiai, int8 steps per row (Arm builds choose it)."""
    x64 = x.to(torch.float64)
    mag = x64.abs() @ w_hat.abs().T
    if layer.kernel == "kleidiai":  # int8 activations per row over [min(0, x), max(0, x)] in 255 steps, a step
        # at most each (the zero point's rounding, the clamp), times the symmetric part; the zeros' term is exact
        qweight, scales, zeros = layer.canonical()
        w_sym = _ref_int4(qweight, scales, torch.zeros_like(zeros))
        step = (x64.amax(-1, keepdim=True).clamp(min=0) - x64.amin(-1, keepdim=True).clamp(max=0)) / 255
        return step * w_sym.abs().sum(-1) + 1e-5 * mag + 1e-5
    if layer.kernel != "vnni":
        return 2 * BF16_EPS * mag + 1e-5
    k = x.shape[-1]
    blocks = torch.nn.functional.pad(x64, (0, -k % 32)).unflatten(-1, (-1, 32))  # (..., K/32, 32), zero-padded
    half_step = (blocks.abs().amax(-1, keepdim=True) / 254).expand_as(blocks).flatten(-2)[..., :k]
    return half_step @ w_hat.abs().T * (1 + 1e-3) + 1e-5 * mag + 1e-5


def _check_linear(layer: QuantizedLinear, w, x, w_hat, step):
    """The layer computes x @ w_hat^T (to its kernel's precision), and w_hat is within half a step of w."""
    w64, x64 = w.to(torch.float64), x.to(torch.float64)
    err = (w_hat - w64).abs()
    assert (err <= 0.5 * step * (1 + 1e-2) + 1e-6).all(), f"max weight error {(err / step).max():.3f} steps"
    y = layer(x).to(torch.float64)
    assert y.shape == (*x.shape[:-1], w.shape[0])
    bound = _kernel_error(layer, x, w_hat)
    assert ((y - x64 @ w_hat.T).abs() <= bound).all()
    # against the float weights: the weight error bound carried through the sum
    assert ((y - x64 @ w64.T).abs() <= x64.abs() @ (0.5 * step * (1 + 1e-2)).T + bound).all()


def _cases(cls) -> list[tuple[str, str | None]]:
    """(kernel, kernel build) pairs: ours under every build this machine must run (a failing one fails its
    tests instead of dropping out), PyTorch's kernels where they run here, and the fallback."""
    ours = [("vnni", isa) for isa in KERNEL_ISAS]
    return ours + [(k, None) for k in cls.KERNELS if k != "vnni" and k in cls.kernels("cpu")]


def _use(monkeypatch, isa):
    if isa:
        monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, isa)


def test_parse_scheme():
    assert parse_scheme("int8") == Scheme(8) and Scheme(8).name == "int8"  # one scale a row, as before
    for g in (32, 64, 128):
        assert parse_scheme(f"int8-G{g}") == Scheme(8, g) and Scheme(8, g).name == f"int8-g{g}"
    assert parse_quantize("int8-g32+output=int8") == (Scheme(8, 32), Scheme(8))
    assert parse_scheme("int4") == Scheme(4, 32)
    assert parse_scheme("int6") == Scheme(6, 64) and Scheme(6, 64).name == "int6-g64"  # about Q6_K's size
    assert parse_scheme("int6-g128") == Scheme(6, 128)
    assert parse_quantize("int4-g64+output=int6") == (Scheme(4, 64), Scheme(6, 64))
    for g in (32, 64, 128):
        assert parse_scheme(f"INT4-g{g}") == Scheme(4, g)
    with pytest.raises(VentouxError, match="int4-g64"):
        parse_scheme("int3")
    assert parse_quantize("int4-g64") == (Scheme(4, 64), Scheme(8))  # the head in int8 by default
    assert parse_quantize("int8+output") == (Scheme(8), Scheme(8))
    assert parse_quantize("int4+output") == (Scheme(4, 32), Scheme(4, 32))  # "+output": the blocks' scheme
    assert parse_quantize("int4+output=float") == (Scheme(4, 32), None)
    assert parse_quantize("int8+output=int4-g128") == (Scheme(8), Scheme(4, 128))
    with pytest.raises(VentouxError, match="int3"):
        parse_quantize("int3+output")
    with pytest.raises(VentouxError, match="int5"):
        parse_quantize("int4+output=int5")
    with pytest.raises(VentouxError, match=r"\+output=SCHEME"):
        parse_quantize("int4+outputs")


@pytest.mark.parametrize("spec,head", [("int4-g64", Int8Linear), ("int4-g64+output", Int4Linear),
                                       ("int4-g64+output=float", nn.Linear)])
def test_quantize_while_loading_chooses_the_output_head(tmp_path, spec, head):
    save_hf(_model(), tmp_path / "float")
    model = load_model(tmp_path / "float", CFG, None, quantize=spec)
    assert type(model.output) is head and isinstance(model.layers[0].feed_forward.w2, Int4Linear)


@torch.no_grad()
@pytest.mark.parametrize("spec", [None, "int8", "int4", "int4-g64+output", "int4+output=float",
                                  "int4-g64+output=int6", "int6-g128"])
def test_every_linear_of_a_loaded_model_runs_on_a_fast_kernel(tmp_path, kernel_isa, spec):
    # Issue 12: no linear of a decode step, the head included, falls back to PyTorch's bf16 product; each
    # decode step's products agree with the plain dequantize-and-matmul fallback
    save_hf(_model(), tmp_path / "float")
    model = load_model(tmp_path / "float", CFG, torch.bfloat16, quantize=spec)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))}
    assert len(linears) == 7 * CFG.n_layers + 1
    assert [n for n, m in linears.items() if type(m) is nn.Linear] == []
    assert all(m.kernel == "vnni" for m in linears.values() if isinstance(m, QuantizedLinear))
    head = {None: HalfLinear, "int8": Int8Linear, "int4": Int8Linear, "int4-g64+output": Int4Linear,
            "int4+output=float": HalfLinear, "int4-g64+output=int6": Int6Linear, "int6-g128": Int8Linear}[spec]
    assert type(model.output) is head
    plain = copy.deepcopy(model)
    for name, m in linears.items():  # the same weights through the fallbacks
        parent, _, child = name.rpartition(".")
        if isinstance(m, QuantizedLinear):
            plain.get_submodule(name)._store("fallback", *m.canonical())
        else:
            linear = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
            linear.weight = m.weight
            setattr(plain.get_submodule(parent) if parent else plain, child, linear)
    tokens = _tokens()[:1]
    for t in range(1, 8):  # one token at a time: the decode path
        a, b = model(tokens[:, :t], last_only=True).float(), plain(tokens[:, :t], last_only=True).float()
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())


@pytest.mark.parametrize("rows", [(2, 3), (1, 300)])  # decode-sized; prefill-sized (vnni: the tiled product)
@pytest.mark.parametrize("kernel,isa", _cases(Int8Linear))
@pytest.mark.parametrize("group_size", [None, 32, 64, 128])
def test_int8_linear_against_float(monkeypatch, kernel, isa, rows, group_size):
    _use(monkeypatch, isa)
    if kernel == "int8pack" and group_size:
        pytest.skip("int8pack takes one scale a row (test_int8_groups_never_take_int8pack)")
    w, x = _weights(rows=rows)
    layer = Int8Linear.from_float(w, group_size, kernel=kernel)
    assert layer.kernel == kernel and layer.group_size == group_size
    qweight, scales = layer.canonical()
    groups = 256 // (group_size or 256)
    assert qweight.dtype == torch.int8 and scales.shape == ((64,) if group_size is None else (64, groups))
    # the scale maps each row's (group's) largest weight to 127
    assert qweight.view(64, groups, -1).abs().amax(-1).eq(127).all()
    step = _ref_int8(torch.ones_like(qweight), scales)
    _check_linear(layer, w, x, _ref_int8(qweight, scales), step)


def test_int8_group_backward_reaches_the_input():
    # LoRA under a frozen int8-g32 layer: the input's gradient is through q * its group's scale, with the weight
    # dequantized a slice of columns at a time (slices that cut no group)
    w, _ = _weights(n=48, k=512, seed=5)
    layer = Int8Linear.from_float(w, 32)
    w_hat = _ref_int8(*layer.canonical())
    slices = list(layer._weight_columns(torch.float64, budget=48 * 128))
    assert len(slices) == 4 and torch.equal(torch.cat([c for _, c in slices], 1), w_hat)
    x = torch.randn(3, 512, requires_grad=True)
    g = torch.randn(3, 48)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(x.grad.double(), g.double() @ w_hat, rtol=1e-5, atol=1e-5)


def test_int8_groups_never_take_int8pack():
    w, _ = _weights()
    assert Int8Linear.from_float(w, 32).kernel != "int8pack"
    with pytest.raises(VentouxError, match="'int8pack' is not available"):
        Int8Linear.from_float(w, 32, kernel="int8pack")
    with pytest.raises(VentouxError, match="group size 48"):
        Int8Linear.from_float(w, 48)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("isa", KERNEL_ISAS or [pytest.param(None, marks=pytest.mark.skip(reason="no kernels"))])
def test_int8_group_kernel_against_the_fallback(monkeypatch, isa, group_size):
    # int8-g32 (and g64, g128) on ours against the plain dequantize-and-matmul fallback: each decode batch 1..8
    # (the row-by-row kernel) and a prefill batch (the tiled product), an odd number of rows (a partial tile)
    _use(monkeypatch, isa)
    w, x = _weights(n=37, k=384, seed=4, rows=(45,))
    fast = Int8Linear.from_float(w, group_size, kernel="vnni")
    plain = Int8Linear.from_float(w, group_size, kernel="fallback")
    for a, b in zip(fast.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)
    w_hat = _ref_int8(*plain.canonical())
    for m in [*range(1, 9), 45]:
        xm = x[:m]
        bound = _kernel_error(fast, xm, w_hat)
        assert ((fast(xm).double() - plain(xm).double()).abs() <= bound).all(), m
        assert ((fast(xm).double() - xm.double() @ w_hat.T).abs() <= bound).all(), m


@pytest.mark.parametrize("rows", [(2, 3), (1, 300)])  # decode-sized; prefill-sized (vnni: the tiled product)
@pytest.mark.parametrize("kernel,isa", _cases(Int4Linear))
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_linear_against_float(monkeypatch, group_size, kernel, isa, rows):
    _use(monkeypatch, isa)
    w, x = _weights(rows=rows)
    layer = Int4Linear.from_float(w, group_size, kernel=kernel)
    assert layer.kernel == kernel and layer.group_size == group_size
    qweight, scales, zeros = layer.canonical()
    assert qweight.dtype == torch.uint8 and qweight.shape == (64, 128) and scales.shape == (64, 256 // group_size)
    step = scales.to(torch.float64).repeat_interleave(group_size, 1)
    _check_linear(layer, w, x, _ref_int4(qweight, scales, zeros), step)


@pytest.mark.parametrize("rows", [(2, 3), (1, 300)])  # decode-sized; prefill-sized (vnni: the tiled product)
@pytest.mark.parametrize("kernel,isa", _cases(Int6Linear))
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int6_linear_against_float(monkeypatch, group_size, kernel, isa, rows):
    _use(monkeypatch, isa)
    w, x = _weights(rows=rows)
    layer = Int6Linear.from_float(w, group_size, kernel=kernel)
    assert layer.kernel == kernel and layer.group_size == group_size
    qweight, qhigh, scales, zeros = layer.canonical()
    assert qweight.shape == (64, 128) and qhigh.shape == (64, 64) and scales.shape == (64, 256 // group_size)
    step = scales.to(torch.float64).repeat_interleave(group_size, 1)
    w_hat = _ref_int6(qweight, qhigh, scales, zeros)
    _check_linear(layer, w, x, w_hat, step)
    # 63 steps a group: the group's smallest and largest weights lie half a step from codes 0 and 63
    groups = w_hat.view(64, -1, group_size)
    torch.testing.assert_close(groups.amax(-1) - groups.amin(-1), 63 * scales.double(), rtol=1e-9, atol=1e-9)


def test_int6_backward_reaches_the_input():
    # LoRA under a frozen int6 head: the input's gradient is through the weight dequantized from vnni's tiles,
    # a slice of rows and columns at a time (untile_int6 of a block of tiles; 37 rows: the last block a part tile)
    w, _ = _weights(n=37, k=512, seed=5)
    layer = Int6Linear.from_float(w, 64)
    w_hat = _ref_int6(*layer.canonical())
    slices = list(layer._weight_columns(torch.float64, budget=37 * 128, block=16 * 128))
    assert len(slices) == 4 and torch.equal(torch.cat([c for _, c in slices], 1), w_hat)
    x = torch.randn(3, 512, requires_grad=True)
    g = torch.randn(3, 37)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(x.grad.double(), g.double() @ w_hat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,args", [(Int8Linear, {}), (Int4Linear, {"group_size": 32}),
                                      (Int4Linear, {"group_size": 64}), (Int4Linear, {"group_size": 128}),
                                      (Int6Linear, {}), (Int6Linear, {"group_size": 128})])
@pytest.mark.parametrize("rows", [(2, 3), (37,)])
@pytest.mark.parametrize("isa", KERNEL_ISAS or [None])
def test_packed_kernel_agrees_with_fallback(monkeypatch, isa, cls, args, rows):
    _use(monkeypatch, isa)
    w, x = _weights(n=96, k=384, seed=1, rows=rows)
    fallback = cls.from_float(w, kernel="fallback", **args)
    assert cls.kernels("cpu")[0] == ("vnni" if isa else cls.kernels("cpu")[0])  # ours present where they build
    for kernel in cls.kernels("cpu"):
        packed = cls.from_float(w, kernel=kernel, **args)
        for a, b in zip(packed.state_dict().values(), fallback.state_dict().values()):
            assert torch.equal(a, b)  # one device-independent layout, whatever the kernel
        xb = x.to(torch.bfloat16).float()  # the activations PyTorch's packed kernels see
        w_hat = fallback(torch.eye(384, dtype=torch.float64).float()).T.to(torch.float64)  # (N, K)
        assert ((packed(xb) - fallback(xb)).abs() <= _kernel_error(packed, xb, w_hat)).all(), kernel


@pytest.mark.parametrize("cls,args", [(Int8Linear, {}), (Int8Linear, {"group_size": 32}),
                                      (Int8Linear, {"group_size": 128}), (Int4Linear, {"group_size": 32}),
                                      (Int4Linear, {"group_size": 64}), (Int4Linear, {"group_size": 128}),
                                      (Int6Linear, {"group_size": 32}), (Int6Linear, {"group_size": 64})])
def test_vnni_prefill_product_equals_the_decode_product(kernel_isa, cls, args):
    # More than 8 rows take the tiled product, up to 8 the row-by-row one: the same integer arithmetic,
    # so they agree to float rounding (far tighter than the bound against float64 above)
    w, x = _weights(n=100, k=640, seed=2, rows=(300,))
    layer = cls.from_float(w, kernel="vnni", **args)
    by_rows = torch.cat([layer(x[i:i + 8]) for i in range(0, len(x), 8)])
    torch.testing.assert_close(layer(x), by_rows, rtol=1e-5, atol=1e-5 * by_rows.abs().max().item())


def test_kernel_choice_follows_shape():
    w = torch.randn(40, 64)  # 40 rows: PyTorch's int4 packers need a multiple of 16
    assert Int4Linear.from_float(w, 32).kernel != "int4pack"
    with pytest.raises(VentouxError, match="not available"):
        Int4Linear.from_float(w, 32, kernel="int4pack")
    with pytest.raises(VentouxError, match="group size 48"):
        Int4Linear.from_float(w, 48)


@pytest.mark.parametrize("cls,args", [(Int8Linear, {}), (Int4Linear, {"group_size": 128}),
                                      (Int6Linear, {"group_size": 128})])
def test_odd_input_width_is_zero_padded(cls, args):
    w, x = _weights(n=48, k=200, seed=2)  # 200 inputs: stored as 256, the last 56 zero
    layer = cls.from_float(w, **args)
    assert (layer.in_features, layer.stored_in) == (200, 256)
    canonical = layer.canonical()
    if cls is Int8Linear:
        w_hat, step = _ref_int8(*canonical), canonical[1].to(torch.float64)[:, None].expand(48, 256)
    else:
        w_hat = (_ref_int4 if cls is Int4Linear else _ref_int6)(*canonical)
        step = canonical[-2].to(torch.float64).repeat_interleave(128, 1)
    _check_linear(layer, w, x, w_hat[:, :200], step[:, :200])


def _model(seed=0):
    torch.manual_seed(seed)
    model = Transformer(CFG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _tokens():
    return torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def test_quantized_model_logits_close_to_float():
    model, tokens = _model(), _tokens()
    ref = model(tokens)
    errors = {}
    for scheme in ("int8", "int8-g32", "int4-g32", "int4-g64", "int4-g128"):
        q = quantize_model(copy.deepcopy(model), scheme, include_output=True)
        cls = Int8Linear if scheme.startswith("int8") else Int4Linear
        layers = [m for n, m in q.named_modules() if n.startswith("layers.") and n.count(".") == 3]
        assert len(layers) == 2 * 7 and {type(m) for m in layers} == {cls}
        assert {m.kernel for m in layers} == {cls.kernels("cpu")[0]}  # the fastest here
        assert q.output.kernel != "int4pack"  # 211 rows: PyTorch's int4 packers cannot take it
        errors[scheme] = ((q(tokens) - ref).norm() / ref.norm()).item()
    assert errors["int8"] < 0.02 and errors["int8-g32"] < 0.02
    assert max(errors.values()) < 0.2
    assert errors["int8"] < errors["int4-g32"] / 4
    assert errors["int4-g32"] < errors["int4-g128"]  # smaller groups fit better
    assert isinstance(quantize_model(copy.deepcopy(model), "int4").output, Int8Linear)  # the default head
    assert type(quantize_model(copy.deepcopy(model), "int4", include_output=False).output) is nn.Linear


@torch.no_grad()
def test_model_dtype_change_keeps_quantized_tensors():
    model = quantize_model(_model(), "int4", kernel="int4pack")
    before = model.layers[0].attention.wq.state_dict()
    model.to(torch.bfloat16)
    layer = model.layers[0].attention.wq
    assert layer.kernel == "int4pack" and layer.packed.dtype == torch.uint8
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])
    assert model(_tokens()).isfinite().all()


@torch.no_grad()
@pytest.mark.parametrize("scheme,include_output,suffix,head",
                         [("int8", True, "+output", "int8"), ("int4-g64", False, "+output=float", None),
                          ("int8-g32", None, "", "int8"), ("int8-g64", "int8-g32", "+output=int8-g32", "int8-g32"),
                          ("int4-g64", None, "", "int8"), ("int4", "int4-g128", "+output=int4-g128", "int4-g128"),
                          ("int4-g64", "int6", "+output=int6", "int6-g64"),
                          ("int6-g128", True, "+output", "int6-g128")])
def test_save_load_gives_identical_logits(tmp_path, scheme, include_output, suffix, head):
    model, tokens = _model(), _tokens()
    save_hf(model, tmp_path / "float")
    quantized = quantize_model(copy.deepcopy(model), scheme, include_output)
    expected = quantized(tokens)
    # quantizing while loading gives the same model as quantizing after
    loaded = load_model(tmp_path / "float", CFG, None, quantize=scheme + suffix)
    torch.testing.assert_close(loaded(tokens), expected, rtol=0, atol=0)

    save_quantized(quantized, tmp_path / "q", scheme)
    entry = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert entry == {"scheme": scheme[:4], "group_size": parse_scheme(scheme).group_size,
                     "include_output": head is not None, "output_scheme": head, "format_version": 1}
    back = load_quantized(tmp_path / "q")
    assert back.layers[1].feed_forward.w2.kernel == quantized.layers[1].feed_forward.w2.kernel
    torch.testing.assert_close(back(tokens), expected, rtol=0, atol=0)


@torch.no_grad()
def test_embedding_table_is_int8_and_looks_up_its_dequantized_rows():
    """Every scheme keeps the table in int8 (one scale a row): half a bf16 table's bytes; a lookup is the
    dequantized table's rows in the model's dtype, which .to() changes without touching the stored tensors."""
    model, tokens = _model().to(torch.bfloat16), _tokens()
    table = model.tok_embeddings.weight.clone()
    q = quantize_model(copy.deepcopy(model), "int4")
    emb = q.tok_embeddings
    assert isinstance(emb, Int8Embedding) and emb.qweight.dtype == torch.int8
    assert emb.qweight.nbytes + emb.scales.nbytes < 0.51 * table.nbytes
    dequantized = dequantize_int8(emb.qweight, emb.scales)
    assert torch.equal(emb(tokens), dequantized.to(torch.bfloat16)[tokens])
    assert (dequantized - table.float()).abs().max() <= table.float().abs().amax(1).max() / 254 * 1.01
    stored = emb.qweight.clone()
    q.float()
    assert emb(tokens).dtype == torch.float32 and torch.equal(emb(tokens), dequantized[tokens])
    assert torch.equal(emb.qweight, stored) and q.dtype == torch.float32
    assert type(quantize_model(copy.deepcopy(model), "int8", embedding=False).tok_embeddings) is nn.Embedding
    assert quantize_model(_model(), "int8").tok_embeddings(tokens).dtype == torch.float32  # a float32 table's


@torch.no_grad()
def test_checkpoint_with_a_float_table_loads_with_the_table_quantized(tmp_path):
    """A quantized checkpoint written before tables were quantized (its table float) loads as a new one does:
    the table quantized while loading, the same logits as the file that stores it in int8."""
    model, tokens = _model(), _tokens()
    expected = quantize_model(copy.deepcopy(model), "int4")(tokens)
    save_quantized(quantize_model(copy.deepcopy(model), "int4", embedding=False), tmp_path / "old")
    save_quantized(quantize_model(copy.deepcopy(model), "int4"), tmp_path / "new")
    with safe_open(tmp_path / "old" / "model.safetensors", "pt") as old, \
            safe_open(tmp_path / "new" / "model.safetensors", "pt") as new:
        assert "model.embed_tokens.weight" in old.keys() and "model.embed_tokens.qweight" in new.keys()
    for folder in ("old", "new"):
        back = load_quantized(tmp_path / folder)
        assert isinstance(back.tok_embeddings, Int8Embedding)
        torch.testing.assert_close(back(tokens), expected, rtol=0, atol=0)


def test_quantizing_while_loading_frees_each_float_layer(tmp_path):
    """Peak memory stays near the quantized size only if each float linear dies once it is replaced."""
    save_hf(_model(), tmp_path / "float")
    hook, replaced = quantizer("int8"), []

    def transform(name, module):
        assert all(ref() is None for ref in replaced), "a replaced float layer is still alive"
        new = hook(name, module)
        if new is not module:
            replaced.append(weakref.ref(module.weight))
        return new

    load_model(tmp_path / "float", CFG, None, transform=transform)
    assert len(replaced) == 2 * 7 + 2  # and the output head (int8 by default) and the embedding table


def _saved(tmp_path, scheme="int4"):
    folder = tmp_path / "q"
    save_quantized(_model(), folder, scheme)
    return folder


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization"].update(changes)
    path.write_text(json.dumps(config))


def test_float_checkpoint_has_no_quantization(tmp_path):
    save_hf(_model(), tmp_path / "f")
    assert read_quantization(tmp_path / "f") is None
    with pytest.raises(VentouxError, match="not a quantized checkpoint"):
        load_quantized(tmp_path / "f")


def test_unknown_scheme_in_checkpoint_fails(tmp_path):
    folder = _saved(tmp_path)
    _edit_config(folder, scheme="int3")
    with pytest.raises(VentouxError, match="quantization.scheme 'int3'"):
        load_quantized(folder)


def test_wrong_group_size_in_checkpoint_fails(tmp_path):
    folder = _saved(tmp_path, "int4-g32")
    _edit_config(folder, group_size=64)  # the tensors hold groups of 32
    with pytest.raises(VentouxError, match=r"scales.*group_size 64"):
        load_quantized(folder)
    _edit_config(folder, group_size=48)
    with pytest.raises(VentouxError, match="group_size 48"):
        load_quantized(folder)


def test_output_scheme_of_the_checkpoint(tmp_path):
    folder = _saved(tmp_path, "int4")  # the default head: int8
    assert read_quantization(folder) == (Scheme(4, 32), Scheme(8))
    assert isinstance(load_quantized(folder).output, Int8Linear)
    _edit_config(folder, output_scheme="int5")
    with pytest.raises(VentouxError, match="output_scheme 'int5'"):
        load_quantized(folder)
    _edit_config(folder, output_scheme="int4-g32")  # the head's tensors are int8
    with pytest.raises(VentouxError, match="lm_head.qweight' is int8"):
        load_quantized(folder)
    # files written before output_scheme existed: include_output means the blocks' scheme, or a float head
    save_quantized(_model(), tmp_path / "old", "int4-g64", include_output=True)
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["quantization"]["output_scheme"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert read_quantization(tmp_path / "old") == (Scheme(4, 64), Scheme(4, 64))
    _edit_config(tmp_path / "old", include_output=False)
    assert read_quantization(tmp_path / "old") == (Scheme(4, 64), None)


def test_int8_files_keep_loading_as_what_they_are(tmp_path):
    # "int8" is one scale a row (group_size null), as every int8 file written before groups existed; int8-g32
    # records its group size; a config that contradicts the scales' shape names the tensor and the field
    row, grouped = _saved(tmp_path / "row", "int8"), _saved(tmp_path / "g32", "int8-g32")
    assert json.loads((row / "config.json").read_text())["quantization"]["group_size"] is None
    assert json.loads((grouped / "config.json").read_text())["quantization"]["group_size"] == 32
    config = json.loads((row / "config.json").read_text())
    del config["quantization"]["group_size"]  # no such key at all: still one scale a row
    (row / "config.json").write_text(json.dumps(config))
    for folder, group in [(row, None), (grouped, 32)]:
        assert read_quantization(folder) == (Scheme(8, group), Scheme(8))
        model = load_quantized(folder)
        wq = model.layers[0].attention.wq
        assert type(wq) is Int8Linear and wq.group_size == group and model.output.group_size is None
        assert wq.canonical()[1].shape == ((CFG.dim,) if group is None else (CFG.dim, CFG.dim // group))
    _edit_config(row, group_size=32)
    with pytest.raises(VentouxError, match=r"layers.0.*scales.*does not match.*group_size 32"):
        load_quantized(row)
    _edit_config(grouped, group_size=None)
    with pytest.raises(VentouxError, match=r"group-wise scales.*group_size null"):
        load_quantized(grouped)
    _edit_config(grouped, group_size=16)
    with pytest.raises(VentouxError, match="group_size 16 is not null"):
        load_quantized(grouped)


def test_scheme_contradicting_the_tensors_fails(tmp_path):
    folder = _saved(tmp_path, "int4")
    _edit_config(folder, scheme="int8", group_size=None)  # the tensors hold int4 nibbles
    with pytest.raises(VentouxError, match=r"qweight' is uint8.*quantization.scheme 'int8'"):
        load_quantized(folder)


def test_quantize_option_must_match_a_quantized_checkpoint(tmp_path):
    folder = _saved(tmp_path, "int4")
    with pytest.raises(VentouxError, match="already quantized as int4-g32"):
        load_model(folder, CFG, None, quantize="int8")
    assert isinstance(load_model(folder, CFG, None, quantize="int4-g32").layers[0].attention.wk, Int4Linear)
    # a head named with +output must be the stored one (int8 here, the default): never silently another
    for spec in ("int4+output=float", "int4+output"):
        with pytest.raises(VentouxError) as e:
            load_model(folder, CFG, None, quantize=spec)
        assert str(e.value) == f"{folder} is already quantized as int4-g32; drop quantize={spec!r} or pass 'int4-g32'"
    assert isinstance(load_model(folder, CFG, None, quantize="int4+output=int8").output, Int8Linear)
    floating = tmp_path / "float-head"
    save_quantized(_model(), floating, "int4", include_output=False)
    with pytest.raises(VentouxError, match=r"already quantized as int4-g32\+output=float; .* or pass "
                                           r"'int4-g32\+output=float'$"):
        load_model(floating, CFG, None, quantize="int4+output=int8")
    assert isinstance(load_model(floating, CFG, None, quantize="int4").output, nn.Linear)  # the scheme restated


@pytest.mark.parametrize("spec", ["int4", "int8-g64", "int4-g128+output", "int4+output=float", "int8+output=int4-g64"])
def test_spec_of_is_parse_quantizes_inverse(spec):
    from ventoux.quantize import parse_quantize, spec_of

    assert parse_quantize(spec_of(*parse_quantize(spec))) == parse_quantize(spec)


def test_quantize_cli_writes_a_checkpoint_that_loads_with_its_scheme(tmp_path):
    import subprocess
    import sys

    from ventoux.weights import save_hf

    torch.manual_seed(0)
    src = tmp_path / "float"
    model = Transformer(TINY.replace(dim=128, hidden_dim=256, head_dim=32))
    save_hf(model, src)
    run = lambda *a: subprocess.run([sys.executable, "-m", "ventoux", "quantize", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    r = run(str(src), str(tmp_path / "q"), "--scheme", "int4", "--group-size", "64")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["group_size"] == 64
    r = run(str(src), str(tmp_path / "q2"), "--scheme", "int4", "--group-size", "48")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "int4-g48" in r.stderr
