"""The builds of ventoux's CPU kernels (cpu_kernels.py): present wherever they can build, chosen by the CPU's
flags or VENTOUX_CPU_ISA, and giving the same numbers as each other (AVX2 against AVX-512). Each build is also
pinned to float references and the plain fallback in test_fastlinear.py and test_quantize.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import KERNEL_ISAS

from ventoux import cpu_kernels, fastlinear
from ventoux.errors import VentouxError
from ventoux.fusedproducts import SharedInputProducts
from ventoux.qlinear import Int4Linear, Int6Linear, Int8Linear, quantize_int4, quantize_int6, quantize_int8


def test_kernels_are_present_wherever_they_build(monkeypatch):
    # A kernel that fails to build or to pass its self-check must fail here, not drop out and skip its tests
    for isa in KERNEL_ISAS:
        monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, isa)
        assert cpu_kernels.library() is cpu_kernels.build(isa) is not None, isa
        assert fastlinear.kernel_works(), isa
        assert Int8Linear.kernels("cpu")[0] == Int4Linear.kernels("cpu")[0] == Int6Linear.kernels("cpu")[0] == "vnni"
    x86 = cpu_kernels.platform.machine() in ("x86_64", "AMD64")
    if x86 and cpu_kernels.compiler() and {"avx2", "fma", "f16c"} <= cpu_kernels.cpu_flags():
        assert "avx2" in KERNEL_ISAS


def test_the_build_follows_the_cpu_and_the_override(monkeypatch):
    monkeypatch.delenv(cpu_kernels.ISA_VARIABLE, raising=False)
    assert cpu_kernels.isa() == next(iter(cpu_kernels.supported_isas()), None)  # the best first
    monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, "none")
    assert cpu_kernels.isa() is None and cpu_kernels.library() is None
    assert Int8Linear.kernels("cpu")[0] != "vnni" and not fastlinear.kernel_works()
    monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, "avx3")
    with pytest.raises(VentouxError, match="VENTOUX_CPU_ISA='avx3'.*avx2, avx512 or none"):
        cpu_kernels.isa()
    for isa in ("avx2", "avx512"):
        monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, isa.upper())
        if isa in cpu_kernels.supported_isas():
            assert cpu_kernels.isa() == isa
        else:
            with pytest.raises(VentouxError, match="this CPU lacks"):
                cpu_kernels.isa()


@pytest.mark.skipif(not shutil.which("lscpu") or not cpu_kernels.cpu_flags(), reason="needs lscpu, x86's cpuinfo")
def test_the_cpu_model_is_the_one_lscpu_names():
    # every benchmark prints it beside its figures, and llama.cpp's build folder is keyed on it
    lines = subprocess.run(["lscpu"], capture_output=True, text=True, env={"LC_ALL": "C"}).stdout.splitlines()
    named = next((ln.partition(":")[2].strip() for ln in lines if ln.startswith("Model name:")), None)
    if named is None:
        pytest.skip("lscpu names no model here")
    assert cpu_kernels.cpu_model() == named


def test_the_cpu_model_falls_back_to_what_platform_knows(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_cpuinfo", lambda field: "")
    monkeypatch.setattr(cpu_kernels.platform, "processor", lambda: "")
    assert cpu_kernels.cpu_model() == cpu_kernels.platform.machine() != ""


@pytest.mark.skipif("avx2" not in KERNEL_ISAS or not shutil.which("objdump"), reason="needs the AVX2 build, objdump")
def test_the_avx2_build_holds_no_avx512_instruction():
    # It must run on CPUs without AVX-512, though it is built and tested on one: no zmm nor mask register
    path = cpu_kernels.build("avx2")._name
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True).stdout
    assert "vpmaddubsw" in text or "vpdpbusd" in text  # the integer dot products are there
    assert "zmm" not in text and "%k1" not in text


def _products(x: torch.Tensor, w: torch.Tensor) -> dict:
    out = {"int8": cpu_kernels.int8_gemv(x, *cpu_kernels.tile_int8(*quantize_int8(w)), x.shape[1], w.shape[0])}
    for g in (32, 128):
        out[f"int8-g{g}"] = cpu_kernels.int8_gemv(x, *cpu_kernels.tile_int8(*quantize_int8(w, g)), g, w.shape[0])
    for g in (32, 64, 128):
        out[f"int4-g{g}"] = cpu_kernels.int4_gemv(x, *cpu_kernels.tile_int4(*quantize_int4(w, g)), g, w.shape[0])
        out[f"int6-g{g}"] = cpu_kernels.int6_gemv(x, *cpu_kernels.tile_int6(*quantize_int6(w, g)), g, w.shape[0])
    for dtype in (torch.bfloat16, torch.float16):
        out[f"gemv {dtype}"] = cpu_kernels.half_gemv(x, w.to(dtype))
        out[f"gemm {dtype}"] = cpu_kernels.half_gemm(x, w.to(dtype)).float()
    return out


@pytest.fixture(scope="module")
def avx_vnni_form(tmp_path_factory):
    """The AVX2 file's AVX-VNNI form (256-bit vpdpbusd instead of vpmaddubsw + vpmaddwd), compiled with that
    instruction's AVX-512 encoding: this CPU may lack AVX-VNNI's own, the arithmetic is the same."""
    so = tmp_path_factory.mktemp("vnni256") / "kernels.so"
    subprocess.run([cpu_kernels.compiler(), *cpu_kernels.FLAGS, *cpu_kernels.isa_flags("avx2"), "-mavx512vnni",
                    "-mavx512vl", "-DVX_EVEX_VNNI", "-o", str(so), str(cpu_kernels.SOURCES["avx2"])], check=True)
    return cpu_kernels.load(so)


@pytest.mark.skipif(len(KERNEL_ISAS) < 2, reason="needs a CPU that runs both builds (AVX-512 VNNI)")
@pytest.mark.parametrize("m,k,n", [(1, 1024, 37), (5, 384, 130), (40, 256, 29), (300, 640, 21)])
def test_avx2_and_avx512_builds_give_the_same_numbers(monkeypatch, avx_vnni_form, m, k, n):
    # The same quantized activations and exact integer sums: only the order of float sums differs. Decode
    # (<= 8 rows) and prefill (tiled) shapes, with partial tiles; the AVX2 build with and without AVX-VNNI.
    gen = torch.Generator().manual_seed(m + k + n)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    results = {}
    for isa in ("avx512", "avx2"):
        monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, isa)
        results[isa] = _products(x, w)
    monkeypatch.setattr(cpu_kernels, "library", lambda: avx_vnni_form)
    results["avx-vnni"] = _products(x, w)
    for name, a in [*results["avx512"].items(), *results["avx-vnni"].items()]:
        b = results["avx2"][name]
        rounding = 2**-8 if "gemm torch.bfloat16" in name else 2**-11 if "gemm" in name else 0  # 16-bit outputs
        torch.testing.assert_close(b, a, rtol=1e-5 + rounding, atol=1e-5 * a.abs().max().item(), msg=name)


@pytest.mark.parametrize("n", [37, 48])
def test_int4_tiles_are_the_documented_byte_permutation(n):
    # tile_int4's layout, written from its definition: byte (t, c, r, i) is canonical byte 4c + i of row 16t + r,
    # scales and zeros (t, g, r); padding rows are zero; untile_int4 gives back the device-independent tensors
    gen = torch.Generator().manual_seed(n)
    q = torch.randint(0, 256, (n, 64), dtype=torch.uint8, generator=gen)
    s, z = torch.randn(n, 4, generator=gen).bfloat16(), torch.randn(n, 4, generator=gen).bfloat16()
    qt, st, zt = cpu_kernels.tile_int4(q, s, z)
    tiles = -(-n // 16)
    assert qt.shape == (tiles, 16, 16, 4) and st.shape == zt.shape == (tiles, 4, 16)
    for t, c, r, i in [(0, 0, 0, 0), (0, 3, 5, 2), (tiles - 1, 15, (n - 1) % 16, 3), (1, 7, 15, 1)]:
        row = 16 * t + r
        assert qt[t, c, r, i] == (q[row, 4 * c + i] if row < n else 0)
        g = c % 4
        assert st[t, g, r] == (s[row, g] if row < n else 0) and zt[t, g, r] == (z[row, g] if row < n else 0)
    for a, b in zip(cpu_kernels.untile_int4(qt, st, zt, n), (q, s, z)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n", [37, 48])
def test_int6_tiles_are_the_documented_layout(n):
    # tile_int6's layout, written from its definition (csrc/cpu_kernels.c, before with_top_bits): per tile t and
    # block b of 32 inputs, 384 bytes: int4's 256 (nibble line j = 0..3, byte 4r + i: canonical byte 16b + 4j + i
    # of row 16t + r), then top-bit lines a = 0, 1 whose byte 4r + i holds the top bits of the inputs that byte
    # 4r + i of nibble lines 2a and 2a + 1 holds (line 2a's low, then high nibble's input at bits 0 and 2, line
    # 2a + 1's at bits 4 and 6); untile_int6 gives back the device-independent tensors
    gen = torch.Generator().manual_seed(n)
    k = 128
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    h = torch.randint(0, 256, (n, k // 4), dtype=torch.uint8, generator=gen)
    s, z = torch.randn(n, 2, generator=gen).bfloat16(), torch.randn(n, 2, generator=gen).bfloat16()
    qt, st, zt = cpu_kernels.tile_int6(q, h, s, z)
    tiles = -(-n // 16)
    assert qt.shape == (tiles, k // 32, 384) and st.shape == zt.shape == (tiles, 2, 16) and qt.dtype == torch.uint8

    def top(row, inp):  # the canonical top bits of one input
        return int(h[row, inp // 4] >> 2 * (inp % 4)) & 3

    for t, b, r, i in [(0, 0, 0, 0), (0, 3, 5, 2), (tiles - 1, 1, (n - 1) % 16, 3), (1, 2, 15, 1)]:
        row = 16 * t + r
        for j in range(4):
            assert qt[t, b, 64 * j + 4 * r + i] == (q[row, 16 * b + 4 * j + i] if row < n else 0)
        for a in range(2):
            inputs = [32 * b + 8 * (2 * a + e) + 2 * i + odd for e in (0, 1) for odd in (0, 1)]  # at bits 0, 2, 4, 6
            expected = sum(top(row, inp) << 2 * p for p, inp in enumerate(inputs)) if row < n else 0
            assert qt[t, b, 256 + 64 * a + 4 * r + i] == expected, (t, b, r, i, a)
    for a, b in zip(cpu_kernels.untile_int6(qt, st, zt, n), (q, h, s, z)):
        assert a.dtype == b.dtype and torch.equal(a, b)  # torch.equal compares values only


def test_int8_tiles_are_the_documented_byte_permutation():
    # byte (t, c, r, i) of tile_int8's layout is weight (16t + r, 4c + i); scales padded with zeros
    n = 37
    q = torch.randint(-127, 128, (n, 32), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    s = torch.randn(n).bfloat16()
    qt, st = cpu_kernels.tile_int8(q, s)
    assert qt.shape == (3, 8, 16, 4) and st.shape == (48,) and not st[n:].any()
    for t, c, r, i in [(0, 0, 0, 0), (1, 5, 3, 2), (2, 7, 4, 3), (2, 7, 15, 3)]:
        assert qt[t, c, r, i] == (q[16 * t + r, 4 * c + i] if 16 * t + r < n else 0)
    for a, b in zip(cpu_kernels.untile_int8(qt, st, n), (q, s)):
        assert torch.equal(a, b)


def _thp_mode() -> str | None:
    """The bracketed mode of Linux's transparent huge pages (always, madvise, never), None elsewhere."""
    try:
        return re.search(r"\[(\w+)\]", Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()).group(1)
    except (OSError, AttributeError):
        return None


