"""KernelAttention: decoding's attention (one new token a row over the KV cache) on ventoux's CPU kernels.

PyTorch's flash attention for the CPU spends most of a decode step's call on set-up (about 240 us for 257 slots of
8 KV heads on a 2-core Xeon, 3 ms for 4097) and, run between two weight streams that have flushed the caches, its
large code path runs cold. cpu_kernels.decode_attention reads each key and value once, in float32 sums (the same
numbers up to float32 rounding), and does the step's rotary and cache write in the same call, with the bits
PyTorch's ops give: ten cold PyTorch ops fewer a layer (tests/test_fastattention.py). Prefill, training and other
devices keep model.Attention's path.

    use_attention_kernel(model)   # in place, where the kernel builds and passes its check
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .model import Attention, apply_rotary, rotary_tables, swap_class


class KernelAttention(Attention):
    """An Attention whose one-token step over a KV cache (rotary, cache write and attention) runs as one
    cpu_kernels.decode_attention call where it applies."""

    def attend(self, q, k, v, cos, sin, mask, cache=None, step=None, layer=0):
        if not self._decodes_on_kernel(q, k, v, cos, sin, mask, cache, step):
            return super().attend(q, k, v, cos, sin, mask, cache, step, layer)
        b = q.shape[0]
        k_cache, v_cache = cache.buffers(layer, step)
        out = cpu_kernels.decode_attention_unchecked(q[:, 0], k[:, 0], v[:, 0], cos.view(b, -1), sin.view(b, -1),
                                                     k_cache, v_cache, step.slots.view(b), mask.view(b, -1))
        return out.view(b, 1, self.n_heads, self.head_dim).transpose(1, 2)

    def _decodes_on_kernel(self, q, k, v, cos, sin, mask, cache, step) -> bool:
        """Whether the step fits the kernel: the cache's buffers are contiguous (KVCache.buffers), the rest is
        checked here."""
        if cache is None or q.shape[1] != 1 or mask is None or not step.write_first:
            return False
        return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float32) and mask.dtype == torch.bool
                and all(t.dtype == q.dtype for t in (k, v, cos, sin)) and cache.dtype == q.dtype
                and self.head_dim % 16 == 0 and self.n_heads // self.n_kv_heads <= cpu_kernels.ATTEND_MAX_G
                and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous()
                and mask.is_contiguous()
                and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
                and not torch.compiler.is_compiling() and kernel_works())


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
    cos, sin = rotary_tables(torch.tensor([[3], [40]]), 32, 10000.0)
    cos, sin = cos.view(2, 32), sin.view(2, 32)
    slots = torch.tensor([20, 7])
    for dtype in (torch.float32, torch.bfloat16):
        q2, k2, v2 = q.to(dtype), k.to(dtype), v.to(dtype)
        expected = F.scaled_dot_product_attention(q2.float(), k2.float(), v2.float(), attn_mask=allowed[:, None, None])
        if not torch.allclose(cpu_kernels.attend_decode(q2, k2, v2, allowed).float(), expected, rtol=1e-2, atol=1e-2):
            return False
        # the fused step: its key and value written where PyTorch's ops write them, then the same attention
        new_q, new_k, new_v = q2[:, :, :1].reshape(2, -1), k2[:, :, 0], v2[:, :, 0]  # (2, 3*32) each
        k_cache, v_cache = k2.clone(), v2.clone()
        rotated_k = apply_rotary(new_k.view(2, 3, 32), cos.to(dtype)[:, None], sin.to(dtype)[:, None])
        k2[[0, 1], :, slots], v2[[0, 1], :, slots] = rotated_k, new_v.view(2, 3, 32)
        rotated_q = apply_rotary(new_q.view(2, 3, 1, 32), cos.to(dtype)[:, None, None], sin.to(dtype)[:, None, None])
        expected = cpu_kernels.attend_decode(rotated_q, k2, v2, allowed).reshape(2, -1)
        out = cpu_kernels.decode_attention(new_q, new_k.reshape(2, -1), new_v.reshape(2, -1), cos.to(dtype),
                                           sin.to(dtype), k_cache, v_cache, slots, allowed)
        if not (torch.equal(k_cache, k2) and torch.equal(v_cache, v2) and torch.equal(out, expected)):
            return False
    return True
