"""KernelBlock: a decode step's whole transformer block as one call into ventoux's CPU kernels.

Between two weight streams, which leave the caches cold, each call from Python into a kernel or a PyTorch op costs
about 100 us on a 2-core Xeon VM, whatever it computes. A block's decode step made about ten (its two norms, four
products, attention, silu, the product and the add after it): over a millisecond a layer beside its weights.
cpu_kernels.decode_block runs the same kernels back to back in C (csrc/decode_block.h), in Block.forward's order
and with its roundings. It applies where every linear layer of the block is on one of ventoux's decode kernels
(vnni int8, int6 and int4, fusedproducts' joined groups, bfloat16 HalfLinear), with bfloat16 or float32 activations, to
decode steps of up to MAX_ROWS rows over a KVCache without autograd. Anything else (prefill, training, a LoRA
adapter, another device, torch.compile) runs model.Block.forward, on the other kernels where they apply.

    use_block_kernel(model)   # in place, after the other kernels' swaps and fuse_shared_inputs (api.load_model)
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from . import cpu_kernels, fastattention, fastnorm
from .cpu_kernels import BlockLayout, Product
from .fastlinear import HalfLinear
from .fusedproducts import SharedInputProducts
from .model import Block, swap_class
from .qlinear import Int4Linear, Int6Linear, Int8Linear

MAX_ROWS = 8  # rows the products' decode kernels take (csrc: GEMV_MAX_ROWS); more run as a prefill does


class KernelBlock(Block):
    """A Block whose decode steps run as one cpu_kernels.decode_block call where it applies."""

    _plan = None  # BlockPlan: what the call reads, as the block's modules held it when it was made

    def forward(self, x, cos, sin, mask, cache=None, step=None, layer=0, last_only=False):
        if cache is None or x.shape[1] != 1 or torch.compiler.is_compiling():
            return super().forward(x, cos, sin, mask, cache, step, layer, last_only)
        plan = self._plan
        if plan is None or not plan.holds():  # a module swapped (a LoRA adapter) or its weights re-stored
            self._plan = plan = BlockPlan(self)
        if plan.layout is None or not plan.applies(x, cos, mask, cache, step):
            return super().forward(x, cos, sin, mask, cache, step, layer, last_only)
        k_cache, v_cache = cache.buffers(layer, step)
        return cpu_kernels.decode_block_unchecked(plan.layout, x, cos, sin, k_cache, v_cache, step.slots, mask,
                                                  plan.scratch(x.dtype))


class BlockPlan:
    """A block's BlockLayout for decode_block (None where a part of it is not on a kernel decode_block runs), what
    it was made from, to tell when that changed (holds), and the guard a decode step passes (applies)."""

    def __init__(self, block: Block):
        attention, ff = block.attention, block.feed_forward
        norms, linears = (block.attention_norm, block.ffn_norm), (attention.wq, attention.wk, attention.wv,
                                                                   attention.wo, ff.w1, ff.w3, ff.w2)
        # each module in its parent, a quantized layer's tiles, a 16-bit weight and its memory: plain dict
        # lookups and pointer compares, as the check runs before every call
        children = ((block, ("attention_norm", "ffn_norm", "attention", "feed_forward")),
                    (attention, ("wq", "wk", "wv", "wo")), (ff, ("w1", "w2", "w3")))
        self.same = [(parent._modules, name, parent._modules[name]) for parent, names in children for name in names]
        # (a joined group's tiles are its layers' views: re-joined or re-stored, the layers' tiles change too)
        self.same += [(m.__dict__, "_tiles", m.__dict__["_tiles"]) for m in linears if "_tiles" in m.__dict__]
        weighted = [m for m in (*norms, *linears) if "weight" in m._parameters]  # the norms, 16-bit layers
        self.same += [(m._parameters, "weight", m._parameters["weight"]) for m in weighted]
        self.pointers = [(m.weight, m.weight.data_ptr()) for m in weighted]
        self.layout = layout_of(block)  # its pointers stay valid: `same` holds every tensor they point into
        self.dtype = block.attention_norm.weight.dtype
        self._scratch: dict[torch.dtype, int] = {}

    def holds(self) -> bool:
        """Whether the block still has the modules and weights the layout was made from."""
        for d, key, obj in self.same:
            if d.get(key) is not obj:
                return False
        for w, pointer in self.pointers:
            if w.data_ptr() != pointer:  # .to() and the like move a parameter's data, keeping the parameter
                return False
        return True

    def applies(self, x, cos, mask, cache, step) -> bool:
        return (x.device.type == "cpu" and x.dtype == self.dtype and x.dtype in (torch.bfloat16, torch.float32)
                and x.shape[0] <= MAX_ROWS and x.is_contiguous() and not torch.is_grad_enabled()
                and step.write_first and mask is not None and mask.dtype == torch.bool and mask.is_contiguous()
                and cos.dtype == x.dtype and cos.is_contiguous() and cache.dtype == x.dtype and kernel_works())

    def scratch(self, dtype: torch.dtype) -> torch.Tensor:
        """The call's scratch memory: one buffer a thread, shared by every block (they run one after another)."""
        size = self._scratch.get(dtype)
        if size is None:
            size = self._scratch[dtype] = cpu_kernels.decode_block_scratch_bytes(self.layout, MAX_ROWS, dtype)
        buffer = getattr(_scratch, "buffer", None)
        if buffer is None or buffer.numel() < size:
            _scratch.buffer = buffer = torch.empty(size, dtype=torch.uint8)
        return buffer


_scratch = threading.local()


