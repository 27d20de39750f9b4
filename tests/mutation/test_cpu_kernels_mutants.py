"""cpu_kernels.py where mutation testing found it unpinned. The loader: the cache folder, the compiler asked for,
the CPU vendor, the AVX2 build's flags with and without AVX-VNNI, no build on a CPU with neither ISA, and an
unsupported VENTOUX_CPU_ISA's message whole. The checked entry points (int8_gemv ... add_rms_norm): each refusal,
one condition at a time, its message whole, and what they pass on (strided inputs, other dtypes, the last row of a
tile). test_cpu_kernels.py and the fast-path tests run the kernels' numbers."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from conftest import error_message

from ventoux import cpu_kernels
from ventoux.errors import VentouxError
from ventoux.qlinear import quantize_int4, quantize_int6, quantize_int8


def test_the_kernels_are_cached_under_xdg_cache_home_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu_kernels.cache_dir() == tmp_path / "xdg" / "ventoux" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(Path, "home", lambda: tmp_path / "home")
    assert cpu_kernels.cache_dir() == tmp_path / "home" / ".cache" / "ventoux" / "kernels"


def test_the_compiler_is_cc_unless_the_cc_variable_names_another(monkeypatch):
    asked = []
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: asked.append(name) or f"/usr/bin/{name}")
    monkeypatch.delenv("CC", raising=False)
    assert cpu_kernels.compiler() == "/usr/bin/cc"
    monkeypatch.setenv("CC", "clang")
    assert cpu_kernels.compiler() == "/usr/bin/clang" and asked == ["cc", "clang"]


def test_the_vendor_is_cpuinfos_vendor_id(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_cpuinfo", {"vendor_id": "AuthenticAMD", "model name": "AMD EPYC"}.get)
    assert cpu_kernels.cpu_vendor() == "AuthenticAMD"


def test_the_avx2_build_adds_avx_vnni_only_where_the_cpu_has_it(monkeypatch):
    flags = frozenset({"avx2", "fma", "f16c"})
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: flags)
    assert cpu_kernels.isa_flags("avx2") == ["-march=x86-64-v3", "-mtune=native"]
    flags = flags | {"avx_vnni"}
    assert cpu_kernels.isa_flags("avx2") == ["-march=x86-64-v3", "-mtune=native", "-mavxvnni"]
    assert cpu_kernels.isa_flags("avx512") == ["-march=native"]


def test_a_cpu_with_neither_isa_runs_no_build_and_names_what_it_lacks(monkeypatch):
    monkeypatch.delenv(cpu_kernels.ISA_VARIABLE, raising=False)
    monkeypatch.setattr(cpu_kernels, "supported_isas", lambda: ())
    assert cpu_kernels.isa() is None
    monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, "avx2")
    with pytest.raises(VentouxError) as e:
        cpu_kernels.isa()
    assert str(e.value) == "VENTOUX_CPU_ISA=avx2: this CPU lacks avx2, fma, f16c; use none"
    monkeypatch.setattr(cpu_kernels, "supported_isas", lambda: ("avx2",))
    monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, " AVX512 ")
    with pytest.raises(VentouxError) as e:
        cpu_kernels.isa()
    assert str(e.value) == ("VENTOUX_CPU_ISA=avx512: this CPU lacks avx512f, avx512bw, avx512vl, avx512_vnni; "
                            "use avx2 or none")


@pytest.mark.parametrize("r0,r1", [(0, 40), (16, 40), (16, 32), (32, 45)])
def test_a_block_of_tiled_rows_and_column_groups_is_that_block_of_the_matrix(r0, r1):
    q = torch.randint(-128, 128, (45, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(r0 + r1))
    tiled = cpu_kernels._interleave(q, 4)  # (3 tiles, 16 groups of 4 columns, 16 rows, 4)
    assert torch.equal(cpu_kernels.untile_block(tiled, r0, r1, 1, 3), q[r0:r1, 4:12])
    assert torch.equal(cpu_kernels._deinterleave(tiled, 45), q)


def test_a_kernel_check_keeps_the_name_and_doc_of_the_check_it_wraps():
    def kernel_works() -> bool:
        """The kernels against PyTorch."""
        return True

    works = cpu_kernels.once_per_build(kernel_works)
    assert (works.__name__, works.__doc__, works.__wrapped__) == ("kernel_works", "The kernels against PyTorch.",
                                                                  kernel_works)


# The checked entry points' refusals, one condition at a time, each message whole; and what they pass on.

refusal = functools.partial(error_message, ValueError)  # the checked entry points' refusals


CHECK = "the CPU kernels take CPU (M, K) inputs with K % {} == 0 and contiguous CPU weights"
GEN = torch.Generator().manual_seed(0)
W = torch.randn(37, 256, generator=GEN)
X = torch.randn(2, 256, generator=GEN)


def elsewhere(kernel, *args: torch.Tensor) -> list[str]:
    """kernel's refusals with each of its tensors in turn on the meta device (the kernels read tensors through raw
    pointers: one on another device would crash the process)."""
    return [refusal(kernel, *args[:i], t.to("meta"), *args[i + 1:]) for i, t in enumerate(args)]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same values in the same dtype (torch.equal compares values only)."""
    return a.dtype == b.dtype and torch.equal(a, b)


