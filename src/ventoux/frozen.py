"""Products with a frozen weight that gradients still flow through (to the input), for LoRA on kernel bases.

    y = frozen_product(x, kernel, weight_columns)   # x (M, K) -> y (M, N); dx = dy @ W, no weight gradient

ventoux's C kernels (cpu_kernels) and PyTorch's packed int4/int8 products have no backward: called directly
their output has no grad_fn, so an adapter in an earlier layer would silently get no gradient. This wraps any
such product in an autograd.Function whose backward multiplies by the frozen weight, which
`weight_columns(dtype)` yields as (first column, W[:, columns]) slices in dy's dtype (the activations'): a
quantized layer dequantizes a bounded slice at a time (a whole 14336x4096 weight in float32 is 235 MB), and
each column block of dx is one product, summed in the matrix product's own accumulator (float32 for bf16),
so dx is rounded once as F.linear's backward rounds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

WeightColumns = Callable[[torch.dtype], Iterator[tuple[int, torch.Tensor]]]


class _FrozenProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: Callable[[torch.Tensor], torch.Tensor], weight_columns: WeightColumns):
        ctx.weight_columns, ctx.in_features = weight_columns, x.shape[1]
        return kernel(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        dx = dy.new_empty(dy.shape[0], ctx.in_features)
        for start, w in ctx.weight_columns(dy.dtype):  # dx[:, columns] = dy @ W[:, columns]
            dx[:, start:start + w.shape[1]] = dy @ w
        return dx, None, None


def frozen_product(x: torch.Tensor, kernel: Callable[[torch.Tensor], torch.Tensor],
                   weight_columns: WeightColumns) -> torch.Tensor:
    """kernel(x), differentiable with respect to x when x needs a gradient (the weight never gets one)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenProduct.apply(x, kernel, weight_columns)
    return kernel(x)
