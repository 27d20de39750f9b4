"""Quantized linear layers: Int8Linear, Int6Linear and Int4Linear, with fast kernels and a plain fallback.

    layer = Int4Linear.from_float(linear.weight, group_size=64)      # kernel picked for the weight's device
    layer = Int8Linear.from_float(linear.weight, kernel="fallback")
    layer = Int8Linear.from_float(linear.weight, group_size=32)     # int8-g32: llama.cpp Q8_0's size

int8: symmetric, w = q * scale, q in [-127, 127], one scale per output channel (scheme "int8", scales (N,)) or
per group of `group_size` inputs ("int8-g32" etc., scales (N, K/g): 8.5 bits a weight at g = 32, as Q8_0).
int4: asymmetric per group of `group_size` inputs, PyTorch's convention: w = (q - 8) * scale + zero, q in [0, 15]
(`zero` is the value of code 8). Scales and zeros are bfloat16 (what every packed kernel takes); q is computed
against the rounded scale, so the rounding moves the grid, not the weights' fit to it. int6: the same with
q in [0, 63] and w = (q - 32) * scale + zero (6.5 bits a weight at g = 64, llama.cpp Q6_K's 6.56); its kernels
are ours (vnni) and the fallback.

A module's state_dict is the device-independent layout (int8 qweight; int4 nibbles packed two per byte, even
input index in the low nibble; int6: its codes' low 4 bits as int4's in qweight and their top 2 bits four to a
byte in qhigh, input 4j + p at bits 2p of byte j; scales; zeros; the input width zero-padded to a multiple of 128,
a no-op for Mistral's dimensions) whatever kernel it runs: any device packing happens when tensors
are loaded or moved (`to()`), never per call. Kernels, in order of preference:
  vnni       ours (cpu_kernels.py), x86 CPUs with AVX-512 VNNI or AVX2 (named for the first): int8-quantized
             activations (blocks of 32, as llama.cpp does) times the weights in integer dot products; its own layout:
             the rows interleaved 16 at a time (cpu_kernels.tile_int8, tile_int4, tile_int6)
  int8pack   torch._weight_int8pack_mm (CPU; CUDA/MPS where PyTorch has it), bfloat16 activations; one scale a
             row only: int8 with groups (int8-g32, ...) never takes it
  kleidiai   Arm CPUs (aarch64 wheels, kleidiai.py): KleidiAI micro-kernels behind aten._dyn_quant_matmul_4bit, int8
             activations quantized per row (float32 in); symmetric int4 (a scale a group), so our zero points add
             (group sums of x) @ zeros^T in float32. Elsewhere the same ops run PyTorch's plain C++ reference:
             used there only when asked for (tests)
  int4pack   CPU: aten._weight_int4pack_mm_for_cpu; CUDA: aten._weight_int4pack_mm (tinygemm), bfloat16
  fallback   dequantize and F.linear in the input's dtype, any device: the reference the others are tested on
A kernel is used only once it matched the fallback on a small case on that device (once per process).
PyTorch's packed kernels run in bfloat16 (activations are cast): their float32 paths are 7-15x slower on CPU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels, kleidiai
from .errors import VentouxError
from .frozen import frozen_product

SCALE_DTYPE = torch.bfloat16
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32
INT6_GROUP_SIZE = 64  # int6's: 6.5 bits a weight, about Q6_K's 6.56
PAD = 128  # stored input widths are zero-padded to a multiple of this: every group size and kernel tiling fits


# ---- the device-independent layout -------------------------------------------------------------------
def _by_rows(fn):
    """Apply a row-wise quantizer 1024 rows at a time: the float32 temporaries of a 14336-row matrix would
    otherwise add a gigabyte to the peak memory of quantizing while loading."""

    def chunked(w: torch.Tensor, *args):
        # a meta skeleton (a quantized checkpoint's, before its tensors load) holds no memory, and each of its
        # ops costs the same whatever its size: whole, a 7B skeleton quantizes 5x faster (int4: 5.4 s to 1.0 s)
        rows = w.shape[0] if w.is_meta else 1024
        outs = None
        for i in range(0, w.shape[0], rows):
            parts = fn(w[i:i + rows].detach().float(), *args)
            if outs is None:  # filled in place: no list of parts to concatenate (and fragment the heap)
                outs = tuple(p.new_empty(w.shape[0], *p.shape[1:]) for p in parts)
            for out, part in zip(outs, parts):
                out[i:i + rows] = part
        return outs

    return chunked


@_by_rows
def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> qweight (N, K) int8, scales (N,) bfloat16 (group_size None: one a row) or (N, K/g)."""
    n, k = w.shape
    wg = w.reshape(n, k // (group_size or k), group_size or k)  # (N, G, g)
    scales = (wg.abs().amax(-1) / 127).to(SCALE_DTYPE)  # (N, G)
    s = scales.float().masked_fill(scales == 0, 1)
    q = (wg / s[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(n, k)
    return q, scales if group_size else scales[:, 0]


def _asymmetric(wg: torch.Tensor, levels: int):
    """Float groups (N, G, g) -> codes 0..levels-1 (N, G, g) float, scales and zeros (N, G) bfloat16: w = (q -
    middle) * scale + zero with middle = levels / 2 (`zero` is the value of the middle code)."""
    lo, hi = wg.amin(-1), wg.amax(-1)
    middle = levels // 2
    scales = ((hi - lo) / (levels - 1)).to(SCALE_DTYPE)
    zeros = (lo + middle * scales.float()).to(SCALE_DTYPE)
    s = scales.float().masked_fill(scales == 0, 1)
    q = ((wg - zeros.float()[..., None]) / s[..., None] + middle).round().clamp(0, levels - 1)
    return q, scales, zeros


@_by_rows
def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> qweight (N, K/2) uint8, scales (N, K/g) and zeros (N, K/g) bfloat16."""
    n, k = w.shape
    q, scales, zeros = _asymmetric(w.reshape(n, k // group_size, group_size), 16)
    return pack_int4(q.to(torch.uint8).reshape(n, k)), scales, zeros


@_by_rows
def quantize_int6(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, ...]:
    """(N, K) float -> qweight (N, K/2) uint8 (the codes' low 4 bits, packed as int4's), qhigh (N, K/4) uint8 (their
    top 2 bits), scales (N, K/g) and zeros (N, K/g) bfloat16."""
    n, k = w.shape
    q, scales, zeros = _asymmetric(w.reshape(n, k // group_size, group_size), 64)
    q = q.to(torch.uint8).reshape(n, k)
    return pack_int4(q & 15), pack_int2(q >> 4), scales, zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8, even k in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 values 0..15."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def pack_int2(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..3 -> (N, K/4) uint8, input 4j + p at bits 2p of byte j."""
    return q[:, 0::4] | (q[:, 1::4] << 2) | (q[:, 2::4] << 4) | (q[:, 3::4] << 6)


def unpack_int2(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/4) uint8 -> (N, K) uint8 values 0..3."""
    return torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """-> float32 (N, K), for scales (N,) or (N, K/g)."""
    if scales.dim() == 1:
        return qweight.float() * scales.float()[:, None]
    n, k = qweight.shape
    return (qweight.float().view(n, scales.shape[1], -1) * scales.float()[..., None]).reshape(n, k)


def _dequantize_codes(q: torch.Tensor, middle: int, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) -> float32 (q - middle) * scale + zero, one scale and zero a group."""
    n, k = q.shape
    groups = scales.shape[1]
    w = (q.float().view(n, groups, k // groups) - middle) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(n, k)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """-> float32 (N, K)."""
    return _dequantize_codes(unpack_int4(qweight), 8, scales, zeros)


def dequantize_int6(qweight: torch.Tensor, qhigh: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor) -> torch.Tensor:
    """-> float32 (N, K)."""
    return _dequantize_codes(unpack_int4(qweight) | (unpack_int2(qhigh) << 4), 32, scales, zeros)


# ---- the modules ---------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """Holds its weights in one kernel's layout; state_dict(), load_state_dict() and to() speak the
    device-independent one (CANONICAL names, dtypes). Subclasses: _shape, _fits, _pack/_unpack (PACKED), _mm."""

    CANONICAL: tuple[tuple[str, torch.dtype], ...] = ()
    KERNELS: tuple[str, ...] = ()
    PACKED: frozenset[str] = frozenset()  # kernels with a layout of their own (the others read CANONICAL)

    def __init__(self, *canonical: torch.Tensor, kernel: str | None = None, in_features: int | None = None):
        super().__init__()
        if kernel is not None and kernel not in self.KERNELS:
            raise VentouxError(f"unknown kernel {kernel!r} for {type(self).__name__}; valid: {self.KERNELS}")
        self.requested_kernel = kernel
        self.out_features, self.stored_in = self._shape(*canonical)  # stored_in: in_features padded
        self.in_features = in_features or self.stored_in
        if self.stored_in != _padded(self.in_features):
            raise VentouxError(f"quantized weights {self.out_features}x{self.stored_in} do not hold "
                               f"{self.in_features} inputs padded to a multiple of {PAD}")
        self._set(*canonical)

    @classmethod
    def kernels(cls, device) -> list[str]:
        """The kernels that run on this device, in order of preference."""
        return [k for k in cls.KERNELS if k == "fallback" or _kernel_works(cls, k, torch.device(device).type)]

    def _set(self, *canonical: torch.Tensor) -> None:
        """Pick the kernel for the tensors' device and store them in its layout."""
        canonical = tuple(t.to(dtype) for t, (_, dtype) in zip(canonical, self.CANONICAL))
        device = canonical[0].device
        if device.type == "meta":
            kernel = "fallback"  # a skeleton to be loaded into: no packing yet
        elif self.requested_kernel is not None:
            kernel = self.requested_kernel
            if not self._supports(kernel, device):
                raise VentouxError(f"kernel {kernel!r} is not available for {type(self).__name__} "
                                   f"({self.out_features}x{self.in_features}) on {device}; use kernel=None")
        else:
            kernel = next(k for k in self.KERNELS if self._supports(k, device))
        self._store(kernel, *canonical)

    def _supports(self, kernel: str, device: torch.device) -> bool:
        return kernel == "fallback" or (self._fits(kernel) and _kernel_works(type(self), kernel, device.type))

    def _fits(self, kernel: str) -> bool:
        return True

    def _store(self, kernel: str, *canonical: torch.Tensor) -> None:
        for name in list(self._buffers):
            del self._buffers[name]
        tensors = dict(zip([n for n, _ in self.CANONICAL], canonical))
        if kernel in self.PACKED:
            tensors = self._pack(kernel, **tensors)
        elif kernel != "fallback":  # raw-pointer kernels: int8pack crashes on unaligned memory (inside a file)
            tensors = {name: _aligned(t) for name, t in tensors.items()}
        for name, t in tensors.items():
            self.register_buffer(name, t, persistent=False)
        self.kernel = kernel
        self.canonical_types = tuple((t.shape, t.dtype) for t in canonical)  # checked by load_state_dict

    def canonical(self) -> tuple[torch.Tensor, ...]:
        """The device-independent tensors, on this module's device."""
        if self.kernel in self.PACKED:
            return self._unpack()
        return tuple(getattr(self, n) for n, _ in self.CANONICAL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.stored_in != self.in_features:
            x2 = F.pad(x2, (0, self.stored_in - self.in_features))  # zeros meet the zero-padded columns
        y = frozen_product(x2, self._mm, self._weight_columns)  # (M, N); gradients reach x (LoRA), never q
        return y.reshape(*x.shape[:-1], self.out_features)

    def _weight_columns(self, dtype: torch.dtype, budget: int = 1 << 24, block: int = 1 << 18):
        """The dequantized weight (N, stored_in) in `dtype`, about `budget` values (columns) at a time: the
        backward to the input (frozen.py). Each slice is dequantized `block` values at a time, in float32 and
        rounded once, as in dequantize(): blocks that stay in the CPU's caches run 4x faster than whole weights.
        vnni's tiles are read a block at a time (untile_block); other kernels' layouts are unpacked once here
        (slow, see Int4Linear._unpack)."""
        n, k = self.out_features, self.stored_in
        width = min(k, max(PAD, budget // n // PAD * PAD))  # multiples of PAD hold whole int4 groups
        rows = max(cpu_kernels.TILE, block // width // cpu_kernels.TILE * cpu_kernels.TILE)  # whole tiles
        canonical = None if self.kernel == "vnni" else self.canonical()
        device = next(iter(self._buffers.values())).device
        for start in range(0, k, width):
            stop = min(k, start + width)
            w = torch.empty(n, stop - start, dtype=dtype, device=device)
            for i in range(0, n, rows):
                if canonical is None:
                    self._dequantize_tiles(w[i:i + rows], i, min(n, i + rows), start, stop)
                    continue
                # per-row tensors (int8 scales) are whole; the others have K/c columns
                part = [t[i:i + rows, start * t.shape[1] // k:stop * t.shape[1] // k] if t.dim() == 2
                        else t[i:i + rows] for t in canonical]
                w[i:i + rows] = self.dequantize(*part)
            yield start, w

    def _dequantize_tiles(self, out: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> None:
        """out = the dequantized rows r0:r1, inputs c0:c1, read from vnni's tiles."""
        out.copy_(self.dequantize(*self._tile_block(r0, r1, c0, c1)))

    # state_dict, load_state_dict and to() see the device-independent layout
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for (name, _), t in zip(self.CANONICAL, self.canonical()):
            destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = [prefix + n for n, _ in self.CANONICAL]
        missing = [k for k in keys if k not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        for key, (shape, dtype) in zip(keys, self.canonical_types):
            new = state_dict[key]  # floating tensors may come in any float dtype (the loader casts them)
            same_kind = new.is_floating_point() if dtype.is_floating_point else new.dtype == dtype
            if new.shape != shape or not same_kind:
                raise VentouxError(f"tensor {key!r} is {new.dtype} {list(new.shape)} but this {type(self).__name__} "
                                   f"expects {dtype} {list(shape)}; the checkpoint's quantization config "
                                   "contradicts its tensors")
        self._set(*(state_dict[k] for k in keys))

    def _apply(self, fn, recurse=True):
        # only a device move changes anything: the quantized tensors keep their dtypes under .half() etc.
        here = next(iter(self._buffers.values())).device
        there = fn(torch.empty(0, device=here)).device
        if there != here:
            self._set(*(t.to(there) for t in self.canonical()))
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class Int8Linear(QuantizedLinear):
    """y = x @ (q * scale)^T with q int8 (N, K) and one scale per output channel (scales (N,), group_size None)
    or per group of inputs (scales (N, K/group_size))."""

    CANONICAL = (("qweight", torch.int8), ("scales", SCALE_DTYPE))
    dequantize = staticmethod(dequantize_int8)
    KERNELS = ("vnni", "int8pack", "fallback")
    PACKED = frozenset({"vnni"})  # rows interleaved 16 at a time (a byte permutation, see cpu_kernels.tile_int8)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int | None = None, kernel: str | None = None) -> Int8Linear:
        if group_size is not None and group_size not in GROUP_SIZES:
            raise VentouxError(f"int8 group size {group_size} must be one of {GROUP_SIZES} (or None: one a row)")
        return cls(*quantize_int8(_pad(weight), group_size), kernel=kernel, in_features=weight.shape[1])

    @staticmethod
    def _shape(qweight, scales):
        per_row = scales.dim() == 1 and scales.shape == qweight.shape[:1]
        grouped = (scales.dim() == 2 and scales.shape[0] == qweight.shape[0] and qweight.dim() == 2
                   and scales.shape[1] > 0 and qweight.shape[1] % scales.shape[1] == 0
                   and qweight.shape[1] // scales.shape[1] in GROUP_SIZES)
        if qweight.dim() != 2 or not (per_row or grouped):
            raise VentouxError(f"int8 qweight {list(qweight.shape)} and scales {list(scales.shape)} do not "
                               f"match: expected (N, K) and (N,), or (N, K/group) with a group in {GROUP_SIZES}")
        return tuple(qweight.shape)

    def _set(self, *canonical):
        scales = canonical[1]  # before the kernel's choice: _fits reads it
        self.group_size = None if scales.dim() == 1 else self.stored_in // scales.shape[1]
        super()._set(*canonical)

    def _fits(self, kernel):
        return kernel != "int8pack" or self.group_size is None  # PyTorch's kernel takes one scale a row

    def _store(self, kernel, *canonical):
        super()._store(kernel, *canonical)
        # the tiles as a plain attribute (a buffer's lookup through nn.Module costs 0.6 us a call), as Int4Linear
        self._tiles = (self.qweight, self.scales, self.group_size or self.stored_in) if kernel == "vnni" else None

    def _pack(self, kernel, qweight, scales):
        return dict(zip(("qweight", "scales"), cpu_kernels.tile_int8(qweight, scales)))

    def _unpack(self):
        return cpu_kernels.untile_int8(self.qweight, self.scales, self.out_features)

    def _dequantize_tiles(self, out, r0, r1, c0, c1):
        """With one scale a row (the output head's int8, whose backward runs once a loss chunk): q * scale in
        float32 written to out, rounded once as dequantize(), one copy fewer."""
        if self.group_size is not None:
            return super()._dequantize_tiles(out, r0, r1, c0, c1)
        q = cpu_kernels.untile_block(self.qweight, r0, r1, c0 // 4, c1 // 4)
        torch.mul(q, self.scales[r0:r1].float()[:, None], out=out)

    def _tile_block(self, r0, r1, c0, c1):
        """The canonical tensors of rows r0:r1 and inputs c0:c1, read from vnni's tiles (tile_int8)."""
        q = cpu_kernels.untile_block(self.qweight, r0, r1, c0 // 4, c1 // 4)
        if self.group_size is None:
            return q, self.scales[r0:r1]
        g = self.group_size
        return q, cpu_kernels.untile_block(self.scales[..., None], r0, r1, c0 // g, c1 // g)

    def _mm(self, x):
        if self.kernel == "vnni":
            if torch.compiler.is_compiling():
                return cpu_kernels.int8_gemv(x, *self._tiles, self.out_features).to(x.dtype)
            # the tiles were made by tile_int8
            return cpu_kernels.int8_gemv_unchecked(x, *self._tiles, self.out_features).to(x.dtype)
        if self.kernel == "int8pack":
            return torch._weight_int8pack_mm(x.to(SCALE_DTYPE), self.qweight, self.scales).to(x.dtype)
        if self.group_size is not None:
            return F.linear(x, dequantize_int8(self.qweight, self.scales).to(x.dtype))
        # (x @ q^T) * s: the scale factors out of the sum
        return F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)


class Int4Linear(QuantizedLinear):
    """y = x @ ((q - 8) * scale + zero)^T with q in 0..15, one (scale, zero) per group of inputs."""

    CANONICAL = (("qweight", torch.uint8), ("scales", SCALE_DTYPE), ("zeros", SCALE_DTYPE))
    dequantize = staticmethod(dequantize_int4)
    KERNELS = ("vnni", "kleidiai", "int4pack", "fallback")
    PACKED = frozenset({"vnni", "kleidiai", "int4pack"})

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE,
                   kernel: str | None = None) -> Int4Linear:
        if group_size not in GROUP_SIZES:
            raise VentouxError(f"int4 group size {group_size} must be one of {GROUP_SIZES}")
        return cls(*quantize_int4(_pad(weight), group_size), kernel=kernel, in_features=weight.shape[1])

    @staticmethod
    def _shape(qweight, scales, zeros):
        n, k = qweight.shape[0], 2 * qweight.shape[1]
        if scales.dim() != 2 or scales.shape[0] != n or scales.shape != zeros.shape or k % scales.shape[1]:
            raise VentouxError(f"int4 qweight {list(qweight.shape)}, scales {list(scales.shape)} and zeros "
                               f"{list(zeros.shape)} do not match: expected (N, K/2), (N, K/group), (N, K/group)")
        return n, k

    @classmethod
    def kernels(cls, device) -> list[str]:
        return [k for k in super().kernels(device) if k != "kleidiai" or kleidiai.native()]

    def _set(self, *canonical):
        self.group_size = self.stored_in // canonical[1].shape[1]  # before the kernel's choice: _fits reads it
        super()._set(*canonical)

    def _supports(self, kernel, device):
        if kernel == "kleidiai" and self.requested_kernel is None and not kleidiai.native():
            return False  # PyTorch's reference code for these ops: slow, so only when asked for
        return super()._supports(kernel, device)

    def _fits(self, kernel):
        if kernel == "int4pack":
            return self.out_features % 16 == 0  # the packers' shape limit
        if kernel == "kleidiai":  # one group a row is KleidiAI's channelwise kernel, which wants float32 scales
            return self.group_size < self.stored_in  # (PyTorch's groupwise limits, g % 32 and K % g, always hold)
        return True

    def _store(self, kernel, *canonical):
        self.group_size = self.stored_in // canonical[1].shape[1]
        super()._store(kernel, *canonical)
        # the tiles as a plain attribute: a buffer's lookup through nn.Module costs 0.6 us, per call
        self._tiles = (self.qweight, self.scales, self.zeros) if kernel == "vnni" else None

    def _pack(self, kernel, qweight, scales, zeros):
        if kernel == "vnni":  # rows interleaved 16 at a time (a byte permutation, see cpu_kernels.tile_int4)
            return dict(zip(("qweight", "scales", "zeros"), cpu_kernels.tile_int4(qweight, scales, zeros)))
        if kernel == "kleidiai":
            return kleidiai.pack(qweight, scales, zeros, self.group_size)
        scales_and_zeros = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()  # (K/g, N, 2)
        q = unpack_int4(qweight)  # (N, K)
        if qweight.device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        else:  # tinygemm wants the even input index in the high nibble
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, 0::2] << 4) | q[:, 1::2], 8)  # 8: K % 128
        return {"packed": packed, "scales_and_zeros": scales_and_zeros}

    def _int4pack_mm(self, x, scales_and_zeros):
        if x.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group_size, scales_and_zeros)

    def _tile_block(self, r0, r1, c0, c1):
        """The canonical tensors of rows r0:r1 and inputs c0:c1, read from vnni's tiles (tile_int4)."""
        g = self.group_size
        return (cpu_kernels.untile_block(self.qweight, r0, r1, c0 // 8, c1 // 8),
                *(cpu_kernels.untile_block(t[..., None], r0, r1, c0 // g, c1 // g) for t in (self.scales, self.zeros)))

    def _unpack(self):
        if self.kernel == "vnni":
            return cpu_kernels.untile_int4(self.qweight, self.scales, self.zeros, self.out_features)
        if self.kernel == "kleidiai":
            codes = kleidiai.unpack(self.packed, self.scales, self.unread, self.group_size, self.stored_in)
            return codes, self.scales, self.zeros.to(SCALE_DTYPE)
        # There is no unpack op for these layouts: multiplying the identity with scale 1 and zero 0 reads q - 8
        # (exact: small integers, one term per output). Slow on CPU (seconds per 4096x14336), so only for
        # saving or moving a packed module.
        sz = self.scales_and_zeros  # (K/g, N, 2)
        unit = torch.zeros_like(sz)
        unit[..., 0] = 1
        eye = torch.eye(self.stored_in, dtype=sz.dtype, device=sz.device)
        q = torch.cat([self._int4pack_mm(eye[i:i + 256], unit) for i in range(0, self.stored_in, 256)])  # (K, N)
        q = (q.T + 8).to(torch.uint8)  # (N, K)
        scales, zeros = sz.transpose(0, 1).unbind(-1)  # (N, K/g) each
        return pack_int4(q), scales.contiguous(), zeros.contiguous()

    def _mm(self, x):
        if self.kernel == "vnni":
            if torch.compiler.is_compiling():
                return cpu_kernels.int4_gemv(x, *self._tiles, self.group_size, self.out_features).to(x.dtype)
            # the tiles were checked when packed; bf16 in and out is converted in C
            return cpu_kernels.int4_gemv_unchecked(x, *self._tiles, self.group_size, self.out_features).to(x.dtype)
        if self.kernel == "kleidiai":
            return kleidiai.matmul(x, self.packed, self.zeros, self.group_size, self.stored_in, self.out_features)
        if self.kernel == "int4pack":
            return self._int4pack_mm(x.to(SCALE_DTYPE), self.scales_and_zeros).to(x.dtype)
        return F.linear(x, dequantize_int4(self.qweight, self.scales, self.zeros).to(x.dtype))


class Int6Linear(QuantizedLinear):
    """y = x @ ((q - 32) * scale + zero)^T with q in 0..63, one (scale, zero) per group of inputs: llama.cpp Q6_K's
    size at g = 64 (6.5 bits a weight against 6.56), as a whole model's scheme or an int4 model's head (the spec
    "int4-g64+output=int6": Q4_0's bytes). q's low 4 bits are held as int4's (qweight), its top 2 bits in qhigh."""

    CANONICAL = (("qweight", torch.uint8), ("qhigh", torch.uint8), ("scales", SCALE_DTYPE), ("zeros", SCALE_DTYPE))
    dequantize = staticmethod(dequantize_int6)
    KERNELS = ("vnni", "fallback")
    PACKED = frozenset({"vnni"})  # tiles of 16 rows, each block's nibbles then its top bits (cpu_kernels.tile_int6)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = INT6_GROUP_SIZE,
                   kernel: str | None = None) -> Int6Linear:
        if group_size not in GROUP_SIZES:
            raise VentouxError(f"int6 group size {group_size} must be one of {GROUP_SIZES}")
        return cls(*quantize_int6(_pad(weight), group_size), kernel=kernel, in_features=weight.shape[1])

    @staticmethod
    def _shape(qweight, qhigh, scales, zeros):
        n, k = qweight.shape[0], 2 * qweight.shape[1]
        if (qhigh.shape != (n, k // 4) or scales.dim() != 2 or scales.shape[0] != n or scales.shape != zeros.shape
                or k % scales.shape[1]):
            raise VentouxError(f"int6 qweight {list(qweight.shape)}, qhigh {list(qhigh.shape)}, scales "
                               f"{list(scales.shape)} and zeros {list(zeros.shape)} do not match: expected (N, K/2), "
                               "(N, K/4), (N, K/group), (N, K/group)")
        return n, k

    def _set(self, *canonical):
        self.group_size = self.stored_in // canonical[2].shape[1]
        super()._set(*canonical)

    def _store(self, kernel, *canonical):
        super()._store(kernel, *canonical)
        self._tiles = (self.qweight, self.scales, self.zeros) if kernel == "vnni" else None  # as Int4Linear

    def _pack(self, kernel, qweight, qhigh, scales, zeros):
        return dict(zip(("qweight", "scales", "zeros"), cpu_kernels.tile_int6(qweight, qhigh, scales, zeros)))

    def _unpack(self):
        return cpu_kernels.untile_int6(self.qweight, self.scales, self.zeros, self.out_features)

    def _tile_block(self, r0, r1, c0, c1):
        """The canonical tensors of rows r0:r1 and inputs c0:c1, read from vnni's tiles (tile_int6)."""
        tiles, g = slice(r0 // cpu_kernels.TILE, -(-r1 // cpu_kernels.TILE)), self.group_size
        return cpu_kernels.untile_int6(self.qweight[tiles, c0 // 32:c1 // 32], self.scales[tiles, c0 // g:c1 // g],
                                       self.zeros[tiles, c0 // g:c1 // g], r1 - r0)

    def _mm(self, x):
        if self.kernel == "vnni":
            if torch.compiler.is_compiling():
                return cpu_kernels.int6_gemv(x, *self._tiles, self.group_size, self.out_features).to(x.dtype)
            return cpu_kernels.int6_gemv_unchecked(x, *self._tiles, self.group_size, self.out_features).to(x.dtype)
        return F.linear(x, dequantize_int6(*self.canonical()).to(x.dtype))


class Int8Embedding(nn.Module):
    """The token embedding table in int8, one scale a row (quantize_int8 without groups; qweight and scales, as
    Int8Linear names them): half a 16-bit table's memory, as llama.cpp keeps its quantized files' tables
    quantized. A lookup dequantizes the rows it reads. The scales (bfloat16 values) are held in the model's
    dtype, which is the lookup's: .to(dtype) and the loader cast them with the model's other float tensors."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Embedding:
        qweight, scales = quantize_int8(weight)
        return cls(qweight, scales.to(weight.dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = tokens.reshape(-1)
        table = dequantize_int8(self.qweight[rows], self.scales[rows]).to(self.scales.dtype)
        return table.view(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def _padded(k: int) -> int:
    return -(-k // PAD) * PAD


def _pad(w: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N, K padded to a multiple of PAD) with zero columns."""
    extra = _padded(w.shape[1]) - w.shape[1]
    return F.pad(w, (0, extra)) if extra else w


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() and t.data_ptr() % 64 == 0 else t.clone(memory_format=torch.contiguous_format)


def _kernel_works(cls, kernel: str, device_type: str) -> bool:
    """Whether `kernel` runs on this device type and agrees with the fallback on a small random case (checked
    once per process and, for ours, per kernel build: VENTOUX_CPU_ISA may change it)."""
    return _kernel_check(cls, kernel, device_type, cpu_kernels.isa() if kernel == "vnni" else None)


@functools.cache
def _kernel_check(cls, kernel: str, device_type: str, isa: str | None) -> bool:
    if kernel == "vnni" and (device_type != "cpu" or cpu_kernels.library() is None):
        return False
    if device_type == "meta":  # a skeleton computes nothing: its fake int4pack product fails with AttributeError
        return False
    if kernel == "kleidiai" and not kleidiai.has_ops(device_type):
        return False
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 128, generator=gen), torch.randn(3, 128, generator=gen)
    ref = cls.from_float(w, kernel="fallback")
    try:
        fast = cls.from_float(w, kernel="fallback")
        fast._store(kernel, *(t.to(device_type) for t in ref.canonical()))
        out = fast(x.to(device_type)).cpu()
        # kleidiai's codes are read back through the library's arithmetic (kleidiai.unpack): checked too
        reads_back = kernel != "kleidiai" or all(torch.equal(a, b) for a, b in zip(fast.canonical(), ref.canonical()))
    except (RuntimeError, NotImplementedError):
        return False
    expected = ref(x)
    return reads_back and torch.allclose(out, expected, rtol=0.02, atol=0.02 * expected.abs().max().item())