def strided(t: torch.Tensor) -> torch.Tensor:
    """t's values in a tensor that is not contiguous."""
    return torch.stack([t, t], -1)[..., 0]


def test_int8_gemv_refuses_each_thing_it_cannot_take_and_names_it():
    q, s = cpu_kernels.tile_int8(*quantize_int8(W))  # (3, 64, 16, 4): 48 rows
    q32, s32 = cpu_kernels.tile_int8(*quantize_int8(W, 32))
    gemv = cpu_kernels.int8_gemv
    assert refusal(gemv, X[0], q, s, 256, 37) == CHECK.format(128)
    assert refusal(gemv, X[None], q, s, 256, 37) == CHECK.format(128)
    assert refusal(gemv, X[:, :192], q, s, 192, 37) == CHECK.format(128)
    assert refusal(gemv, X, q.to("meta"), s, 256, 37) == CHECK.format(128)
    assert refusal(gemv, X.to("meta"), q, s, 256, 37) == CHECK.format(128)  # read through its pointer: a crash
    assert refusal(gemv, X, q, strided(s), 256, 37) == CHECK.format(128)
    tiles = "int8_gemv takes tile_int8's int8 tiles (N/16, K/4, 16, 4) of {} rows or more, not {} [3, 64, 16, 4]"
    assert refusal(gemv, torch.randn(2, 384), q, s, 384, 37) == tiles.format(37, "torch.int8")
    assert refusal(gemv, X, q, s, 256, 49) == tiles.format(49, "torch.int8")
    assert refusal(gemv, X, q.view(torch.uint8), s, 256, 37) == tiles.format(37, "torch.uint8")
    scales = ("int8_gemv: scales {} are not one bfloat16 per {} inputs of 48 rows (a group a multiple of 32 that "
              "divides 256)")
    ones = torch.ones(48 * 16, dtype=torch.bfloat16)
    assert refusal(gemv, X, q, ones, 16, 37) == scales.format("torch.bfloat16 [768]", 16)  # not a multiple of 32
    assert refusal(gemv, X, q, ones[:96], 96, 37) == scales.format("torch.bfloat16 [96]", 96)  # does not divide K
    assert refusal(gemv, X, q, ones[:0], 0, 37) == scales.format("torch.bfloat16 [0]", 0)  # the C code divides by it
    assert refusal(gemv, X, q, s32, 256, 37) == scales.format("torch.bfloat16 [3, 8, 16]", 256)
    assert refusal(gemv, X, q32, s, 32, 37) == scales.format("torch.bfloat16 [48]", 32)
    assert refusal(gemv, X, q, s.float(), 256, 37) == scales.format("torch.float32 [48]", 256)
    # every row of the tiles (padding included), float32 from any x, as the per-row and per-group products
    full = gemv(X, q, s, 256, 48)
    assert full.shape == (2, 48) and not full[:, 37:].any() and same(full[:, :37], gemv(X, q, s, 256, 37))
    for x in (X.double(), X.bfloat16(), strided(X)):
        assert same(gemv(x, q32, s32, 32, 37), gemv(x.float().contiguous(), q32, s32, 32, 37))


