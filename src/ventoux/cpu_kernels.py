"""ventoux's own CPU kernels: int8 / int6 / int4 weights times int8-quantized activations in integer dot products,
computed as llama.cpp computes its Q8_0 / Q4 products, and bf16 / fp16 weights times float32 activations.
Faster than PyTorch's kernels at batch 1, where decoding is bound by the memory bandwidth (see
benchmarks/bench_linear.py). And register-tiled matrix products for prefill (many rows), faster than
PyTorch's there.

Two builds of the same functions and numbers, chosen by the CPU's flags (isa()):
  avx512   csrc/cpu_kernels.c, x86 CPUs with AVX-512 VNNI (-march=native)
  avx2     csrc/cpu_kernels_avx2.c, x86 CPUs with AVX2 + FMA + F16C (-march=x86-64-v3, and AVX-VNNI's 256-bit
           vpdpbusd where the CPU has it): most laptops and desktops
VENTOUX_CPU_ISA=avx2|avx512|none overrides the choice (the AVX2 build runs on an AVX-512 CPU too; none: PyTorch's
products only).

    lib = library()           # None: no x86 CPU with either ISA here, no C compiler, or VENTOUX_CPU_ISA=none
    y = int8_gemv(x, *tile_int8(qweight, scales), K, n)   # (M, K) float -> (M, n) float32; tiled once, at load
    y = int8_gemv(x, *tile_int8(qweight, scales), 32, n)  # int8-g32: scales (N, K/32)
    y = int4_gemv(x, *tile_int4(qweight, scales, zeros), group, n)   # tiled once, at load time
    y = int6_gemv(x, *tile_int6(qweight, qhigh, scales, zeros), group, n)
    y = half_gemv(x, weight)                           # weight (N, K) bf16 or fp16
    y = half_gemm(x, weight)                           # -> (M, N) in the weight's dtype, for M in the tens+
    out = attend_decode(q, k, v, allowed)              # one new token a row over a KV cache (fastattention.py)
    out = decode_attention(q, k, v, cos, sin, k_cache, v_cache, slots, allowed)   # rotary, cache write, attention
    h, n = add_rms_norm(x, weight, eps, residual)      # a decode step's residual add and RMS norm (fastnorm.py)
    y = decode_block(layout, x, cos, sin, k_cache, v_cache, slots, allowed, scratch)   # a whole block (fastblock.py)

Built at first use with the system C compiler (`$CC`, else cc; about a second) into
~/.cache/ventoux/kernels, keyed by the source, the flags and the CPU; loaded with ctypes. They are also
torch custom ops (ventoux::int8_gemv, ...), so torch.compile sees them as opaque calls.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import VentouxError

CSRC = Path(__file__).parent / "csrc"
SOURCES = {"avx512": CSRC / "cpu_kernels.c", "avx2": CSRC / "cpu_kernels_avx2.c"}
NEEDED = {"avx512": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"), "avx2": ("avx2", "fma", "f16c")}
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
ISA_VARIABLE = "VENTOUX_CPU_ISA"
TILE = 16  # int8 / int6 / int4 rows per tile of the decode kernels' layout (csrc/cpu_kernels.c, before vx_int8_gemv)


def isa_flags(isa: str) -> list[str]:
    """The compiler's target flags for a build: this CPU for avx512; AVX2 CPUs (x86-64-v3) for avx2, so no
    AVX-512 instruction slips in, with AVX-VNNI where this CPU has it."""
    if isa == "avx512":
        return ["-march=native"]
    return ["-march=x86-64-v3", "-mtune=native", *(["-mavxvnni"] if "avx_vnni" in cpu_flags() else [])]


@functools.cache
def _cpuinfo(field: str) -> str:
    """The first value of a /proc/cpuinfo field ('' where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    line = next((ln for ln in text.splitlines() if ln.partition(":")[0].strip() == field), "")
    return line.partition(":")[2].strip()


@functools.cache
def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo("flags").split())


def cpu_vendor() -> str:
    """GenuineIntel, AuthenticAMD, ... ('' where unknown)."""
    return _cpuinfo("vendor_id")


def cpu_model() -> str:
    """The CPU's model name, as lscpu shows it (else what platform knows)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ventoux" / "kernels"


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """The builds this CPU can run, best first (cached: isa() asks on every product call)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ()
    return tuple(isa for isa in SOURCES if all(f in cpu_flags() for f in NEEDED[isa]))


def compiler() -> str | None:
    """The C compiler's path ($CC, else cc); None if there is none."""
    return shutil.which(os.environ.get("CC", "cc"))


