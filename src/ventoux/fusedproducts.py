"""One kernel call for the quantized products that read the same input: an attention's wq, wk and wv, and a
feed-forward's w1 and w3 (vLLM's QKVParallelLinear and MergedColumnParallelLinear, gpt-fast's wqkv).

In a decode step each product call costs more than its bytes. The activations are quantized again, the threads
start again, and the Python between the calls runs cold after each weight stream. Seven calls a block become
four. The layers keep their modules and state_dict: their tiles become row ranges of one concatenated tensor (no
second copy), so each output row is computed exactly as before. A module swapped out later (a LoRA adapter) or
re-stored (load_state_dict, .to()) ends the joint call for its group, and the layers run one by one.

    fuse_shared_inputs(model)   # in place, for vnni int8 / int6 / int4 layers (qlinear.py)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .model import Attention, FeedForward
from .qlinear import Int4Linear, Int6Linear, Int8Linear


def _joined(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """torch.cat of the layers' tiles along their rows, on huge pages as the tiles were (cpu_kernels)."""
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    return torch.cat(parts, out=cpu_kernels.empty_on_huge_pages(shape, parts[0].dtype, parts[0].device))


class SharedInputProducts:
    """The products of `layers` (vnni Int8Linear, Int4Linear or Int6Linear of one class, group and input width) as
    one call: x (..., in_features) -> one output per layer, each (..., its out_features)."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = tuple(layers)
        first = layers[0]
        self.sizes = [m.out_features for m in layers]
        # rows of the concatenation: every layer's out_features is a multiple of the 16-row tiles (joinable)
        self.tiles = tuple(_joined(parts) for parts in zip(*(m._tiles[:-1] if isinstance(m, Int8Linear)
                                                             else m._tiles for m in layers)))
        for i, m in enumerate(layers):  # each layer's tiles become its rows of the joined ones: the old are freed
            start = sum(self.sizes[:i])
            rows, tiles = slice(start, start + m.out_features), slice(start // cpu_kernels.TILE,
                                                                      (start + m.out_features) // cpu_kernels.TILE)
            views = [t[rows] if t.dim() == 1 else t[tiles] for t in self.tiles]  # int8's one scale a row: (N,)
            names = ("qweight", "scales", "zeros")[:len(views)]
            for name, view in zip(names, views):
                m._buffers[name] = view
            m._tiles = (*views, m._tiles[-1]) if isinstance(m, Int8Linear) else tuple(views)
        self.group = first._tiles[-1] if isinstance(first, Int8Linear) else first.group_size
        self.product = PRODUCTS[type(first)]
        self.in_features, self.stored_in = first.in_features, first.stored_in

    def applies(self, layers: tuple[nn.Module, ...], x: torch.Tensor) -> bool:
        """Whether these are still the joined layers, holding the joined tiles, and x needs no gradient."""
        return self.joins(layers) and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad) \
            and not torch.compiler.is_compiling()

    def joins(self, layers: tuple[nn.Module, ...]) -> bool:
        """Whether these are still the joined layers, holding the joined tiles."""
        if self.tiles is None:
            return False
        if layers != self.layers or any(m._tiles is None or m._tiles[0].untyped_storage().data_ptr() !=
                                        self.tiles[0].untyped_storage().data_ptr() for m in layers):
            self.tiles = None  # swapped or re-stored: the layers run alone from now on (the joined tensor lives
            return False       # on while a layer's tiles still view it)
        return True

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x2 = x.reshape(-1, self.in_features)
        if self.stored_in != self.in_features:
            x2 = F.pad(x2, (0, self.stored_in - self.in_features))  # zeros meet the zero-padded columns
        y = self.product(x2, *self.tiles, self.group, sum(self.sizes)).to(x.dtype)
        return y.reshape(*x.shape[:-1], -1).split(self.sizes, -1)


PRODUCTS = {Int8Linear: cpu_kernels.int8_gemv_unchecked, Int4Linear: cpu_kernels.int4_gemv_unchecked,
            Int6Linear: cpu_kernels.int6_gemv_unchecked}


def joinable(layers: list[nn.Module]) -> bool:
    first = layers[0]
    return (type(first) in PRODUCTS and all(type(m) is type(first) for m in layers)
            and all(m.kernel == "vnni" and m.out_features % cpu_kernels.TILE == 0 for m in layers)
            and len({(m.stored_in, m.in_features, m.group_size) for m in layers}) == 1
            and len({m._tiles[0].device for m in layers}) == 1)


def fuse_shared_inputs(model: nn.Module) -> nn.Module:
    """Each Attention's wq, wk, wv and each FeedForward's w1, w3 that are joinable run as one product."""
    for module in model.modules():
        if isinstance(module, Attention) and joinable(layers := [module.wq, module.wk, module.wv]):
            module.joined_qkv = SharedInputProducts(layers)
        elif isinstance(module, FeedForward) and joinable(layers := [module.w1, module.w3]):
            module.joined_gate_up = SharedInputProducts(layers)
    return model