KINDS = {Int8Linear: Product.INT8, Int4Linear: Product.INT4, Int6Linear: Product.INT6}  # decode_block's kinds


def product_of(m: nn.Module) -> Product | None:
    """A linear layer's arguments to its decode kernel; None where decode_block cannot run it."""
    if type(m) in KINDS and m.kernel == "vnni" and m.stored_in == m.in_features:
        tiles = m._tiles[:2] if type(m) is Int8Linear else m._tiles
        group = m._tiles[2] if type(m) is Int8Linear else m.group_size
        return Product(KINDS[type(m)], m.in_features, m.out_features, group, 0, *(t.data_ptr() for t in tiles))
    if type(m) is HalfLinear and m.bias is None and m.weight.dtype == torch.bfloat16 and m.weight.is_contiguous():
        return Product(Product.HALF, m.in_features, m.out_features, 0, 1, m.weight.data_ptr())
    return None


def joined_product(joined: SharedInputProducts | None, layers: tuple[nn.Module, ...]) -> Product | None:
    """A fusedproducts group's one product, where it still joins these layers."""
    if joined is None or not joined.joins(layers):
        return None
    return Product(KINDS[type(layers[0])], joined.in_features, sum(joined.sizes), joined.group, 0,
                   *(t.data_ptr() for t in joined.tiles))


def products_of(joined: SharedInputProducts | None, layers: tuple[nn.Module, ...]) -> cpu_kernels.Products | None:
    one = joined_product(joined, layers)
    each = [one] if one is not None else [product_of(m) for m in layers]
    if any(p is None for p in each):
        return None
    return cpu_kernels.Products((Product * 3)(*each), len(each))


def layout_of(block: Block) -> BlockLayout | None:
    """The block's BlockLayout, or None where one of its parts is not on a kernel decode_block runs."""
    attention, ff = block.attention, block.feed_forward
    norms = (block.attention_norm, block.ffn_norm)
    if not all(type(n) is fastnorm.KernelRMSNorm and n.weight.is_contiguous() and n.weight.dim() == 1 for n in norms):
        return None
    qkv = products_of(attention.joined_qkv, (attention.wq, attention.wk, attention.wv))
    gate_up = products_of(ff.joined_gate_up, (ff.w1, ff.w3))
    wo, w2 = product_of(attention.wo), product_of(ff.w2)
    if None in (qkv, gate_up, wo, w2) or type(attention) is not fastattention.KernelAttention \
            or attention.head_dim % 16 or attention.n_heads // attention.n_kv_heads > cpu_kernels.ATTEND_MAX_G \
            or block.attention_norm.eps != block.ffn_norm.eps or ff.w2.out_features % 16 or ff.w1.out_features % 16:
        return None
    return BlockLayout(qkv, gate_up, wo, w2, block.attention_norm.weight.data_ptr(), block.ffn_norm.weight.data_ptr(),
                       block.attention_norm.eps, attention.head_dim ** -0.5, ff.w2.out_features, ff.w1.out_features,
                       attention.n_heads, attention.n_kv_heads, attention.head_dim)


def use_block_kernel(model: nn.Module) -> nn.Module:
    """Each Block of `model` becomes a KernelBlock (the same module and state: only its decode steps change),
    where the kernels run and agree with Block.forward (kernel_works). Blocks whose layers are not on kernels
    decode_block runs keep Block.forward, checked cheaply at each step."""
    return swap_class(model, Block, KernelBlock) if kernel_works() else model


@cpu_kernels.once_per_build
def kernel_works() -> bool:
    """Whether decode_block runs here and agrees with Block.forward on a small random bfloat16 block."""
    from .cache import KVCache
    from .config import ModelConfig
    from .fastlinear import use_cpu_kernels
    from .model import rotary_tables

    if not (fastattention.kernel_works() and fastnorm.kernel_works()):
        return False
    cfg = ModelConfig(dim=128, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=8, head_dim=32,
                      norm_eps=1e-5, rope_theta=1e4, sliding_window=None, max_seq_len=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        block = Block(cfg).to(torch.bfloat16)
        x = torch.randn(2, 1, cfg.dim, dtype=torch.bfloat16)
    use_cpu_kernels(block)
    swap_class(block, type(block.attention_norm), fastnorm.KernelRMSNorm)
    swap_class(block, type(block.attention), fastattention.KernelAttention)
    layout = layout_of(block)
    if layout is None:
        return False
    positions = torch.tensor([[3], [5]])
    cos, sin = rotary_tables(positions, cfg.head_dim, cfg.rope_theta, torch.bfloat16)
    outputs, caches = [], []
    for run_kernel in (True, False):
        cache = KVCache(cfg, 2, dtype=torch.bfloat16, capacity=8)
        step = cache.prepare(positions)
        with torch.no_grad():
            if run_kernel:
                k_cache, v_cache = cache.buffers(0, step)
                scratch = torch.empty(cpu_kernels.decode_block_scratch_bytes(layout, 2, torch.bfloat16),
                                      dtype=torch.uint8)
                out = cpu_kernels.decode_block(layout, x.view(2, -1), cos.view(2, -1), sin.view(2, -1), k_cache,
                                               v_cache, step.slots.view(2), step.mask.view(2, -1), scratch)
            else:
                out = Block.forward(block, x, cos, sin, step.mask, cache, step, 0)
        outputs.append(out.view(2, -1).float())
        caches += [cache.k[0], cache.v[0]]
    return torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3]) \
        and torch.allclose(outputs[0], outputs[1], rtol=0.02, atol=0.02)