NIBBLE_PRODUCTS = {  # int4 and int6: one entry point's checks, their tiles' layouts
    4: (quantize_int4, cpu_kernels.tile_int4, cpu_kernels.int4_gemv, cpu_kernels.int4_gemv_unchecked,
        "tile_int4's uint8 tiles (N/16, K/8, 16, 4)", "[3, 32, 16, 4]"),
    6: (quantize_int6, cpu_kernels.tile_int6, cpu_kernels.int6_gemv, cpu_kernels.int6_gemv_unchecked,
        "tile_int6's uint8 tiles (N/16, K/32, 384)", "[3, 8, 384]")}


@pytest.mark.parametrize("bits", [4, 6])
def test_int4_gemv_refuses_each_thing_it_cannot_take_and_names_it(bits):
    quantize, tile, gemv, unchecked, layout, shape = NIBBLE_PRODUCTS[bits]
    tiles = tile(*quantize(W, 32))  # qweight as `shape`, scales and zeros (3, 8, 16)
    assert refusal(gemv, X[:, :64], *tiles, 32, 37) == CHECK.format(128)
    assert refusal(gemv, X.to("meta"), *tiles, 32, 37) == CHECK.format(128)
    for i in range(3):  # qweight, scales, zeros
        assert refusal(gemv, X, *tiles[:i], strided(tiles[i]), *tiles[i + 1:], 32, 37) == CHECK.format(128)
    layout = f"int{bits}_gemv takes {layout} of {{}} rows or more, not {{}} {{}}"
    assert refusal(gemv, torch.randn(2, 384), *tiles, 32, 37) == layout.format(37, "torch.uint8", shape)
    assert refusal(gemv, X, *tiles, 32, 49) == layout.format(49, "torch.uint8", shape)
    assert refusal(gemv, X, tiles[0].view(torch.int8), *tiles[1:], 32, 37) == layout.format(37, "torch.int8", shape)
    other = NIBBLE_PRODUCTS[10 - bits]
    other_tiles = other[1](*other[0](W, 32))[0]  # the other format's tiles
    assert refusal(gemv, X, other_tiles, *tiles[1:], 32, 37) == layout.format(37, "torch.uint8", other[5])
    q, s, z = tiles
    scales = (f"int{bits}_gemv: scales {{}} and zeros {{}} are not one bfloat16 per {{}} inputs of 48 rows (a group a "
              "multiple of 32 that divides 256)")
    wide = "torch.bfloat16 [3, 8, 16]"
    for group in (0, 16, 96, 64):  # the C code divides by it; not a multiple of 32; does not divide K; too few
        assert refusal(gemv, X, *tiles, group, 37) == scales.format(wide, wide, group)
    assert refusal(gemv, X, q, s[:, :4].contiguous(), z, 64, 37) == scales.format("torch.bfloat16 [3, 4, 16]", wide, 64)
    assert refusal(gemv, X, q, s, z[:, :4].contiguous(), 64, 37) == scales.format(wide, "torch.bfloat16 [3, 4, 16]", 64)
    assert refusal(gemv, X, q, s.float(), z, 32, 37) == scales.format("torch.float32 [3, 8, 16]", wide, 32)
    assert refusal(gemv, X, q, s, z.half(), 32, 37) == scales.format(wide, "torch.float16 [3, 8, 16]", 32)
    full = gemv(X, *tiles, 32, 48)
    assert full.shape == (2, 48) and not full[:, 37:].any() and same(full[:, :37], gemv(X, *tiles, 32, 37))
    for x in (X.double(), X.bfloat16(), strided(X)):
        assert same(gemv(x, *tiles, 32, 37), gemv(x.float().contiguous(), *tiles, 32, 37))
    # the unchecked product: a bfloat16 x gives a bfloat16 y, any other float x a float32 one
    assert unchecked(X.bfloat16(), *tiles, 32, 37).dtype == torch.bfloat16
    assert same(unchecked(X.double(), *tiles, 32, 37), gemv(X, *tiles, 32, 37))


