"""GemvLinear: a bfloat16 / float16 nn.Linear whose few-row products (decoding) run on ventoux's CPU kernel.

At batch 1 a linear layer reads its whole weight for a handful of multiply-adds, so its speed is the memory
bandwidth. PyTorch's 16-bit CPU products reach about 60% of it here (benchmarks/bench_linear.py); the kernel
(cpu_kernels.half_gemv) streams the weight at about the bandwidth, converting each value to float32 exactly.
Products of more rows (prefill) stay with F.linear, which is compute-bound there and faster. The module keeps
nn.Linear's parameter, so state_dict, saving and quantization see a plain Linear.

    use_cpu_gemv(model)    # swap, in place, every 16-bit CPU nn.Linear the kernel can take
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .model import swap_modules

HALF = (torch.bfloat16, torch.float16)
MAX_ROWS = 8  # beyond this the weight is reused enough for F.linear's blocked GEMM to win


class GemvLinear(nn.Linear):
    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)  # shares the Linear's parameters: no new weight is allocated
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        w = self.weight
        if (rows > MAX_ROWS or x.device.type != "cpu" or w.device.type != "cpu" or w.dtype not in HALF
                or (w.requires_grad and torch.is_grad_enabled())):  # the kernel has no backward
            return F.linear(x, w, self.bias)
        y = cpu_kernels.half_gemv(x.reshape(rows, self.in_features), w).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def eligible(module: nn.Module) -> bool:
    if type(module) is not nn.Linear:
        return False
    w = module.weight
    return w.device.type == "cpu" and w.dtype in HALF and w.is_contiguous() and module.in_features % 32 == 0 \
        and kernel_works()


def use_cpu_gemv(model: nn.Module) -> nn.Module:
    return swap_modules(model, lambda name, module: GemvLinear(module) if eligible(module) else module)


@functools.cache
def kernel_works() -> bool:
    """Whether the kernel runs here and agrees with F.linear on a small random case (once per process)."""
    if cpu_kernels.library() is None:
        return False
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 96, generator=gen), torch.randn(40, 96, generator=gen)
    for dtype in HALF:
        expected = F.linear(x, w.to(dtype).float())
        if not torch.allclose(cpu_kernels.half_gemv(x, w.to(dtype)), expected, rtol=1e-4, atol=1e-4):
            return False
    return True
