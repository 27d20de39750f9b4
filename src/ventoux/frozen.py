"""Products with a frozen weight that gradients still flow through (to the input), for LoRA on kernel bases.

    y = frozen_product(x, kernel, weight_rows)   # x (M, K) -> y (M, N); dx = dy @ W, no weight gradient

ventoux's C kernels (cpu_kernels) and PyTorch's packed int4/int8 products have no backward: called directly
their output has no grad_fn, so an adapter in an earlier layer would silently get no gradient. This wraps any
such product in an autograd.Function whose backward multiplies by the frozen weight, which `weight_rows(dtype)`
yields as (first row, rows) chunks: a quantized layer dequantizes a slice at a time instead of the whole
matrix (a 14336x4096 float32 copy is 235 MB).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

WeightRows = Callable[[torch.dtype], Iterator[tuple[int, torch.Tensor]]]


class _FrozenProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: Callable[[torch.Tensor], torch.Tensor], weight_rows: WeightRows):
        ctx.weight_rows = weight_rows
        return kernel(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        dx = None
        for start, w in ctx.weight_rows(dy.dtype):  # dx = sum over row slices of dy[:, slice] @ W[slice]
            part = dy[:, start:start + w.shape[0]] @ w
            dx = part if dx is None else dx.add_(part)
        return dx, None, None


def frozen_product(x: torch.Tensor, kernel: Callable[[torch.Tensor], torch.Tensor],
                   weight_rows: WeightRows) -> torch.Tensor:
    """kernel(x), differentiable with respect to x when x needs a gradient (the weight never gets one)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenProduct.apply(x, kernel, weight_rows)
    return kernel(x)