@pytest.mark.parametrize("kernel", ["half_gemv", "half_gemm"])
def test_the_16_bit_products_refuse_each_thing_they_cannot_take_and_name_it(kernel):
    gemv = getattr(cpu_kernels, kernel)
    w = W.bfloat16()
    assert refusal(gemv, X[:, :48], w[:, :48]) == CHECK.format(32)
    assert refusal(gemv, X, strided(w)) == CHECK.format(32)
    assert refusal(gemv, X.to("meta"), w) == CHECK.format(32)
    assert refusal(gemv, X, w.to("meta")) == CHECK.format(32)
    assert refusal(gemv, X, W) == f"{kernel} takes a bfloat16 or float16 weight (N, 256), not torch.float32 [37, 256]"
    # a weight of another width was read past its end by half_gemm
    assert refusal(gemv, X[:, :224], w) == (f"{kernel} takes a bfloat16 or float16 weight (N, 224), not "
                                            "torch.bfloat16 [37, 256]")
    assert refusal(gemv, X, w[0]) == f"{kernel} takes a bfloat16 or float16 weight (N, 256), not torch.bfloat16 [256]"
    for weight in (w, W.half()):  # from any x: half_gemv float32, half_gemm the weight's dtype
        expected = gemv(X.to(weight.dtype if kernel == "half_gemm" else torch.float32), weight)
        assert expected.dtype == (weight.dtype if kernel == "half_gemm" else torch.float32)
        for x in (X.double(), X.bfloat16(), strided(X)):
            assert same(gemv(x, weight), gemv(x.float().contiguous(), weight))
        assert same(gemv(strided(X), weight), expected)


def test_attend_decode_refuses_each_thing_it_cannot_take_and_names_it():
    q, k, allowed = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 9, 16), torch.rand(1, 9) > 0.3
    attend = cpu_kernels.attend_decode
    assert elsewhere(attend, q, k, k, allowed) == ["attend_decode takes CPU tensors, not one on meta"] * 4
    dtypes = "attend_decode takes bfloat16 or float32 q, k and v of one dtype, not {}"
    f32, bf16, f16 = "torch.float32", "torch.bfloat16", "torch.float16"
    assert refusal(attend, q, k.bfloat16(), k, allowed) == dtypes.format(f"{f32}, {bf16}, {f32}")
    assert refusal(attend, q, k, k.bfloat16(), allowed) == dtypes.format(f"{f32}, {f32}, {bf16}")
    assert refusal(attend, q.half(), k.half(), k.half(), allowed) == dtypes.format(f"{f16}, {f16}, {f16}")
    shapes = ("attend_decode: q {}, k {}, v {} and allowed {} are not (B, H, G <= 16, D % 16 == 0), (B, H, S, D), "
              "(B, S)")
    k3 = torch.randn(1, 3, 9, 16)
    assert refusal(attend, q, k3, k3, allowed) == shapes.format([1, 2, 4, 16], [1, 3, 9, 16], [1, 3, 9, 16], [1, 9])
    assert refusal(attend, q, k, k[:, :, :8], allowed) == shapes.format([1, 2, 4, 16], [1, 2, 9, 16], [1, 2, 8, 16],
                                                                        [1, 9])
    assert refusal(attend, q, k, k, allowed[:, :8]) == shapes.format([1, 2, 4, 16], [1, 2, 9, 16], [1, 2, 9, 16],
                                                                     [1, 8])
    q17 = torch.randn(1, 2, 17, 16)
    assert refusal(attend, q17, k, k, allowed) == shapes.format([1, 2, 17, 16], [1, 2, 9, 16], [1, 2, 9, 16], [1, 9])
    assert refusal(attend, q[..., :8], k[..., :8], k[..., :8], allowed) == shapes.format(
        [1, 2, 4, 8], [1, 2, 9, 8], [1, 2, 9, 8], [1, 9])
    # strided inputs and an integer mask are taken as their contiguous, boolean values
    v = torch.randn(1, 2, 9, 16)
    expected = attend(q, k, v, allowed)
    assert same(attend(strided(q), strided(k), strided(v), allowed.long()), expected)


