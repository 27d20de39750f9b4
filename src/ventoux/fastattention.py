"""KernelAttention: decoding's attention (one new token a row over the KV cache) on ventoux's CPU kernel.

PyTorch's flash attention for the CPU spends most of a decode step's call on set-up (about 240 us for 257 slots of
8 KV heads on a 2-core Xeon, 3 ms for 4097) and, run between two weight streams that have flushed the caches, its
large code path runs cold. cpu_kernels.attend_decode reads each key and value once, in float32 sums; the same
numbers up to float32 rounding (tests/test_fastattention.py). Prefill, training and other devices keep
F.scaled_dot_product_attention.

    use_attention_kernel(model)   # in place, where the kernel runs (a CPU build that has it)
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from . import cpu_kernels
from .model import Attention


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
    changes), where this CPU's kernel build has the kernel."""
    if kernel_works():
        for module in model.modules():
            if type(module) is Attention:
                module.__class__ = KernelAttention
    return model


def kernel_works() -> bool:
    return _has_kernel(cpu_kernels.isa())


@functools.cache
def _has_kernel(isa: str | None) -> bool:
    lib = cpu_kernels.library()
    return lib is not None and hasattr(lib, "vx_attend_decode")