def _thp_eligible(t: torch.Tensor) -> bool:
    """Whether the mapping that holds t's data may take huge pages (its THPeligible line in /proc/self/smaps)."""
    for mapping in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        start, end = (int(a, 16) for a in mapping.split()[0].split("-"))
        if start <= t.data_ptr() < end:
            return re.search(r"THPeligible:\s+1", mapping) is not None
    raise AssertionError("no mapping holds the tensor")


@pytest.mark.skipif(_thp_mode() != "madvise", reason="needs Linux's transparent huge pages in madvise mode")
def test_large_tiles_ask_for_huge_pages_and_keep_their_values(monkeypatch):
    # 2 MB pages where a weight's tiles take a whole one (one core streams them faster from DRAM), the same bytes
    gen = torch.Generator().manual_seed(0)
    q, s, z = quantize_int4(torch.randn(2048, 4096, generator=gen), 32)  # 4 MB of codes; 256 KB of scales
    tiles = cpu_kernels.tile_int4(q, s, z)
    assert _thp_eligible(tiles[0]) and not _thp_eligible(tiles[1])  # the scales are under 2 MB: ordinary memory,
    assert tiles[1].untyped_storage().resizable() and not tiles[0].untyped_storage().resizable()  # PyTorch's own
    assert cpu_kernels.empty_on_huge_pages((4096, 1024), torch.uint8, torch.device("meta")).is_meta  # a skeleton
    for a, b in zip(cpu_kernels.untile_int4(*tiles, 2048), (q, s, z)):
        assert torch.equal(a, b)
    layer = Int6Linear.from_float(torch.randn(1024, 4096, generator=gen))
    assert _thp_eligible(layer.qweight) == (layer.kernel == "vnni")  # int6's tiles are a concatenation: the same
    a, b = (Int4Linear.from_float(torch.randn(512, 4096, generator=gen)) for _ in range(2))
    if a.kernel == "vnni":  # the joined products' concatenation of two layers' tiles (2 MB each) too
        assert _thp_eligible(SharedInputProducts([a, b]).tiles[0])
    monkeypatch.setenv(cpu_kernels.HUGE_PAGES_VARIABLE, "0")
    assert not _thp_eligible(cpu_kernels.tile_int4(q, s, z)[0])