def decode_attention_args(d=16, h=2, g=2, s=9):
    gen = torch.Generator().manual_seed(d + h + g + s)
    return [torch.randn(1, g * h * d, generator=gen), torch.randn(1, h * d, generator=gen),
            torch.randn(1, h * d, generator=gen), torch.randn(1, d, generator=gen), torch.randn(1, d, generator=gen),
            torch.randn(1, h, s, d, generator=gen), torch.randn(1, h, s, d, generator=gen), torch.tensor([3]),
            torch.rand(1, s, generator=gen) > 0.3]


def with_(args: list, **changes) -> list:
    """args with the named ones (q, k, v, cos, sin, k_cache, v_cache, slots, allowed) replaced."""
    names = ["q", "k", "v", "cos", "sin", "k_cache", "v_cache", "slots", "allowed"]
    return [changes.get(name, arg) for name, arg in zip(names, args)]


def test_decode_attention_refuses_each_thing_it_cannot_take_and_names_it():
    args, kernel = decode_attention_args(), cpu_kernels.decode_attention
    assert elsewhere(kernel, *args) == ["decode_attention takes CPU tensors, not one on meta"] * 9
    for i in range(7):  # each of q, k, v, cos, sin and the caches in another dtype
        dtypes = ", ".join("torch.bfloat16" if j == i else "torch.float32" for j in range(7))
        assert refusal(kernel, *args[:i], args[i].bfloat16(), *args[i + 1:]) == (
            "decode_attention takes bfloat16 or float32 q, k, v, cos, sin and caches of one dtype, not " + dtypes)
    halves = [t.half() for t in args[:7]] + args[7:]
    assert refusal(kernel, *halves) == ("decode_attention takes bfloat16 or float32 q, k, v, cos, sin and caches of "
                                        "one dtype, not " + ", ".join(["torch.float16"] * 7))

    def shapes(q=(1, 64), k=(1, 32), v=(1, 32), cos=(1, 16), caches=(1, 2, 9, 16), slots=(1,), allowed=(1, 9)):
        return (f"decode_attention: q {list(q)}, k {list(k)}, v {list(v)}, cos {list(cos)}, caches {list(caches)}, "
                f"slots {list(slots)} and allowed {list(allowed)} are not (B, H*G*D), (B, H*D), (B, H*D), (B, D), "
                "(B, H, S, D), (B,), (B, S) with G <= 16 and D % 16 == 0")

    two_rows = torch.randn(2, 2, 9, 16)
    assert refusal(kernel, *with_(args, k_cache=two_rows, v_cache=two_rows)) == shapes(caches=(2, 2, 9, 16))
    assert refusal(kernel, *with_(args, v_cache=args[6][:, :, :8].contiguous())) == shapes()
    assert refusal(kernel, *with_(args, allowed=args[8][:, :8])) == shapes(allowed=(1, 8))
    assert refusal(kernel, *with_(args, q=args[0][:, :40])) == shapes(q=(1, 40))  # G = 1: 32 wide
    assert refusal(kernel, *with_(args, k=torch.randn(1, 48))) == shapes(k=(1, 48))
    assert refusal(kernel, *with_(args, v=torch.randn(1, 48))) == shapes(v=(1, 48))
    assert refusal(kernel, *with_(args, cos=torch.randn(2, 16))) == shapes(cos=(2, 16))
    assert refusal(kernel, *with_(args, sin=torch.randn(2, 16))) == shapes()
    assert refusal(kernel, *with_(args, slots=torch.tensor(3))) == shapes(slots=())
    assert refusal(kernel, *with_(args, q=torch.randn(1, 0))) == shapes(q=(1, 0))  # G = 0
    assert refusal(kernel, *decode_attention_args(g=17)) == shapes(q=(1, 17 * 32))
    assert refusal(kernel, *decode_attention_args(d=8)) == shapes(q=(1, 32), k=(1, 16), v=(1, 16), cos=(1, 8),
                                                                  caches=(1, 2, 9, 8))
    assert refusal(kernel, *decode_attention_args(h=0)) == shapes(q=(1, 0), k=(1, 0), v=(1, 0), caches=(1, 0, 9, 16))
    assert refusal(kernel, *decode_attention_args(d=0)) == shapes(q=(1, 0), k=(1, 0), v=(1, 0), cos=(1, 0),
                                                                  caches=(1, 2, 9, 0))
    slots = "decode_attention writes to contiguous caches, at slots within them"
    assert refusal(kernel, *with_(args, k_cache=strided(args[5]))) == slots
    assert refusal(kernel, *with_(args, v_cache=strided(args[6]))) == slots
    assert refusal(kernel, *with_(args, slots=torch.tensor([-1]))) == slots
    assert refusal(kernel, *with_(args, slots=torch.tensor([9]))) == slots
    # strided rows, tables and an int32 slot and integer mask are taken as their contiguous values; slot 0 too
    for slot in (0, 3):
        caches = [t.clone() for t in args[5:7]]
        expected = kernel(*args[:5], *caches, torch.tensor([slot]), args[8])
        changed = with_(args, q=strided(args[0]), k=strided(args[1]), v=strided(args[2]), cos=strided(args[3]),
                        sin=strided(args[4]), slots=torch.tensor([slot], dtype=torch.int32), allowed=args[8].long())
        assert same(kernel(*changed), expected)
        assert all(same(a, b) for a, b in zip(changed[5:7], caches))


