"""ventoux's own CPU kernels (csrc/cpu_kernels.c): int8 / int4 weights times int8-quantized activations with
AVX-512 VNNI, computed as llama.cpp computes its Q8_0 / Q4 products, and bf16 / fp16 weights times float32
activations. Faster than PyTorch's kernels at batch 1, where decoding is bound by the memory bandwidth (see
benchmarks/bench_linear.py). And a register-tiled 16-bit matrix product for prefill (many rows), faster than
PyTorch's there.

    lib = library()           # None: no x86 AVX-512 VNNI here, or no C compiler
    y = int8_gemv(x, qweight, scales)                  # (M, K) float -> (M, N) float32
    y = int4_gemv(x, qweight, scales, zeros, group)
    y = half_gemv(x, weight)                           # weight (N, K) bf16 or fp16
    y = half_gemm(x, weight)                           # -> (M, N) in the weight's dtype, for M in the tens+

Built at first use with the system C compiler (`$CC`, else cc; about a second) into
~/.cache/ventoux/kernels, keyed by the source, the flags and the CPU; loaded with ctypes. They are also
torch custom ops (ventoux::int8_gemv, ...), so torch.compile sees them as opaque calls.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
NEEDED = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ventoux" / "kernels"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built now if needed; None where they cannot run."""
    flags = _cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64") or not all(f in flags for f in NEEDED):
        return None
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS, *sorted(flags)]).encode()).hexdigest()
    path = cache_dir() / f"cpu_kernels-{key[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # built aside, then renamed: never half-written
            out = Path(tmp) / path.name
            try:
                subprocess.run([compiler, *FLAGS, "-o", str(out), str(SOURCE)], check=True, capture_output=True,
                               text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                detail = getattr(e, "stderr", None) or str(e)
                warnings.warn(f"ventoux: could not build its CPU kernels ({detail.strip()[:300]}); "
                              "using PyTorch's", stacklevel=2)
                return None
            out.replace(path)
    lib = ctypes.CDLL(str(path))
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.vx_int8_gemv.argtypes = [p, i64, i64, p, p, i64, p, ctypes.c_int]
    lib.vx_int4_gemv.argtypes = [p, i64, i64, p, p, p, i64, i64, p, ctypes.c_int]
    lib.vx_half_gemv.argtypes = [p, i64, i64, p, ctypes.c_int, i64, p, ctypes.c_int]
    lib.vx_half_gemm.argtypes = [p, i64, i64, p, ctypes.c_int, i64, p, ctypes.c_int]
    lib.vx_int8_gemv.restype = lib.vx_int4_gemv.restype = lib.vx_half_gemv.restype = None
    lib.vx_half_gemm.restype = None
    return lib


def _check(x: torch.Tensor, *tensors: torch.Tensor, multiple: int = 128, dtype=torch.float32) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] % multiple or any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        raise ValueError(f"the CPU kernels take (M, K) inputs with K % {multiple} == 0 and contiguous CPU weights")
    return x.to(dtype).contiguous()


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (qweight (N, K) int8 * scales (N,) bf16)^T -> (M, N) float32."""
    if torch.compiler.is_compiling():
        return torch.ops.ventoux.int8_gemv(x, qweight, scales)  # opaque to the compiler
    x = _check(x, qweight, scales)
    (m, k), n = x.shape, qweight.shape[0]
    y = torch.empty(m, n)
    library().vx_int8_gemv(x.data_ptr(), m, k, qweight.data_ptr(), scales.data_ptr(), n, y.data_ptr(),
                           torch.get_num_threads())
    return y


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group: int) -> torch.Tensor:
    """x (M, K) @ ((q - 8) * scale + zero)^T for qweight (N, K/2) uint8, scales/zeros (N, K/g) bf16."""
    if torch.compiler.is_compiling():
        return torch.ops.ventoux.int4_gemv(x, qweight, scales, zeros, group)
    x = _check(x, qweight, scales, zeros)
    (m, k), n = x.shape, qweight.shape[0]
    y = torch.empty(m, n)
    library().vx_int4_gemv(x.data_ptr(), m, k, qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), group, n,
                           y.data_ptr(), torch.get_num_threads())
    return y


def half_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T for a bfloat16 or float16 weight -> (M, N) float32, exact products."""
    if torch.compiler.is_compiling():
        return torch.ops.ventoux.half_gemv(x, weight)
    x = _check(x, weight, multiple=32)
    (m, k), n = x.shape, weight.shape[0]
    y = torch.empty(m, n)
    library().vx_half_gemv(x.data_ptr(), m, k, weight.data_ptr(), int(weight.dtype == torch.bfloat16), n,
                           y.data_ptr(), torch.get_num_threads())
    return y


def half_gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T for a bfloat16 or float16 weight -> (M, N) in the weight's dtype: float32
    sums of exact products, rounded once (x is first cast to the weight's dtype)."""
    if torch.compiler.is_compiling():
        return torch.ops.ventoux.half_gemm(x, weight)
    if weight.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"half_gemm takes a bfloat16 or float16 weight, not {weight.dtype}")
    x = _check(x, weight, multiple=32, dtype=weight.dtype)
    (m, k), n = x.shape, weight.shape[0]
    y = torch.empty(m, n, dtype=weight.dtype)
    library().vx_half_gemm(x.data_ptr(), m, k, weight.data_ptr(), int(weight.dtype == torch.bfloat16), n,
                           y.data_ptr(), torch.get_num_threads())
    return y


# Registered as custom ops for torch.compile; eager calls skip the dispatcher (about 10 us a call).
_int8_op = torch.library.custom_op("ventoux::int8_gemv", int8_gemv, mutates_args=())
_int4_op = torch.library.custom_op("ventoux::int4_gemv", int4_gemv, mutates_args=())
_half_op = torch.library.custom_op("ventoux::half_gemv", half_gemv, mutates_args=())
_gemm_op = torch.library.custom_op("ventoux::half_gemm", half_gemm, mutates_args=())


@_int8_op.register_fake
def _(x, qweight, scales):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.float32)


@_int4_op.register_fake
def _(x, qweight, scales, zeros, group):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.float32)


@_half_op.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


@_gemm_op.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=weight.dtype)