@pytest.mark.parametrize("k,n", [(256, 37), (4096, 20)])
def test_a_rows_decode_product_is_the_same_bits_alone_and_in_any_batch(kernel_isa, k, n):
    # The engine batches streams and promises each the tokens it gets alone (test_engine.py): a row's decode
    # product (up to 8 rows) must not depend on the other rows. Batches of 1..8 at every offset, partial tiles
    # (n % 4, n % 16); the float32 product of the 16-bit weights pins the values themselves.
    gen = torch.Generator().manual_seed(k + n)
    x, w = torch.randn(8, k, generator=gen), torch.randn(n, k, generator=gen)
    halves = {dtype: w.to(dtype) for dtype in (torch.bfloat16, torch.float16)}
    for dtype, wd in halves.items():  # the values, pinned to the float64 product of the 16-bit weights
        torch.testing.assert_close(cpu_kernels.half_gemv(x, wd).double(), x.double() @ wd.double().T, rtol=1e-5,
                                   atol=1e-5 * k**0.5, msg=str(dtype))
    int8, int4 = cpu_kernels.tile_int8(*quantize_int8(w)), cpu_kernels.tile_int4(*quantize_int4(w, 64))
    int8_g32, int6 = cpu_kernels.tile_int8(*quantize_int8(w, 32)), cpu_kernels.tile_int6(*quantize_int6(w, 64))
    products = {"int8": lambda a: cpu_kernels.int8_gemv(a, *int8, k, n),
                "int8-g32": lambda a: cpu_kernels.int8_gemv(a, *int8_g32, 32, n),
                "int4": lambda a: cpu_kernels.int4_gemv(a, *int4, 64, n),
                "int6": lambda a: cpu_kernels.int6_gemv(a, *int6, 64, n),
                **{f"gemv {dtype}": lambda a, wd=wd: cpu_kernels.half_gemv(a, wd) for dtype, wd in halves.items()}}
    for name, product in products.items():
        alone = torch.cat([product(x[i:i + 1]) for i in range(8)])
        for size in range(2, 9):
            for start in range(0, 9 - size):
                batch = product(x[start:start + size])
                assert torch.equal(batch, alone[start:start + size]), (name, size, start)