def test_decode_attention_reads_rows_apart_in_place(monkeypatch):
    # q, k and v are views of one joined product, rows apart: the kernel reads them there, without a copy
    calls = []
    q, k, v = torch.randn(2, 128).split([64, 32, 32], -1)  # two rows: a row of one is contiguous anyway
    cos, cache = torch.randn(2, 16), torch.randn(2, 2, 9, 16)
    monkeypatch.setattr(cpu_kernels, "decode_attention_unchecked", lambda *a: calls.append(a))
    cpu_kernels.decode_attention(q, k, v, cos, cos, cache, cache.clone(), torch.tensor([0, 8]), torch.ones(2, 9) > 0)
    assert not q.is_contiguous()
    assert [t.data_ptr() for t in calls[0][:3]] == [t.data_ptr() for t in (q, k, v)]


def test_decode_block_refuses_each_thing_it_cannot_take_and_names_it():
    layout = cpu_kernels.BlockLayout(dim=128, hidden=256, n_heads=4, n_kv_heads=2, head_dim=32)  # no call is made
    x, cos = torch.randn(2, 128, dtype=torch.bfloat16), torch.randn(2, 32, dtype=torch.bfloat16)
    cache = torch.zeros(2, 2, 9, 32, dtype=torch.bfloat16)
    args = [x, cos, cos, cache, cache, torch.tensor([0, 8]), torch.ones(2, 9, dtype=torch.bool),
            torch.empty(1 << 16, dtype=torch.uint8)]
    kernel = functools.partial(cpu_kernels.decode_block, layout)
    assert elsewhere(kernel, *args) == ["decode_block takes CPU tensors, not one on meta"] * 8

    def changed(i, t):
        return [*args[:i], t, *args[i + 1:]]

    for i in range(5):  # each of x, cos, sin and the caches in another dtype
        dtypes = ", ".join("torch.float32" if j == i else "torch.bfloat16" for j in range(5))
        assert refusal(kernel, *changed(i, args[i].float())) == (
            "decode_block takes bfloat16 or float32 x, cos, sin and caches of one dtype, not " + dtypes)
    halves = [t.half() for t in args[:5]] + args[5:]
    assert refusal(kernel, *halves) == ("decode_block takes bfloat16 or float32 x, cos, sin and caches of one dtype, "
                                        "not " + ", ".join(["torch.float16"] * 5))

    def shapes(x=(2, 128), caches=(2, 2, 9, 32), cos=(2, 32), slots=(2,), allowed=(2, 9)):
        return (f"decode_block: x {list(x)}, caches {list(caches)}, cos {list(cos)}, slots {list(slots)} and allowed "
                f"{list(allowed)} are not contiguous (B, 128), (B, 2, S, 32), (B, D), (B,), (B, S)")

    three_heads = torch.zeros(2, 3, 9, 32, dtype=torch.bfloat16)
    assert refusal(kernel, *changed(0, x[:, :96].contiguous())) == shapes(x=(2, 96))
    assert refusal(kernel, x, cos, cos, three_heads, three_heads, *args[5:]) == shapes(caches=(2, 3, 9, 32))
    narrow = torch.zeros(2, 2, 9, 16, dtype=torch.bfloat16)
    assert refusal(kernel, x, cos[:, :16], cos[:, :16], narrow, narrow, *args[5:]) == shapes(caches=(2, 2, 9, 16),
                                                                                           cos=(2, 16))
    assert refusal(kernel, *changed(4, cache[:, :, :8].contiguous())) == shapes()
    assert refusal(kernel, *changed(1, cos[:, :16].contiguous())) == shapes(cos=(2, 16))
    assert refusal(kernel, *changed(2, cos[:, :16].contiguous())) == shapes()
    assert refusal(kernel, *changed(5, torch.tensor([0]))) == shapes(slots=(1,))
    assert refusal(kernel, *changed(6, args[6][:, :8])) == shapes(allowed=(2, 8))
    for i in range(5):
        assert refusal(kernel, *changed(i, strided(args[i]))) == shapes()
    for slots in ([-1, 0], [0, 9]):
        assert refusal(kernel, *changed(5, torch.tensor(slots))) == ("decode_block writes to the caches at slots "
                                                                     "within them")
    assert refusal(kernel, *changed(7, args[7][:0])) == ("decode_block: scratch is smaller than "
                                                        "decode_block_scratch_bytes for these rows")
    # the scratch grows by one row's activations a row, float32 ones twice bfloat16's
    size = functools.partial(cpu_kernels.decode_block_scratch_bytes, layout)
    row = size(2, torch.bfloat16) - size(1, torch.bfloat16)
    assert row > 0 and size(3, torch.bfloat16) - size(2, torch.bfloat16) == row
    assert size(2, torch.float32) - size(1, torch.float32) == 2 * row


