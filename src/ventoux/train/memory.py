"""The C heap of a training process: glibc's malloc (under PyTorch's CPU tensors) keeps what is freed.

    load ... add adapters ...
    memory.before_training(quantized, lean)  # both calls below, the second where lean (None: on if quantized)
    memory.release_freed()      # give back the loading's freed buffers (quantizing leaves hundreds of MB)
    memory.map_large_tensors()  # then train: each large tensor its own mapping, returned to the system on free

A training step allocates and frees tens of tensors of the size of a layer's activations (16 MB each for 2048
tokens of 4096 in bf16). By default glibc serves those under 32 MB from its heap, where small allocations
split the holes freed tensors leave, so a new tensor of the same size often takes fresh memory: on the
benchmark's LoRA step (4 layers, batch 4 x 512) the peak resident memory was 4.0-4.7 GiB where the tensors
alive at the peak hold 2.8. With every tensor from MAP_THRESHOLD up mapped on its own (mallopt
M_MMAP_THRESHOLD), the peak is what is alive; the price is fresh pages, which the kernel faults in and zeroes
on first touch: on a bf16 base's LoRA step (AMD EPYC, 1 thread, checkpointing on) 3.11 GiB against 4.03
without, but 36.1 tokens/s against 46.7 (every large temporary is fresh pages). So before_training maps
them by default only where memory is the point, a quantized base (`ventoux finetune --lean-memory`).
Transparent huge pages under the tensors (PyTorch's THP_MEM_ALLOC_ENABLE=1) did not pay it back: with the
kernel's defrag=madvise the faults compact memory, and the same step took 10% more CPU time than on 4 KB pages.
Other C libraries (musl, macOS): both calls do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MAP_THRESHOLD = 4 << 20  # bytes: the 1 MB blocks of a frozen layer's backward (frozen.py) stay in the heap


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def map_large_tensors(threshold: int = MAP_THRESHOLD) -> bool:
    """Serve allocations of `threshold` bytes and more with their own mappings (returned to the system when
    freed) for the rest of the process. False where the C library is not glibc."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)))


def release_freed() -> bool:
    """Return the heap's free pages to the system (malloc_trim(0)): the resident memory drops to what is in use."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(ctypes.c_size_t(0)))


def before_training(quantized: bool, lean: bool | None = None) -> bool:
    """Release the loading's freed buffers, then map large tensors where lean (None: lean for a quantized base,
    whose point is memory; a 16-bit base keeps the heap's speed). Returns whether it mapped them."""
    release_freed()
    lean = quantized if lean is None else lean
    return lean and map_large_tensors()