def test_a_product_of_no_rows_is_empty(kernel_isa):
    # a batch can run out of rows (the engine's last stream ends): every decode kernel must take M = 0
    w = torch.randn(37, 256, generator=torch.Generator().manual_seed(0))
    x = torch.empty(0, 256)
    int8, int4 = cpu_kernels.tile_int8(*quantize_int8(w)), cpu_kernels.tile_int4(*quantize_int4(w, 32))
    int6 = cpu_kernels.tile_int6(*quantize_int6(w, 32))
    for y in (cpu_kernels.int8_gemv(x, *int8, 256, 37), cpu_kernels.int4_gemv(x, *int4, 32, 37),
              cpu_kernels.int6_gemv(x, *int6, 32, 37),
              cpu_kernels.half_gemv(x, w.bfloat16()), cpu_kernels.int4_gemv_unchecked(x.bfloat16(), *int4, 32, 37)):
        assert y.shape == (0, 37)


@pytest.mark.parametrize("n", [37, 130])
@pytest.mark.parametrize("bits", [4, 6])
def test_int4_bf16_in_and_out_is_the_float_product_rounded(kernel_isa, n, bits):
    # int4_gemv_unchecked with a bfloat16 x (Int4Linear in a bf16 model) converts in the kernel: the same bits as
    # the float32 product of the same bf16 values, rounded by PyTorch; decode (1..8 rows) and prefill (9, 20) rows.
    # int6 alike (it shares the kernel's code)
    gen = torch.Generator().manual_seed(n)
    w = torch.randn(n, 256, generator=gen)
    quantize, tile = (quantize_int4, cpu_kernels.tile_int4) if bits == 4 else (quantize_int6, cpu_kernels.tile_int6)
    gemv, unchecked = ((cpu_kernels.int4_gemv, cpu_kernels.int4_gemv_unchecked) if bits == 4
                       else (cpu_kernels.int6_gemv, cpu_kernels.int6_gemv_unchecked))
    tiles = tile(*quantize(w, 32))
    for m in (1, 2, 3, 4, 5, 8, 9, 20):
        x = (torch.randn(m, 256, generator=gen) * 3).bfloat16()
        y = unchecked(x, *tiles, 32, n)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert torch.equal(y, gemv(x.float(), *tiles, 32, n).bfloat16()), m