def isa() -> str | None:
    """The build the kernels run: VENTOUX_CPU_ISA if set, else the best this CPU supports; None for none."""
    wanted = os.environ.get(ISA_VARIABLE, "").strip().lower()
    if not wanted:
        return next(iter(supported_isas()), None)
    if wanted == "none":
        return None
    if wanted not in SOURCES:
        raise VentouxError(f"{ISA_VARIABLE}={wanted!r} is not a kernel build: use avx2, avx512 or none")
    if wanted not in supported_isas():
        raise VentouxError(f"{ISA_VARIABLE}={wanted}: this CPU lacks {', '.join(NEEDED[wanted])}; use "
                           f"{' or '.join([*supported_isas(), 'none'])}")
    return wanted


def library() -> ctypes.CDLL | None:
    """The compiled kernels of the selected build (isa()), built now if needed; None where they cannot run.
    Asked on every product call: the library for each value of VENTOUX_CPU_ISA is remembered (0.9 -> 0.2 us)."""
    wanted = os.environ.get(ISA_VARIABLE)
    try:
        return _libraries[wanted]
    except KeyError:
        chosen = isa()  # raises for a value that names no build this CPU runs: never remembered
        _libraries[wanted] = lib = build(chosen) if chosen else None
        return lib


_libraries: dict[str | None, ctypes.CDLL | None] = {}


def once_per_build(check: Callable[[], bool]) -> Callable[[], bool]:
    """A fast path's kernel_works (fastlinear, fastattention, fastnorm): check(), its kernels against PyTorch on
    small random cases, runs once per kernel build where one loads, and is remembered; .cache_clear() forgets.
    Keyed as library() is, by VENTOUX_CPU_ISA's value: it is asked on every decode step's kernel call."""
    @functools.cache
    def per_build(wanted: str | None) -> bool:
        return library() is not None and check()

    def works() -> bool:
        return per_build(os.environ.get(ISA_VARIABLE))

    works.cache_clear = per_build.cache_clear
    return functools.update_wrapper(works, check)


@functools.cache
def build(which: str) -> ctypes.CDLL | None:
    """The kernels of one build (see SOURCES), compiled on first use; None if that fails."""
    source, flags = SOURCES[which], [*FLAGS, *isa_flags(which)]
    cc = os.environ.get("CC", "cc")
    sources = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))  # what it includes
    key = hashlib.sha256(sources + " ".join([cc, *flags, *sorted(cpu_flags())]).encode()).hexdigest()
    path = cache_dir() / f"cpu_kernels-{which}-{key[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # built aside, then renamed: never half-written
            out = Path(tmp) / path.name
            try:
                subprocess.run([cc, *flags, "-o", str(out), str(source)], check=True, capture_output=True,
                               text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                detail = getattr(e, "stderr", None) or str(e)
                warnings.warn(f"ventoux: could not build its CPU kernels ({detail.strip()[:300]}); "
                              "using PyTorch's", stacklevel=2)
                return None
            out.replace(path)
    return load(path)


def load(path: str | Path) -> ctypes.CDLL:
    """A compiled kernel library, its functions typed."""
    lib = ctypes.CDLL(str(path))
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.vx_int8_gemv.argtypes = [p, i64, i64, p, p, i64, i64, p, ctypes.c_int, ctypes.c_int]
    lib.vx_int4_gemv.argtypes = [p, i64, i64, p, p, p, i64, i64, p, ctypes.c_int, ctypes.c_int]
    lib.vx_int6_gemv.argtypes = lib.vx_int4_gemv.argtypes
    lib.vx_int6_gemv.restype = None
    lib.vx_half_gemv.argtypes = [p, i64, i64, p, ctypes.c_int, i64, p, ctypes.c_int, ctypes.c_int]
    lib.vx_half_gemm.argtypes = [p, i64, i64, p, ctypes.c_int, i64, p, ctypes.c_int]
    lib.vx_int8_gemv.restype = lib.vx_int4_gemv.restype = lib.vx_half_gemv.restype = None
    lib.vx_half_gemm.restype = None
    lib.vx_attend_decode.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, ctypes.c_float, p, ctypes.c_int, ctypes.c_int]
    lib.vx_attend_decode.restype = None
    lib.vx_add_rms_norm.argtypes = [p, p, p, ctypes.c_float, i64, i64, p, p, ctypes.c_int]
    lib.vx_add_rms_norm.restype = None
    lib.vx_decode_attention.argtypes = [p, i64, p, i64, p, i64, p, p, p, p, p, p, i64, i64, i64, i64, i64,
                                        ctypes.c_float, p, ctypes.c_int, ctypes.c_int]
    lib.vx_decode_attention.restype = None
    block = ctypes.POINTER(BlockLayout)
    lib.vx_decode_block_scratch.argtypes = [block, i64, ctypes.c_int]
    lib.vx_decode_block_scratch.restype = i64
    lib.vx_decode_block.argtypes = [block, p, i64, p, p, p, p, p, p, i64, p, p, ctypes.c_int, ctypes.c_int]
    lib.vx_decode_block.restype = None
    return lib


