"""Arm's KleidiAI int4 micro-kernels, as PyTorch's aarch64 wheels run them behind aten._dyn_quant_pack_4bit_weight
and aten._dyn_quant_matmul_4bit: Int4Linear's "kernel=kleidiai" (qlinear.py), in ventoux's int4 layout.

KleidiAI's int4 is symmetric (a scale a group, int8 activations quantized per row, float32 in); ventoux's is
asymmetric: (q - 8) * scale + zero = (q - 8) * scale (the symmetric product) + zero, so the zero points add
(group sums of x) @ zeros^T in float32, exactly. The packed buffer cannot be unpacked, so the codes are read back
through the product itself (unpack), bit for bit: nothing is stored twice.
"""

from __future__ import annotations

import functools

import torch


def native() -> bool:
    """Whether PyTorch runs KleidiAI's kernels for its int4 ops here: compiled in (aarch64 wheels) and taken by
    this CPU (it needs the dot-product instructions: a Raspberry Pi 4 lacks them, and gets the reference)."""
    backend = getattr(torch.backends, "kleidiai", None)
    return backend is not None and backend.is_available() and packs()


@functools.cache
def packs() -> bool:
    """KleidiAI's packed weight is bytes; PyTorch's reference keeps the codes and scales as float32 values."""
    try:
        q, s = torch.full((8, 32), 0x88, dtype=torch.uint8), torch.ones(8, 2, dtype=torch.bfloat16)
        return torch.ops.aten._dyn_quant_pack_4bit_weight(q, s, None, 32, 64, 8).dtype == torch.uint8
    except (AttributeError, RuntimeError):  # PyTorch before 2.6 has no such op
        return False


def has_ops(device_type: str) -> bool:
    """The ops exist for this device: CPU only, from PyTorch 2.6 (natively or as PyTorch's reference code)."""
    return device_type == "cpu" and hasattr(torch.ops.aten, "_dyn_quant_matmul_4bit")


def unread(scales: torch.Tensor) -> torch.Tensor:
    """(N, K/g) bool: the groups whose codes the product cannot read back (unpack divides by the scale): zero,
    or so small or large that float32 products with it lose digits (quantize_int4 makes zero scales for
    constant groups, as zero-padded inputs; the others come only from odd checkpoints)."""
    magnitude = scales.float().abs()
    return ~((magnitude >= 2.0**-100) & (magnitude <= 2.0**100))


def pack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """The layer's tensors: PyTorch's packer reads our layout (N rows of K/2 bytes, even input in the low
    nibble, codes 0..15 for -8..7) with bfloat16 scales (N, K/g), and the packed buffer holds both. The layer
    keeps the scales (to read the codes back), the zeros in float32 (the correction's product; exact), and the
    codes of the groups the read-back cannot see (`unread`: usually none)."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    packed = torch.ops.aten._dyn_quant_pack_4bit_weight(qweight.contiguous(), scales.contiguous(), None, group, k, n)
    codes = qweight.reshape(n, k // group, group // 2)[unread(scales)]  # (groups, g/2)
    return {"packed": packed, "scales": scales, "zeros": zeros.float(), "unread": codes.contiguous()}


def matmul(x: torch.Tensor, packed: torch.Tensor, zeros: torch.Tensor, group: int, k: int, n: int) -> torch.Tensor:
    """x (M, K) @ ((q - 8) * scale + zero)^T in x's dtype."""
    x32 = x.float().contiguous()  # the ops take float32 (and quantize it to int8 per row)
    y = torch.ops.aten._dyn_quant_matmul_4bit(x32, packed, group, k, n)
    sums = x32.view(x32.shape[0], -1, group).sum(-1)  # (M, K/g)
    return y.addmm_(sums, zeros.T).to(x.dtype)


def unpack(packed: torch.Tensor, scales: torch.Tensor, unread_codes: torch.Tensor, group: int, k: int,
           rows: int = 256) -> torch.Tensor:
    """The codes (N, K/2) read from the packed buffer through the product itself: the input row
    e_2j - (128/127) e_2j+1 quantizes exactly to 127 and -128 with a zero point of 0 (so no other input adds
    anything, nor any rounding), and reads s * (127 d0 - 128 d1) / 127 with d = q - 8 of byte j: an integer up
    to 2040 in magnitude once divided by its group's scale s, from which d1 = -v mod 127 and then d0 follow.
    Exact (checked: a read that is not an integer raises); costs a product of K/2 rows, so only for saving,
    moving or the backward."""
    n = scales.shape[0]
    skipped = unread(scales)  # (N, K/g)
    step = scales.float().masked_fill(skipped, 1).repeat_interleave(group // 2, 1)  # (N, K/2) each byte's s
    qweight = torch.empty(n, k // 2, dtype=torch.uint8, device=scales.device)
    for b0 in range(0, k // 2, rows):
        b = torch.arange(b0, min(k // 2, b0 + rows), device=qweight.device)
        probe = torch.zeros(len(b), k, device=qweight.device)
        probe[torch.arange(len(b)), 2 * b] = 1
        probe[torch.arange(len(b)), 2 * b + 1] = -128 / 127
        out = torch.ops.aten._dyn_quant_matmul_4bit(probe, packed, group, k, n)  # (bytes, N)
        read = out.T * 127 / step[:, b]  # 127 d0 - 128 d1, to float rounding
        v = read.round()
        d1 = (-v + 8).remainder(127) - 8
        d0 = (v + 128 * d1) / 127
        if not ((read - v).abs() < 0.1).all() or not ((d0 >= -8) & (d0 <= 7)).all():
            raise RuntimeError("KleidiAI's packed int4 weight did not read back exactly")
        qweight[:, b] = ((d0 + 8).to(torch.uint8) | ((d1 + 8).to(torch.uint8) << 4))
    qweight.view(n, k // group, group // 2)[skipped] = unread_codes
    return qweight