def _quantized_products(w: torch.Tensor) -> dict:
    """name: (product, w's tiles, group) for int8 (one scale a row, and per 32), int4 and int6 (K = 256)."""
    return {"int8": (cpu_kernels.int8_gemv, cpu_kernels.tile_int8(*quantize_int8(w)), 256),
            "int8-g32": (cpu_kernels.int8_gemv, cpu_kernels.tile_int8(*quantize_int8(w, 32)), 32),
            "int4": (cpu_kernels.int4_gemv, cpu_kernels.tile_int4(*quantize_int4(w, 32)), 32),
            "int6": (cpu_kernels.int6_gemv, cpu_kernels.tile_int6(*quantize_int6(w, 64)), 64)}


@pytest.mark.parametrize("m", [5, 20])  # decode and prefill
def test_a_non_finite_activation_makes_its_rows_quantized_products_nan(kernel_isa, m):
    # The quantized products quantize their activations a block of 32 at a time: a block holding a NaN or an inf
    # makes every output of its row NaN (the float product's is NaN or inf: not finite either; the block's maximum
    # used to drop a NaN, and an inf became a code of the wrong sign), and leaves the other rows' bits alone.
    gen = torch.Generator().manual_seed(m)
    w, x = torch.randn(40, 256, generator=gen), torch.randn(m, 256, generator=gen)
    bad = x.clone()
    bad[0, 37], bad[2, 200], bad[3, 5] = float("nan"), float("inf"), -float("inf")
    for name, (gemv, tiles, group) in _quantized_products(w).items():
        y, clean = gemv(bad, *tiles, group, 40), gemv(x, *tiles, group, 40)
        assert torch.isnan(y[:4:2]).all() and torch.isnan(y[3]).all(), name
        assert torch.equal(y[1], clean[1]) and torch.equal(y[4:], clean[4:]), name