def test_add_rms_norm_refuses_each_thing_it_cannot_take_and_names_it():
    x, w, r = torch.randn(2, 32), torch.randn(32), torch.randn(2, 32)
    norm = cpu_kernels.add_rms_norm
    assert elsewhere(lambda *a: norm(*a[:2], 1e-5, *a[2:]), x, w, r) == ["add_rms_norm takes CPU tensors, not one "
                                                                          "on meta"] * 3
    assert elsewhere(lambda *a: norm(*a, 1e-5), x, w) == ["add_rms_norm takes CPU tensors, not one on meta"] * 2
    dtypes = "add_rms_norm takes bfloat16 or float32 x, weight and residual of one dtype, not {}"
    assert refusal(norm, x, w.bfloat16(), 1e-5) == dtypes.format("torch.float32, torch.bfloat16")
    assert refusal(norm, x, w, 1e-5, r.bfloat16()) == dtypes.format("torch.float32, torch.float32, torch.bfloat16")
    assert refusal(norm, x.half(), w.half(), 1e-5) == dtypes.format("torch.float16, torch.float16")
    shapes = "add_rms_norm: x {}, weight {} and residual {} are not (..., D % 16 == 0), (D,), x's shape"
    assert refusal(norm, x[:, :24], w[:24], 1e-5) == shapes.format([2, 24], [24], None)
    assert refusal(norm, x, w[:16], 1e-5) == shapes.format([2, 32], [16], None)
    assert refusal(norm, x, w, 1e-5, r[:1]) == shapes.format([2, 32], [32], [1, 32])
    # strided inputs are taken as their contiguous values
    for residual in (None, r):
        expected = norm(x, w, 1e-5, residual)
        got = norm(strided(x), strided(w), 1e-5, None if residual is None else strided(residual))
        if residual is None:  # the norm alone, else (h, n)
            got, expected = (got,), (expected,)
        assert all(map(same, got, expected))