def _check(x: torch.Tensor, *tensors: torch.Tensor, multiple: int = 128, dtype=torch.float32) -> torch.Tensor:
    if (x.dim() != 2 or x.shape[1] % multiple or x.device.type != "cpu"
            or any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors)):
        raise ValueError(f"the CPU kernels take CPU (M, K) inputs with K % {multiple} == 0 and contiguous CPU weights")
    return x.to(dtype).contiguous()


def _check_cpu(op: str, *tensors: torch.Tensor) -> None:
    """The kernels read tensors through raw pointers: one on another device (cuda, meta) would crash the process."""
    device = next((t.device for t in tensors if t.device.type != "cpu"), None)
    if device is not None:
        raise ValueError(f"{op} takes CPU tensors, not one on {device}")


def _check_half(op: str, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """_check for the 16-bit products: x (M, K) in `dtype`, a bfloat16 or float16 weight (N, K)."""
    x = _check(x, weight, multiple=32, dtype=dtype)
    if weight.dtype not in (torch.bfloat16, torch.float16) or weight.shape[1:] != x.shape[1:]:
        raise ValueError(f"{op} takes a bfloat16 or float16 weight (N, {x.shape[1]}), not {weight.dtype} "
                         f"{list(weight.shape)}")
    return x


def _check_scales(op: str, k: int, group: int, rows: int, **scales: torch.Tensor) -> None:
    """The quantized products' scales (and zeros): bfloat16, one per `group` inputs of each row, the group a multiple
    of the kernels' 32-input block that divides K (the C code divides by it)."""
    if not 0 < group or group % 32 or k % group or any(t.dtype != torch.bfloat16 or t.numel() != rows * (k // group)
                                                       for t in scales.values()):
        given = " and ".join(f"{name} {t.dtype} {list(t.shape)}" for name, t in scales.items())
        raise ValueError(f"{op}: {given} are not one bfloat16 per {group} inputs of {rows} rows (a group a "
                         f"multiple of 32 that divides {k})")


HUGE_PAGE = 2 << 20
HUGE_PAGES_VARIABLE = "VENTOUX_HUGE_PAGES"  # 0: the decode kernels' weights on ordinary pages


def empty_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for the decode kernels' weights (the tiles), on memory Linux backs with 2 MB pages as it is first
    written (an anonymous mapping given madvise MADV_HUGEPAGE; the tensor keeps it alive). One core reads a weight
    stream faster from DRAM on them, and where bandwidth is plentiful each core's rate bounds decode (AMD EPYC Zen 4:
    one thread's plain read +12-20%; a whole model's decode, benchmarks/huge_pages.py, int4-g64 +4-7%, int8 +2%).
    The price: loading faults in 2 MB pages, about a second a GB more on that VM. torch.empty off the CPU, under
    2 MB, off Linux, or with VENTOUX_HUGE_PAGES=0."""
    nbytes = math.prod(shape) * dtype.itemsize
    if (torch.device(device).type != "cpu" or nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE")
            or os.environ.get(HUGE_PAGES_VARIABLE) == "0"):
        return torch.empty(shape, dtype=dtype, device=device)
    memory = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)  # before the first write: the page faults then take huge pages
    whole = torch.frombuffer(memory, dtype=torch.uint8)  # its views keep the mapping alive
    start = -whole.data_ptr() % HUGE_PAGE  # a huge page maps an aligned 2 MB: from the first boundary on
    return whole[start:start + nbytes].view(dtype).view(shape)


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    """Zero rows appended up to a whole tile."""
    pad = -t.shape[0] % TILE
    return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) if pad else t


def _interleave(t: torch.Tensor, width: int, kernel_weights: bool = True) -> torch.Tensor:
    """(N, C) -> (N/16, C/width, 16, width): per `width` columns, the 16 rows of a tile side by side; on huge pages
    where the result is a kernel's weights, not a step towards them."""
    t = _pad_rows(t)
    tiles = t.view(-1, TILE, t.shape[1] // width, width).transpose(1, 2)
    if not kernel_weights:
        return tiles.contiguous()
    return empty_on_huge_pages(tiles.shape, t.dtype, t.device).copy_(tiles)


def _deinterleave(t: torch.Tensor, n: int) -> torch.Tensor:
    """_interleave's inverse, for the first n rows."""
    tiles, groups, rows, width = t.shape
    out = t.new_empty(tiles * rows, groups * width)
    if width == 4 and t.element_size() == 1:  # a row's 4 bytes moved as one int32: 4x fewer, longer strides
        out.view(torch.int32).view(tiles, rows, groups).copy_(t.view(torch.int32)[..., 0].transpose(1, 2))
    else:  # copy_ into the result: faster than .contiguous() of the transposed view (48 vs 261 us, 2 threads)
        out.view(tiles, rows, groups, width).copy_(t.transpose(1, 2))
    return out[:n]


def untile_block(t: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    """Rows r0:r1 (r0 a multiple of 16) and column groups c0:c1 (of the tile's second dimension) of an
    _interleave'd tensor, in the (rows, columns) layout: a block of untile_int8 / untile_int4, without the rest."""
    return _deinterleave(t[r0 // TILE:-(-r1 // TILE), c0:c1], r1 - r0)


def tile_int8(qweight: torch.Tensor, scales: torch.Tensor):
    """The device-independent int8 tensors (N, K) and scales (N,) or (N, G) -> int8_gemv's layout: rows in tiles of
    16 (N padded with zero rows), each tile (K/4, 16, 4): per 4 inputs, the 16 rows side by side; scales (N padded,)
    (one a row), or (N/16, G, 16) as int4's (one a group of K/G inputs: the same bytes as (N padded,) when G = 1)."""
    if scales.dim() == 1:
        return _interleave(qweight, 4), _pad_rows(scales).contiguous()
    return _interleave(qweight, 4), _interleave(scales, 1)[..., 0]


def untile_int8(qweight: torch.Tensor, scales: torch.Tensor, n: int):
    """tile_int8's inverse, for the first n rows."""
    if scales.dim() == 1:
        return _deinterleave(qweight, n), scales[:n].contiguous()
    return _deinterleave(qweight, n), _deinterleave(scales[..., None], n)


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group: int, n: int) -> torch.Tensor:
    """x (M, K) @ (q * scale)^T for the first n rows of int8 weights in tile_int8's layout, one scale per `group`
    inputs (group = K: one a row) -> (M, n) float32."""
    if torch.compiler.is_compiling():
        return torch.ops.ventoux.int8_gemv(x, qweight, scales, group, n)  # opaque to the compiler
    x = _check(x, qweight, scales)
    if qweight.dtype != torch.int8 or qweight.shape[1:] != (x.shape[1] // 4, TILE, 4) or qweight.shape[0] * TILE < n:
        raise ValueError(f"int8_gemv takes tile_int8's int8 tiles (N/16, K/4, 16, 4) of {n} rows or more, not "
                         f"{qweight.dtype} {list(qweight.shape)}")
    _check_scales("int8_gemv", x.shape[1], group, qweight.shape[0] * TILE, scales=scales)
    return int8_gemv_unchecked(x, qweight, scales, group, n)


def int8_gemv_unchecked(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group: int,
                        n: int) -> torch.Tensor:
    """int8_gemv for tiles its caller has checked once (Int8Linear, at load), as int4_gemv_unchecked: a decode
    call's Python costs as much as a small product's arithmetic. A bfloat16 x gives a bfloat16 y, converted in the
    kernel (the float32 product rounded as .to(torch.bfloat16) rounds it); any other float x is computed in
    float32."""
    x, bf16 = _kernel_input(x)
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16 if bf16 else torch.float32)
    library().vx_int8_gemv(x.data_ptr(), x.shape[0], x.shape[1], qweight.data_ptr(), scales.data_ptr(), group, n,
                           y.data_ptr(), torch.get_num_threads(), bf16)
    return y


def tile_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """The device-independent int4 tensors (N, K/2), (N, G), (N, G) -> int4_gemv's layout: rows in tiles of 16
    (N padded with zero rows), each tile (K/8, 16, 4) bytes: per 8 inputs, 4 bytes of each row side by side;
    scales and zeros (N/16, G, 16). A byte permutation: untile_int4 inverts it exactly."""
    return _interleave(qweight, 4), _interleave(scales, 1)[..., 0], _interleave(zeros, 1)[..., 0]


def untile_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, n: int):
    """tile_int4's inverse, for the first n rows."""
    return _deinterleave(qweight, n), _deinterleave(scales[..., None], n), _deinterleave(zeros[..., None], n)


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group: int, n: int) -> torch.Tensor:
    """x (M, K) @ ((q - 8) * scale + zero)^T for the first n rows of int4 weights in tile_int4's layout."""
    if torch.compiler.is_compiling():
        return torch.ops.ventoux.int4_gemv(x, qweight, scales, zeros, group, n)
    x = _check(x, qweight, scales, zeros)
    if qweight.dtype != torch.uint8 or qweight.shape[1:] != (x.shape[1] // 8, TILE, 4) or qweight.shape[0] * TILE < n:
        raise ValueError(f"int4_gemv takes tile_int4's uint8 tiles (N/16, K/8, 16, 4) of {n} rows or more, not "
                         f"{qweight.dtype} {list(qweight.shape)}")
    _check_scales("int4_gemv", x.shape[1], group, qweight.shape[0] * TILE, scales=scales, zeros=zeros)
    return int4_gemv_unchecked(x, qweight, scales, zeros, group, n)


def int4_gemv_unchecked(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group: int, n: int) -> torch.Tensor:
    """int4_gemv for weights its caller has checked once (Int4Linear, at load): a decode call's Python costs a few
    microseconds, as much as a small product's arithmetic. A bfloat16 x gives a bfloat16 y, int4_gemv's float32
    result rounded as .to(torch.bfloat16) rounds it, both converted in the kernel (two PyTorch conversions cost
    about 4 us a call); any other float x is computed in float32."""
    return _nibble_product(library().vx_int4_gemv, x, qweight, scales, zeros, group, n)


def _nibble_product(kernel, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group: int, n: int) -> torch.Tensor:
    """vx_int4_gemv or vx_int6_gemv (`kernel`, the same arguments) on x: bfloat16 in and out, or float32 out."""
    x, bf16 = _kernel_input(x)
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16 if bf16 else torch.float32)
    kernel(x.data_ptr(), x.shape[0], x.shape[1], qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), group, n,
           y.data_ptr(), torch.get_num_threads(), bf16)
    return y


TOP_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)  # a byte's four 2-bit fields