@pytest.mark.parametrize("m", [5, 20])  # decode and prefill
def test_activations_too_small_to_quantize_count_as_zeros(kernel_isa, m):
    # A block whose max|x| is under 127 / FLT_MAX (3.7e-37) has a scale whose inverse overflows: its codes
    # came out -128 each, products of the wrong sign (-1.3e-35 for +1.3e-35). Now its codes are 0, and a row
    # of such blocks gives 0, the other rows their bits.
    gen = torch.Generator().manual_seed(m)
    w, x = torch.rand(40, 256, generator=gen) + 0.5, torch.randn(m, 256, generator=gen)
    tiny = x.clone()
    tiny[1] = torch.rand(256, generator=gen) * 3e-37 + 1e-38
    for name, (gemv, tiles, group) in _quantized_products(w).items():
        y, clean = gemv(tiny, *tiles, group, 40), gemv(x, *tiles, group, 40)
        assert torch.equal(y[1], torch.zeros(40)), name
        assert torch.equal(y[0], clean[0]) and torch.equal(y[2:], clean[2:]), name


@pytest.mark.parametrize("m", [1, 3, 8, 20])  # decode (one row, a few, the most) and prefill
@pytest.mark.parametrize("group", [256, 32])
def test_int8_products_take_every_code_minus_128_included(kernel_isa, m, group):
    # ventoux's quantizer writes -127..127, but an int8 file may hold -128 too. The AVX2 build multiplied |x| by
    # sign(x) * w, and -(-128) is -128 in a byte: those products came out negated.
    _int8_with_minus_128_is_exact(m, group)


@pytest.mark.skipif(len(KERNEL_ISAS) < 2, reason="needs a CPU that runs both builds (AVX-512 VNNI)")
@pytest.mark.parametrize("m", [1, 20])
def test_the_avx_vnni_form_takes_int8_code_minus_128_too(monkeypatch, avx_vnni_form, m):
    monkeypatch.setattr(cpu_kernels, "library", lambda: avx_vnni_form)
    _int8_with_minus_128_is_exact(m, 32)


