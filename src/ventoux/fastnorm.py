"""KernelRMSNorm: a decode step's RMS norms, and the residual add before each feed-forward's, on ventoux's CPU kernel.

Between two weight streams, which leave the caches cold, each small PyTorch op of a decode step costs tens of
microseconds: an add and the norm's four ops took about 470 us a call on a 2-core Xeon VM, one kernel call about
180 (docs/benchmarks.md). cpu_kernels.add_rms_norm gives RMSNorm's numbers up to float32 rounding of the sum of
squares (tests/test_fastnorm.py). Prefill (more than MAX_ROWS rows), training and other devices keep PyTorch's ops.

    use_norm_kernel(model)   # in place, where the kernel builds and passes its check
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_kernels
from .model import RMSNorm, swap_class

MAX_ROWS = 32  # more rows (a prefill) run on PyTorch's ops, which use every thread


class KernelRMSNorm(RMSNorm):
    """An RMSNorm whose few-row calls, with or without the residual add before them, run on the kernel."""

    def forward(self, x):
        if not self._applies(x):
            return super().forward(x)
        return cpu_kernels.add_rms_norm_unchecked(x, self.weight, self.eps)

    def add_and_norm(self, x, residual):
        if not self._applies(x, residual):
            return super().add_and_norm(x, residual)
        return cpu_kernels.add_rms_norm_unchecked(x, self.weight, self.eps, residual)

    def _applies(self, x, residual=None) -> bool:
        w, residual = self.weight, x if residual is None else residual
        return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32)
                and x.dtype == residual.dtype == w.dtype and x.shape == residual.shape
                and x.shape[-1] % 16 == 0 and x.numel() <= MAX_ROWS * x.shape[-1]
                and x.is_contiguous() and residual.is_contiguous() and w.is_contiguous()
                and not (torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad or w.requires_grad))
                and not torch.compiler.is_compiling() and kernel_works())


def use_norm_kernel(model: nn.Module) -> nn.Module:
    """Each RMSNorm of `model` becomes a KernelRMSNorm (the same module and state: only its few-row calls change),
    where the kernel runs and agrees with RMSNorm (kernel_works)."""
    return swap_class(model, RMSNorm, KernelRMSNorm) if kernel_works() else model


@cpu_kernels.once_per_build
def kernel_works() -> bool:
    """Whether the kernel runs here and agrees with RMSNorm on small random rows."""
    gen = torch.Generator().manual_seed(0)
    x, residual, weight = (torch.randn(n, 48, generator=gen) for n in (3, 3, 1))
    for dtype in (torch.float32, torch.bfloat16):
        norm = RMSNorm(48, 1e-5).to(dtype)
        norm.weight.data.copy_(weight[0])
        x2, r2 = x.to(dtype), residual.to(dtype)
        h, n = cpu_kernels.add_rms_norm(x2, norm.weight.data, norm.eps, r2)
        if not (torch.equal(h, x2 + r2) and torch.allclose(n.float(), norm(h).float(), rtol=1e-2, atol=1e-3)):
            return False
    return True