def _int6_tops(qhigh: torch.Tensor) -> torch.Tensor:
    """The canonical top bits (N, K/4), input 4j + p at bits 2p of byte j -> the kernel's (N, K/4): per 16 inputs,
    byte i holds inputs 2i, 2i + 1, 8 + 2i, 9 + 2i at bits 0, 2, 4, 6 (csrc/cpu_kernels.c, before with_top_bits)."""
    n, k = qhigh.shape[0], qhigh.shape[1] * 4
    tops = ((qhigh[..., None] >> TOP_SHIFTS) & 3).view(n, k // 16, 2, 4, 2)  # (row, 16 inputs, half, i, parity)
    return (tops << TOP_SHIFTS.view(2, 1, 2)).sum((2, 4), dtype=torch.uint8).view(n, k // 4)


def _int6_canonical_tops(kernel: torch.Tensor) -> torch.Tensor:
    """_int6_tops' inverse."""
    n, k = kernel.shape[0], kernel.shape[1] * 4
    tops = (kernel.view(n, k // 16, 1, 4, 1) >> TOP_SHIFTS.view(2, 1, 2)) & 3  # (row, 16 inputs, half, i, parity)
    return (tops.reshape(n, k // 4, 4) << TOP_SHIFTS).sum(-1, dtype=torch.uint8)


def tile_int6(qweight: torch.Tensor, qhigh: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """The device-independent int6 tensors (N, K/2) (the codes' low 4 bits, as int4's), (N, K/4) (their top 2 bits),
    (N, G), (N, G) -> int6_gemv's layout: rows in tiles of 16 (N padded with zero rows), each tile (K/32, 384)
    bytes: per 32 inputs int4's 256 tiled bytes, then 128 of top bits (csrc/cpu_kernels.c, before with_top_bits);
    scales and zeros as int4's. untile_int6 inverts it exactly."""
    nibbles = _interleave(qweight, 4, kernel_weights=False)  # both joined into the tiles below
    tops = _interleave(_int6_tops(qhigh), 4, kernel_weights=False)
    blocks = qweight.shape[1] // 16
    tiles = empty_on_huge_pages((nibbles.shape[0], blocks, 384), torch.uint8, nibbles.device)
    torch.cat([nibbles.view(-1, blocks, 256), tops.view(-1, blocks, 128)], dim=-1, out=tiles)
    return tiles, _interleave(scales, 1)[..., 0], _interleave(zeros, 1)[..., 0]


def untile_int6(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, n: int):
    """tile_int6's inverse, for the first n rows (of any run of whole tiles and 32-input blocks of it)."""
    tiles, blocks = qweight.shape[:2]
    nibbles = _deinterleave(qweight[..., :256].reshape(tiles, blocks * 4, TILE, 4), n)
    tops = _deinterleave(qweight[..., 256:].reshape(tiles, blocks * 2, TILE, 4), n)
    return (nibbles, _int6_canonical_tops(tops), _deinterleave(scales[..., None], n),
            _deinterleave(zeros[..., None], n))


def int6_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group: int, n: int) -> torch.Tensor:
    """x (M, K) @ ((q - 32) * scale + zero)^T for the first n rows of int6 weights in tile_int6's layout."""
    if torch.compiler.is_compiling():
        return torch.ops.ventoux.int6_gemv(x, qweight, scales, zeros, group, n)
    x = _check(x, qweight, scales, zeros)
    if qweight.dtype != torch.uint8 or qweight.shape[1:] != (x.shape[1] // 32, 384) or qweight.shape[0] * TILE < n:
        raise ValueError(f"int6_gemv takes tile_int6's uint8 tiles (N/16, K/32, 384) of {n} rows or more, not "
                         f"{qweight.dtype} {list(qweight.shape)}")
    _check_scales("int6_gemv", x.shape[1], group, qweight.shape[0] * TILE, scales=scales, zeros=zeros)
    return int6_gemv_unchecked(x, qweight, scales, zeros, group, n)


def int6_gemv_unchecked(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group: int, n: int) -> torch.Tensor:
    """int6_gemv for weights its caller has checked once (Int6Linear, at load), as int4_gemv_unchecked."""
    return _nibble_product(library().vx_int6_gemv, x, qweight, scales, zeros, group, n)


def half_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T for a bfloat16 or float16 weight -> (M, N) float32, exact products."""
    if torch.compiler.is_compiling():
        return torch.ops.ventoux.half_gemv(x, weight)
    return half_gemv_unchecked(_check_half("half_gemv", x, weight, torch.float32), weight)


def _kernel_input(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x as the bf16-io kernels read it (contiguous; bfloat16 as is, else float32), and whether it is bfloat16."""
    bf16 = x.dtype == torch.bfloat16
    return (x if bf16 else x.to(torch.float32)).contiguous(), bf16


def half_gemv_unchecked(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """half_gemv for a weight its caller has checked (HalfLinear: contiguous, 16-bit, on the CPU, K % 32 == 0): a
    decode call's Python costs as much as a small product's arithmetic. A bfloat16 x gives a bfloat16 y
    (half_gemv's result rounded as .to(torch.bfloat16) rounds it), converted in the kernel, as
    int4_gemv_unchecked; any other float x is computed in float32."""
    x, bf16 = _kernel_input(x)
    y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16 if bf16 else torch.float32)
    library().vx_half_gemv(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), weight.dtype == torch.bfloat16,
                           weight.shape[0], y.data_ptr(), torch.get_num_threads(), bf16)
    return y


def half_gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T for a bfloat16 or float16 weight -> (M, N) in the weight's dtype: float32
    sums of exact products, rounded once (x is first cast to the weight's dtype)."""
    if torch.compiler.is_compiling():
        return torch.ops.ventoux.half_gemm(x, weight)
    x = _check_half("half_gemm", x, weight, weight.dtype)
    (m, k), n = x.shape, weight.shape[0]
    y = torch.empty(m, n, dtype=weight.dtype)
    library().vx_half_gemm(x.data_ptr(), m, k, weight.data_ptr(), int(weight.dtype == torch.bfloat16), n,
                           y.data_ptr(), torch.get_num_threads())
    return y


ATTEND_MAX_G = 16  # query heads a KV head attend_decode takes (csrc: ATTEND_MAX_G)


def attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per row over a KV cache: q (B, H, G, D), its G query heads for each of the H KV
    heads; k, v (B, H, S, D); allowed (B, S) bool, the slots it may attend to -> (B, H, G, D) in q's dtype
    (bfloat16 or float32, as k and v), scaled by 1/sqrt(D), as F.scaled_dot_product_attention computes it up to
    float32 rounding. A row allowed no slot gets zeros."""
    _check_cpu("attend_decode", q, k, v, allowed)
    b, h, g, d = q.shape
    s = k.shape[2]
    if not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.bfloat16, torch.float32)):
        raise ValueError(f"attend_decode takes bfloat16 or float32 q, k and v of one dtype, not {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if k.shape != (b, h, s, d) or v.shape != k.shape or allowed.shape != (b, s) or g > ATTEND_MAX_G or d % 16:
        raise ValueError(f"attend_decode: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} and allowed "
                         f"{list(allowed.shape)} are not (B, H, G <= {ATTEND_MAX_G}, D % 16 == 0), (B, H, S, D), "
                         "(B, S)")
    q, k, v, allowed = q.contiguous(), k.contiguous(), v.contiguous(), allowed.to(torch.bool).contiguous()
    out = torch.empty_like(q)
    library().vx_attend_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), allowed.data_ptr(), b, h, g, s, d,
                               d ** -0.5, out.data_ptr(), q.dtype == torch.bfloat16, torch.get_num_threads())
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     allowed: torch.Tensor) -> torch.Tensor:
    """A decode step's attention from its q, k, v products: q (B, H*G*D), k and v (B, H*D), the new token of each
    row (its rows may be apart: views of one joined product); rotary by cos, sin (B, D) as model.apply_rotary
    rotates (the same bits); the rotated key and the value written to each row's slot, slots (B,), of k_cache and
    v_cache (B, H, S, D); then attention over the cache where allowed (B, S), as attend_decode -> (B, H*G*D).
    All bfloat16 or all float32, D % 16 == 0, G <= ATTEND_MAX_G."""
    _check_cpu("decode_attention", q, k, v, cos, sin, k_cache, v_cache, slots, allowed)
    b, s = allowed.shape
    h, d = k_cache.shape[1], k_cache.shape[3]
    tensors = (q, k, v, cos, sin, k_cache, v_cache)
    if not all(t.dtype == q.dtype for t in tensors) or q.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError("decode_attention takes bfloat16 or float32 q, k, v, cos, sin and caches of one dtype, not "
                         + ", ".join(str(t.dtype) for t in tensors))
    g = q.shape[-1] // (h * d) if h * d else 0
    if (k_cache.shape != (b, h, s, d) or v_cache.shape != k_cache.shape or q.shape != (b, h * g * d)
            or k.shape != (b, h * d) or v.shape != k.shape or cos.shape != (b, d) or sin.shape != cos.shape
            or slots.shape != (b,) or not 0 < g <= ATTEND_MAX_G or d % 16):
        raise ValueError(f"decode_attention: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}, cos "
                         f"{list(cos.shape)}, caches {list(k_cache.shape)}, slots {list(slots.shape)} and allowed "
                         f"{list(allowed.shape)} are not (B, H*G*D), (B, H*D), (B, H*D), (B, D), (B, H, S, D), (B,), "
                         f"(B, S) with G <= {ATTEND_MAX_G} and D % 16 == 0")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or not bool(((slots >= 0) & (slots < s)).all()):
        raise ValueError("decode_attention writes to contiguous caches, at slots within them")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return decode_attention_unchecked(q, k, v, cos.contiguous(), sin.contiguous(), k_cache, v_cache,
                                      slots.to(torch.int64).contiguous(), allowed.to(torch.bool).contiguous())


def decode_attention_unchecked(q, k, v, cos, sin, k_cache, v_cache, slots, allowed) -> torch.Tensor:
    """decode_attention for inputs its caller checked (fastattention.KernelAttention): rows of q, k and v with
    unit strides within, everything else contiguous, slots int64 within the caches, allowed bool."""
    b, h, s, d = k_cache.shape
    out = q.new_empty(b, q.shape[-1])
    library().vx_decode_attention(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                                  cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                  slots.data_ptr(), allowed.data_ptr(), b, h, q.shape[-1] // (h * d), s, d, d ** -0.5,
                                  out.data_ptr(), q.dtype == torch.bfloat16, torch.get_num_threads())
    return out


class Product(ctypes.Structure):
    """One linear layer on a kernel (csrc/decode_block.h's vx_product): kind INT8, INT4, INT6 or HALF, its input
    and output widths K and N, and its arguments to int8_gemv, int4_gemv, int6_gemv or half_gemv."""
    _fields_ = [("kind", ctypes.c_int64), ("K", ctypes.c_int64), ("N", ctypes.c_int64), ("group", ctypes.c_int64),
                ("half_bf16", ctypes.c_int64), ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("zeros", ctypes.c_void_p)]
    INT8, INT4, HALF, INT6 = 0, 1, 2, 3


class Products(ctypes.Structure):
    """The products of one input (vx_products): one joined product (n = 1) whose rows hold every output side by
    side, or one product a layer."""
    _fields_ = [("p", Product * 3), ("n", ctypes.c_int64)]


class BlockLayout(ctypes.Structure):
    """A transformer block's weights and shape for decode_block (vx_block)."""
    _fields_ = [("qkv", Products), ("gate_up", Products), ("wo", Product), ("w2", Product),
                ("attention_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("dim", ctypes.c_int64), ("hidden", ctypes.c_int64),
                ("n_heads", ctypes.c_int64), ("n_kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64)]


def decode_block_scratch_bytes(layout: BlockLayout, rows: int, dtype: torch.dtype) -> int:
    """The bytes of scratch memory decode_block needs for `rows` rows of `dtype` activations."""
    return library().vx_decode_block_scratch(ctypes.byref(layout), rows, dtype == torch.bfloat16)


def decode_block(layout: BlockLayout, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slots: torch.Tensor, allowed: torch.Tensor,
                 scratch: torch.Tensor) -> torch.Tensor:
    """A transformer block's decode step as model.Block.forward computes it, in one call: x (B, dim), one new
    token a row -> (B, dim). The attention is decode_attention's over k_cache, v_cache (B, Hkv, S, D), written at
    slots (B,), with cos, sin (B, D) and allowed (B, S); the layout's products are their kernels'. x, cos, sin and
    the caches all bfloat16 or all float32, contiguous; scratch, made once and reused, decode_block_scratch_bytes
    bytes for at least B rows.
    The caller keeps the layout's tensors alive and unchanged (fastblock.py checks them before each call)."""
    _check_cpu("decode_block", x, cos, sin, k_cache, v_cache, slots, allowed, scratch)
    b, s, d = x.shape[0], k_cache.shape[2], k_cache.shape[3]
    tensors = (x, cos, sin, k_cache, v_cache)
    if not all(t.dtype == x.dtype for t in tensors) or x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError("decode_block takes bfloat16 or float32 x, cos, sin and caches of one dtype, not "
                         + ", ".join(str(t.dtype) for t in tensors))
    if (x.shape != (b, layout.dim) or k_cache.shape != (b, layout.n_kv_heads, s, layout.head_dim)
            or v_cache.shape != k_cache.shape or cos.shape != (b, d) or sin.shape != cos.shape
            or slots.shape != (b,) or allowed.shape != (b, s) or not all(t.is_contiguous() for t in tensors)):
        raise ValueError(f"decode_block: x {list(x.shape)}, caches {list(k_cache.shape)}, cos {list(cos.shape)}, "
                         f"slots {list(slots.shape)} and allowed {list(allowed.shape)} are not contiguous (B, "
                         f"{layout.dim}), (B, {layout.n_kv_heads}, S, {layout.head_dim}), (B, D), (B,), (B, S)")
    if not bool(((slots >= 0) & (slots < s)).all()):
        raise ValueError("decode_block writes to the caches at slots within them")
    if scratch.numel() * scratch.element_size() < decode_block_scratch_bytes(layout, b, x.dtype):
        raise ValueError("decode_block: scratch is smaller than decode_block_scratch_bytes for these rows")
    return decode_block_unchecked(layout, x, cos, sin, k_cache, v_cache, slots.to(torch.int64).contiguous(),
                                  allowed.to(torch.bool).contiguous(), scratch)


def decode_block_unchecked(layout, x, cos, sin, k_cache, v_cache, slots, allowed, scratch) -> torch.Tensor:
    """decode_block for inputs its caller checked (fastblock.KernelBlock), in any shapes holding decode_block's
    (x (B, 1, dim), cos (B, 1, 1, D), ...): between two weight streams a check or a view costs more than a small
    kernel. The result has x's shape."""
    out = torch.empty_like(x)
    library().vx_decode_block(ctypes.byref(layout), x.data_ptr(), k_cache.shape[0], cos.data_ptr(), sin.data_ptr(),
                              k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), allowed.data_ptr(),
                              k_cache.shape[2], scratch.data_ptr(), out.data_ptr(), x.dtype == torch.bfloat16,
                              torch.get_num_threads())
    return out


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of x's rows, weight * x / sqrt(mean(x^2) + eps), rounded as model.RMSNorm rounds (bfloat16: the
    normalized rows, then the product) -> n; with a residual, of h = x + residual -> (h, n). x, residual (..., D)
    and weight (D,) all bfloat16 or all float32, D % 16 == 0. The same numbers as RMSNorm up to float32 rounding
    of the sum of squares (csrc: vx_add_rms_norm)."""
    dim = x.shape[-1]
    tensors = (x, weight) if residual is None else (x, weight, residual)
    _check_cpu("add_rms_norm", *tensors)
    if not all(t.dtype == x.dtype for t in tensors) or x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError("add_rms_norm takes bfloat16 or float32 x, weight and residual of one dtype, not "
                         + ", ".join(str(t.dtype) for t in tensors))
    if dim % 16 or weight.shape != (dim,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"add_rms_norm: x {list(x.shape)}, weight {list(weight.shape)} and residual "
                         f"{None if residual is None else list(residual.shape)} are not (..., D % 16 == 0), (D,), "
                         "x's shape")
    return add_rms_norm_unchecked(x.contiguous(), weight.contiguous(), eps,
                                  None if residual is None else residual.contiguous())


def add_rms_norm_unchecked(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """add_rms_norm for contiguous inputs its caller checked (KernelRMSNorm): between two weight streams the
    checks cost more than the kernel."""
    n = torch.empty_like(x)
    if residual is None:
        library().vx_add_rms_norm(x.data_ptr(), None, weight.data_ptr(), eps, x.numel() // x.shape[-1],
                                  x.shape[-1], None, n.data_ptr(), x.dtype == torch.bfloat16)
        return n
    h = torch.empty_like(x)
    library().vx_add_rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), eps, x.numel() // x.shape[-1],
                              x.shape[-1], h.data_ptr(), n.data_ptr(), x.dtype == torch.bfloat16)
    return h, n


# Registered as custom ops for torch.compile; eager calls skip the dispatcher (about 10 us a call). The schemas are
# written out: inferring them evaluates the annotations in the function's globals, which a wrapped function (the
# trampolines of mutation testing) does not have.
_int8_op = torch.library.custom_op("ventoux::int8_gemv", int8_gemv, mutates_args=(),
                                   schema="(Tensor x, Tensor qweight, Tensor scales, SymInt group, SymInt n) -> Tensor")
_int4_op = torch.library.custom_op("ventoux::int4_gemv", int4_gemv, mutates_args=(),
                                   schema="(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, SymInt group, "
                                          "SymInt n) -> Tensor")
_int6_op = torch.library.custom_op("ventoux::int6_gemv", int6_gemv, mutates_args=(),
                                   schema="(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, SymInt group, "
                                          "SymInt n) -> Tensor")
_half_op = torch.library.custom_op("ventoux::half_gemv", half_gemv, mutates_args=(),
                                   schema="(Tensor x, Tensor weight) -> Tensor")
_gemm_op = torch.library.custom_op("ventoux::half_gemm", half_gemm, mutates_args=(),
                                   schema="(Tensor x, Tensor weight) -> Tensor")


@_int8_op.register_fake
def _(x, qweight, scales, group, n):
    return x.new_empty(x.shape[0], n, dtype=torch.float32)


@_int4_op.register_fake
@_int6_op.register_fake
def _(x, qweight, scales, zeros, group, n):
    return x.new_empty(x.shape[0], n, dtype=torch.float32)


@_half_op.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


@_gemm_op.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=weight.dtype)