def _int8_with_minus_128_is_exact(m: int, group: int) -> None:
    """int8_gemv of codes from -128 to 127 against exact sums of the activations quantized as the kernels do (per
    32, d = max|x| / 127, codes rounded half to even)."""
    gen = torch.Generator().manual_seed(m + group)
    q = torch.randint(-128, 128, (40, 256), dtype=torch.int8, generator=gen)
    q[:, ::7] = -128
    s = (torch.rand(40, 256 // group, generator=gen) * 0.01 + 0.005).bfloat16()
    x = torch.randn(m, 256, generator=gen)
    y = cpu_kernels.int8_gemv(x, *cpu_kernels.tile_int8(q, s[:, 0] if group == 256 else s), group, 40)
    blocks = x.view(m, 8, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    xq = (blocks * (1 / d)).round().double() * d.double()
    w = q.double() * s.double().repeat_interleave(group, 1)
    torch.testing.assert_close(y.double(), xq.view(m, 256) @ w.T, rtol=1e-5, atol=1e-5 * y.abs().max().item())


@pytest.mark.parametrize("n, group", [(37, 256), (130, 32)])
def test_int8_bf16_in_and_out_is_the_float_product_rounded(kernel_isa, n, group):
    # int8_gemv_unchecked with a bfloat16 x (Int8Linear in a bf16 model), per row and per group of 32, as int4's
    gen = torch.Generator().manual_seed(n)
    w = torch.randn(n, 256, generator=gen)
    tiles = cpu_kernels.tile_int8(*quantize_int8(w, None if group == 256 else group))
    for m in (1, 2, 3, 4, 5, 8, 9, 20):
        x = (torch.randn(m, 256, generator=gen) * 3).bfloat16()
        y = cpu_kernels.int8_gemv_unchecked(x, *tiles, group, n)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert torch.equal(y, cpu_kernels.int8_gemv(x.float(), *tiles, group, n).bfloat16()), m


def _dot_bf16(isa: str) -> bool:
    """Whether half_gemv multiplies bf16 activations and weights with vdpbf16ps (cpu_kernels.c, dot_bf16_rows)."""
    return isa == "avx512" and "avx512_bf16" in cpu_kernels.cpu_flags()


@pytest.mark.parametrize("n", [37, 130])
def test_half_gemv_bf16_in_and_out_is_the_float_product_rounded(kernel_isa, n):
    # half_gemv_unchecked with a bfloat16 x (HalfLinear in a bf16 model): the same bits as the float32 product of
    # the same bf16 values, rounded by PyTorch; bf16 and fp16 weights, 1..8 rows and more. With vdpbf16ps (bf16
    # weights, 1..8 rows) the float32 sums run in another order: within one rounding of that product.
    gen = torch.Generator().manual_seed(n)
    w = torch.randn(n, 256, generator=gen)
    for dtype in (torch.bfloat16, torch.float16):
        for m in (1, 2, 3, 5, 8, 9):
            x = (torch.randn(m, 256, generator=gen) * 3).bfloat16()
            y = cpu_kernels.half_gemv_unchecked(x, w.to(dtype))
            assert y.dtype == torch.bfloat16 and y.shape == (m, n)
            expected = cpu_kernels.half_gemv(x.float(), w.to(dtype)).bfloat16()
            if dtype == torch.bfloat16 and m <= 8 and _dot_bf16(kernel_isa):
                torch.testing.assert_close(y.float(), expected.float(), rtol=2**-8, atol=0, msg=f"{dtype} {m}")
            else:
                assert torch.equal(y, expected), (dtype, m)


@pytest.mark.parametrize("k,n", [(544, 37), (4096, 20)])
def test_the_bf16_decode_product_is_the_same_bits_alone_and_in_any_batch(kernel_isa, k, n):
    # bf16 activations and weights (a bf16 model's decode step; vdpbf16ps in the AVX-512 build where the CPU has
    # AVX512_BF16): a row's product does not depend on the other rows (batches of 1..8 at every offset, partial
    # blocks of rows; 544 inputs: an odd number of 64-byte lines), and is PyTorch's bf16 product (the plain
    # fallback, F.linear) and the float64 product within a rounding
    gen = torch.Generator().manual_seed(k + n)
    x, w = torch.randn(8, k, generator=gen).bfloat16(), torch.randn(n, k, generator=gen).bfloat16()
    alone = torch.cat([cpu_kernels.half_gemv_unchecked(x[i:i + 1], w) for i in range(8)])
    for size in range(2, 9):
        for start in range(0, 9 - size):
            assert torch.equal(cpu_kernels.half_gemv_unchecked(x[start:start + size], w), alone[start:start + size])
    exact = x.double() @ w.double().T
    torch.testing.assert_close(alone.double(), exact, rtol=2**-8, atol=1e-6 * k)
    torch.testing.assert_close(alone.float(), torch.nn.functional.linear(x, w).float(), rtol=2**-7, atol=1e-6 * k)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_prefill_product_over_many_outputs_equals_the_decode_product(kernel_isa, threads):
    # The tiled product takes the outputs in blocks of 256 over all of K (in chunks of 256 inputs): 600 outputs
    # leave a partial block (with one thread; 300 a thread with two), 640 inputs a partial chunk, 40 rows a
    # partial row block; a group of 320 or 640 inputs spans chunks (the AVX2 build's int4 / int6 unpack took the
    # scales of the groups ending in a chunk only, and read the others' unset). The same integer sums as the
    # decode kernel, so the same values to float rounding.
    gen = torch.Generator().manual_seed(600)
    x, w = torch.randn(40, 640, generator=gen), torch.randn(600, 640, generator=gen)
    products = {"int8": (cpu_kernels.tile_int8(*quantize_int8(w)), 640),
                "int8-g32": (cpu_kernels.tile_int8(*quantize_int8(w, 32)), 32),
                "int4-g32": (cpu_kernels.tile_int4(*quantize_int4(w, 32)), 32),
                "int4-g128": (cpu_kernels.tile_int4(*quantize_int4(w, 128)), 128),
                "int4-g640": (cpu_kernels.tile_int4(*quantize_int4(w, 640)), 640),  # groups across and over chunks
                "int6-g320": (cpu_kernels.tile_int6(*quantize_int6(w, 320)), 320)}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, (tiles, group) in products.items():
            gemv = getattr(cpu_kernels, f"{name[:4]}_gemv")
            by_rows = torch.cat([gemv(x[i:i + 8], *tiles, group, 600) for i in range(0, 40, 8)])
            torch.testing.assert_close(gemv(x, *tiles, group, 600), by_rows, rtol=1e-5,
                                       atol=1e-5 * by_rows.abs().max().item(), msg=name)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_16_bit_prefill_product_over_many_outputs_is_the_rounded_float_product(kernel_isa, threads):
    # half_gemm takes the outputs in blocks (the AVX2 build: 240, a multiple of its 6-output tiles) over all of K:
    # 500 outputs leave a partial block with one thread and a partial tile in the last block with either
    gen = torch.Generator().manual_seed(500)
    x, w = torch.randn(20, 512, generator=gen).bfloat16(), torch.randn(500, 512, generator=gen).bfloat16()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = cpu_kernels.half_gemm(x, w)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y.double(), x.double() @ w.double().T, rtol=2**-8, atol=1e-5 * 512)


@pytest.mark.parametrize("n", [29, 1024])
def test_the_16_bit_prefill_product_is_the_same_bits_however_its_outputs_are_split(kernel_isa, n):
    # half_gemm sizes its blocks of outputs by N and the thread count (as many for each thread; 1024 outputs are
    # 6 blocks of 174 with two in the AVX2 build, of 180 in the AVX-512 one), and prefetches the next tile's
    # weights (544 inputs: a partial input block). Each output's sums still run over K in one order: the same
    # bits with 1 or 2 threads and for any slice of the weight's rows, and the float product rounded.
    gen = torch.Generator().manual_seed(n)
    x, w = torch.randn(24, 544, generator=gen).bfloat16(), torch.randn(n, 544, generator=gen).bfloat16()
    before = torch.get_num_threads()
    try:
        ys = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ys.append(cpu_kernels.half_gemm(x, w))
            ys.append(torch.cat([cpu_kernels.half_gemm(x, w[i:i + 7 * threads]) for i in range(0, n, 7 * threads)], 1))
    finally:
        torch.set_num_threads(before)
    for y in ys[1:]:
        assert torch.equal(y, ys[0])
    torch.testing.assert_close(ys[0].double(), x.double() @ w.double().T, rtol=2**-8, atol=1e-5 * 544)
