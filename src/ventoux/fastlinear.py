"""HalfLinear: a bfloat16 / float16 nn.Linear whose CPU products run on ventoux's kernels (cpu_kernels).

- Few rows (decoding): a linear layer reads its whole weight for a handful of multiply-adds, so its speed is
  the memory bandwidth. PyTorch's 16-bit CPU products reach about 60% of it here (benchmarks/bench_linear.py);
  half_gemv streams the weight at about the bandwidth, converting each value to float32 exactly.
- Many rows (prefill) in bf16: half_gemm, a register-tiled product in float32 multiply-adds, where it beats
  PyTorch's (gemm_beats_pytorch): 1.5x on the Intel Xeon it was tuned on, whose vdpbf16ps (oneDNN's bf16
  product) runs at half the float32 FMA rate; 0.45x on AMD's EPYC, where F.linear does prefill. PyTorch's
  float16 product is as fast as ours (benchmarks/bench_linear.py --m 128), so float16 prefill stays with F.linear.
The module keeps nn.Linear's parameter, so state_dict, saving and quantization see a plain Linear.

    use_cpu_kernels(model)    # swap, in place, every 16-bit CPU nn.Linear the kernels can take
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .frozen import frozen_product
from .model import swap_modules

HALF = (torch.bfloat16, torch.float16)
MAX_GEMV_ROWS = 8  # beyond this the weight is reused enough for a blocked matrix product to win


class HalfLinear(nn.Linear):
    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)  # shares the Linear's parameters: no new weight is allocated
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        w = self.weight
        trained = torch.is_grad_enabled() and any(p.requires_grad for p in (w, self.bias) if p is not None)
        if x.device.type != "cpu" or w.device.type != "cpu" or w.dtype not in HALF or trained:
            return F.linear(x, w, self.bias)  # the kernels have no weight gradient (frozen_product: the input's)
        x2 = x.reshape(rows, self.in_features)
        if rows <= MAX_GEMV_ROWS and torch.compiler.is_compiling():
            y = frozen_product(x2, lambda a: cpu_kernels.half_gemv(a, w).to(a.dtype), self._weight_columns)
        elif rows <= MAX_GEMV_ROWS and w.is_contiguous():  # the rest eligible() checked: no per-call checks
            y = frozen_product(x2, lambda a: cpu_kernels.half_gemv_unchecked(a, w).to(a.dtype), self._weight_columns)
        elif x.dtype == w.dtype == torch.bfloat16 and gemm_beats_pytorch():
            y = frozen_product(x2, lambda a: cpu_kernels.half_gemm(a, w), self._weight_columns)
        else:
            return F.linear(x, w, self.bias)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _weight_columns(self, dtype):  # for the backward to the input (LoRA on a frozen base): frozen.py
        yield 0, self.weight.detach().to(dtype)


def eligible(module: nn.Module) -> bool:
    if type(module) is not nn.Linear:
        return False
    w = module.weight
    return w.device.type == "cpu" and w.dtype in HALF and w.is_contiguous() and module.in_features % 32 == 0 \
        and kernel_works()


def use_cpu_kernels(model: nn.Module) -> nn.Module:
    return swap_modules(model, lambda name, module: HalfLinear(module) if eligible(module) else module)


def gemm_beats_pytorch() -> bool:
    """Whether half_gemm is faster than PyTorch's bf16 product (oneDNN) for many rows on this CPU: not where
    oneDNN has fast bf16 instructions, AMX tiles (not measured here) or AMD's vdpbf16ps (an EPYC with
    avx512_bf16, one thread: F.linear about 200 GFLOP/s, half_gemm about 90, at 2048x256x688 and 128x4096x4096).
    Those are AVX-512 instructions: under the AVX2 build (an AVX2 CPU, or VENTOUX_CPU_ISA=avx2 with PyTorch
    held to AVX2 as benchmarks/decode.py --isa avx2 does) oneDNN has none of them and half_gemm wins."""
    return _gemm_beats_pytorch(cpu_kernels.isa())


@functools.cache
def _gemm_beats_pytorch(isa: str | None) -> bool:
    if isa != "avx512":
        return True
    flags = cpu_kernels.cpu_flags()
    return not ("amx_bf16" in flags or ("avx512_bf16" in flags and cpu_kernels.cpu_vendor() == "AuthenticAMD"))


@cpu_kernels.once_per_build
def kernel_works() -> bool:
    """Whether the kernels run here and agree with F.linear on small random cases."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 544, generator=gen), torch.randn(29, 544, generator=gen)  # every tile's tail
    for dtype in HALF:
        expected = F.linear(x.to(dtype).float(), w.to(dtype).float())
        for y in (cpu_kernels.half_gemv(x[:3].to(dtype), w.to(dtype)), cpu_kernels.half_gemm(x.to(dtype), w.to(dtype))):
            if not torch.allclose(y.float(), expected[: len(y)], rtol=1e-2, atol=1e-2):
                return False
    return True
