"""KernelAttention: decoding's attention (one new token a row over the KV cache) on ventoux's CPU kernel.

PyTorch's flash attention for the CPU spends most of a decode step's call on set-up (about 240 us for 257 slots of
8 KV heads on a 2-core Xeon, 3 ms for 4097) and, run between two weight streams that have flushed the caches, its
large code path runs cold. cpu_kernels.attend_decode reads each key and value once, in float32 sums; the same
numbers up to float32 rounding (tests/test_fastattention.py). Prefill, training and other devices keep
F.scaled_dot_product_attention.

    use_attention_kernel(model)   # in place, where the kernel builds and passes its check
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .model import Attention, swap_class


class KernelAttention(Attention):
    """An Attention whose one-token step runs on cpu_kernels.attend_decode where it applies."""

    def attend_one(self, q, k, v, mask):
        if (q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float32)
                or not q.dtype == k.dtype == v.dtype or mask.dtype != torch.bool
                or q.shape[-1] % 16 or q.shape[2] > cpu_kernels.ATTEND_MAX_G
                or (torch.is_grad_enabled() and q.requires_grad) or torch.compiler.is_compiling()
                or not kernel_works()):
            return super().attend_one(q, k, v, mask)
        return cpu_kernels.attend_decode(q, k, v, mask.reshape(mask.shape[0], mask.shape[-1]))


def use_attention_kernel(model: nn.Module) -> nn.Module:
    """Each Attention of `model` becomes a KernelAttention (the same module and state: only its one-token step
    changes), where the kernel runs and agrees with PyTorch's attention (kernel_works)."""
    return swap_class(model, Attention, KernelAttention) if kernel_works() else model


@cpu_kernels.once_per_build
def kernel_works() -> bool:
    """Whether the kernel runs here and agrees with PyTorch's attention on small random cases."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 32, generator=gen) for n in (5, 21, 21))  # every loop's tail (S % 16, G)
    allowed = torch.rand(2, 21, generator=gen) > 0.3
    allowed[:, 0] = True
    for dtype in (torch.float32, torch.bfloat16):
        q2, k2, v2 = q.to(dtype), k.to(dtype), v.to(dtype)
        expected = F.scaled_dot_product_attention(q2.float(), k2.float(), v2.float(), attn_mask=allowed[:, None, None])
        if not torch.allclose(cpu_kernels.attend_decode(q2, k2, v2, allowed).float(), expected, rtol=1e-2, atol=1e-2):
            return False
    return True
