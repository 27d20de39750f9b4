"""The Mistral transformer in plain torch: no file I/O, no sampling, no quantization flags.

    model = Transformer(cfg)
    logits = model(tokens)                            # (B, T) -> (B, T, vocab), from position 0
    logits = model(tokens, positions, cache=cache)    # incremental, through a KVCache

Module names follow Mistral's consolidated layout (tok_embeddings, layers.N.attention.wq, ...);
rotary follows the HF "rotate half" layout, so HF weights load unpermuted (weights.py permutes
consolidated q/k on the way in and out).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad and not self.weight.requires_grad and x.dtype != torch.float32:
            return _FrozenRMSNorm.apply(x, self.weight, self.eps)  # LoRA training: the same numbers, less memory
        # the statistics in float32, whatever the weights' dtype; F.rms_norm is x * rsqrt(mean(x^2) + eps) in one
        # op, bit-identical to HF's three (tests/test_model.py), 9 fewer small ops a decode step
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, its norm): a block's residual add and the norm after it, one kernel call in
        fastnorm.KernelRMSNorm."""
        h = x + residual
        return h, self(h)


class _FrozenRMSNorm(torch.autograd.Function):
    """RMSNorm.forward's arithmetic with a frozen gain, keeping the input as it comes (bf16) and the float32
    1/rms per row for backward, where autograd would keep the input's float32 copy (twice the bytes: 32 MB a
    norm for 2048 tokens of 4096). Backward recomputes that copy and runs autograd's own formulas."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, r, weight)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, r, weight = ctx.saved_tensors
        xf = x.float()
        g = (dy * weight).float()  # through weight * t and t = (xf * r).to(dtype)
        dr = (g * xf).sum(-1, keepdim=True)  # through xf * r: r's gradient (summed over the broadcast)
        dm = dr * (-0.5 * r.pow(3))  # through rsqrt(m + eps)
        dx = g * r + xf * (2.0 * dm / x.shape[-1])  # xf * r's, plus mean(xf^2)'s: 2 xf dm / D
        return dx.to(x.dtype), None, None


class _SiluMul(torch.autograd.Function):
    """silu(a) * b, keeping a and b for backward and recomputing silu(a) there: autograd would also keep
    silu(a), one more (tokens, hidden_dim) tensor per block (56 MB for 2048 tokens of 14336 in bf16)."""

    ROWS = 1 << 22  # values of one block of rows in backward's temporaries (8 MB in bf16)

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, dy):
        """autograd's formulas a block of rows at a time, b's gradient written over dy: dy is the gradient of
        w2's input (FeedForward's product feeds w2 alone, whose backward makes it), which nothing else reads.
        So two tensors of the block's widest shape come to life here, not three, at training's peak."""
        a, b = ctx.saved_tensors
        dy = dy.contiguous()  # an expanded gradient (of a sum) is copied before it is written over
        a2, b2, dy2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dy.view(-1, dy.shape[-1])
        da = torch.empty_like(dy) if ctx.needs_input_grad[0] else None
        da2 = None if da is None else da.view(dy2.shape)
        step = max(1, _SiluMul.ROWS // a2.shape[1])
        for r in (slice(i, i + step) for i in range(0, a2.shape[0], step)):
            if da2 is not None:  # before dy[r] is overwritten below
                torch.mul(dy2[r], b2[r], out=da2[r])
                torch.ops.aten.silu_backward.grad_input(da2[r], a2[r], grad_input=da2[r])
            if ctx.needs_input_grad[1]:
                dy2[r].mul_(F.silu(a2[r]))
        return da, dy if ctx.needs_input_grad[1] else None


_REMAKES: dict = {}  # the open remade_in_backward contexts (training runs in one thread): a tensor's key -> remake


def _key(t: torch.Tensor) -> tuple:  # not t itself: holding it would keep it
    return t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype


def _unpack(kept):
    if isinstance(kept, torch.Tensor):
        return kept
    with torch.no_grad():
        return kept()


def _other_hooks() -> bool:
    """Whether saved-tensor hooks are active; True where this PyTorch cannot tell (older ones lack the query)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


_UNCHANGED = contextlib.nullcontext()  # reusable: inference takes it, three times a block a decode step


def remade_in_backward(t: torch.Tensor, remake):
    """Within: a tensor saved for backward that is `t` is not kept; `remake()` rebuilds it, bit-identical, in
    backward from tensors kept anyway. For an input that adapters keep (their A product's gradient needs it)
    and that is a cheap function of activations its producer keeps too. Contexts nest; nothing changes without
    gradients, or where other saved-tensor hooks are active (activation checkpointing keeps nothing of the
    block, and these would keep what the remakes need)."""
    if not (torch.is_grad_enabled() and t.requires_grad):
        return _UNCHANGED
    return _remaking(t, remake)


@contextlib.contextmanager
def _remaking(t: torch.Tensor, remake):
    outermost, key = not _REMAKES, _key(t)
    if key in _REMAKES or (outermost and _other_hooks()):
        yield
        return
    _REMAKES[key] = remake
    try:
        if outermost:
            with torch.autograd.graph.saved_tensors_hooks(lambda s: _REMAKES.get(_key(s), s), _unpack):
                yield
        else:
            yield
    finally:
        del _REMAKES[key]


@functools.cache
def _inverse_frequencies(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a plain tensor, usable with autograd on, though first made in inference
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) positions -> cos, sin of shape (B, 1, T, head_dim): computed in float32 (as HF computes them), then
    rounded to `dtype`, the activations', once for every layer. sin's first half is negated: apply_rotary's."""
    freqs = positions[..., None].float() * _inverse_frequencies(head_dim, theta, positions.device)  # (B, T, D/2)
    cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
    return torch.cat([cos, cos], dim=-1)[:, None], torch.cat([-sin, sin], dim=-1)[:, None]  # (B, 1, T, D)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]: that is roll(x) = [x2, x1] times the
    sin table with its first half negated (-a * b and a * -b are the same number), 4 ops instead of 8."""
    return x * cos.to(x.dtype) + x.roll(x.shape[-1] // 2, -1) * sin.to(x.dtype)


def banded_causal_mask(t: int, window: int | None, device) -> torch.Tensor | None:
    """(T, T) bool mask, True = may attend: j <= i and i - j < window. None when plain causal."""
    if window is None or window >= t:
        return None
    i = torch.arange(t, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


def attends_by_blocks(t: int, window: int | None) -> bool:
    """Whether a T-token sequence without a cache is attended block by block (banded_attention)."""
    return window is not None and t > 2 * window


def banded_attention(q, k, v, window: int, gqa: bool) -> torch.Tensor:
    """Causal attention within `window` for a sequence from position 0, block by block: each block of `window`
    queries sees its own block and the one before (2W keys), not all T, so the cost grows with T, not T^2.
    q (B, H, T, D), k and v (B, Hkv, T, D) -> (B, H, T, D); the same result as the (T, T) banded mask."""
    b, h, t, d = q.shape
    n = -(-t // window)  # blocks; the last one is padded at the end (its padding is only seen by padding)
    q, k, v = (F.pad(x, (0, 0, 0, n * window - t)) for x in (q, k, v))

    def blocks(x):  # (B, h, n*W, D) -> (B, n, h, W, D)
        return x.view(b, x.shape[1], n, window, d).transpose(1, 2)

    def with_previous(x):  # (B, n, h, W, D) -> (B*n, h, 2W, D): the block before (zeros for block 0), then this one
        return torch.cat([F.pad(x, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1], x], dim=3).flatten(0, 1)

    i = torch.arange(window, device=q.device)
    j = torch.arange(2 * window, device=q.device)
    # query i of a block may see key j of its 2W when their distance W + i - j is in [0, W)
    mask = (j[None, :] > i[:, None]) & (j[None, :] <= i[:, None] + window)
    mask = mask.expand(b, n, window, 2 * window).clone()
    mask[:, 0, :, :window] = False  # block 0 has no block before it
    out = F.scaled_dot_product_attention(blocks(q).flatten(0, 1), with_previous(blocks(k)), with_previous(blocks(v)),
                                         attn_mask=mask.flatten(0, 1)[:, None], enable_gqa=gqa)  # (B*n, H, W, D)
    return out.view(b, n, h, window, d).transpose(1, 2).reshape(b, h, n * window, d)[:, :, :t]


class Attention(nn.Module):
    joined_qkv = None  # fusedproducts.SharedInputProducts: wq, wk and wv as one kernel call

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.window = cfg.sliding_window

    def forward(self, x, cos, sin, mask, cache=None, step=None, layer=0):
        b, t, _ = x.shape
        q, k, v = self.qkv(x)
        out = self.attend(q, k, v, cos, sin, mask, cache, step, layer)  # (B, H, T, D)
        heads = out.transpose(1, 2).reshape(b, t, -1)  # (B, H, T, D) -> (B, T, H*D): a copy
        # attention keeps its output for its own backward: wo's adapter need not keep this copy of it too
        with remade_in_backward(heads, lambda: out.transpose(1, 2).reshape(b, t, -1)):
            return self.wo(heads)  # (B, T, dim)

    def attend(self, q, k, v, cos, sin, mask, cache=None, step=None, layer=0):
        """The products' q (B, T, H*D), k and v (B, T, Hkv*D) -> attention's output (B, H, T, D): rotary, the
        cache's update, then attention. fastattention.py runs a decode step's as one kernel call."""
        b, t, _ = q.shape
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, step)  # (B, Hkv, S, D)
        gqa = self.n_heads != self.n_kv_heads
        if t == 1 and mask is not None:  # one token a row (decoding), over the cache
            g = self.n_heads // self.n_kv_heads
            out = self.attend_one(q.reshape(b, self.n_kv_heads, g, self.head_dim), k, v, mask)
            return out.reshape(b, self.n_heads, 1, self.head_dim)
        if cache is None and attends_by_blocks(t, self.window):
            return banded_attention(q, k, v, self.window, gqa)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def qkv(self, x):
        """wq(x), wk(x), wv(x): one kernel call where fusedproducts joined the three."""
        joined = self.joined_qkv
        if joined is not None and joined.applies((self.wq, self.wk, self.wv), x):
            return joined(x)
        return self.wq(x), self.wk(x), self.wv(x)

    def attend_one(self, q, k, v, mask):
        """One new token a row: q (B, Hkv, G, D), the G query heads sharing each KV head, are that head's queries,
        so one plain attention call serves them (enable_gqa copies K and V per query head: 6x slower in bf16 on
        the CPU); k, v (B, Hkv, S, D); mask (B, 1, 1, S) -> (B, Hkv, G, D). fastattention.py runs the whole
        step (rotary, cache write, this) on a kernel."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class FeedForward(nn.Module):
    joined_gate_up = None  # fusedproducts.SharedInputProducts: w1 and w3 as one kernel call

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up

    def forward(self, x):
        a, b = self.gate_up(x)
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            # training: the same numbers, two activations fewer kept: silu(a), and w2's input (its adapter
            # would keep it), remade from a and b, which _SiluMul keeps
            m = _SiluMul.apply(a, b)
            with remade_in_backward(m, lambda: F.silu(a).mul_(b)):  # one (tokens, hidden) tensor made, not two
                return self.w2(m)
        return self.w2(F.silu(a) * b)

    def gate_up(self, x):
        """w1(x), w3(x): one kernel call where fusedproducts joined the two."""
        joined = self.joined_gate_up
        if joined is not None and joined.applies((self.w1, self.w3), x):
            return joined(x)
        return self.w1(x), self.w3(x)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask, cache=None, step=None, layer=0, last_only=False):
        """last_only: only the last position's output is wanted (the last block of a prefill whose logits are
        the last position's): attention runs on every position, whose keys and values the cache keeps, and
        the feed-forward on the last alone, as llama.cpp skips the unused rows (its inp_out_ids)."""
        # each norm keeps its input: the adapters of the linears after it need not keep its output too
        n = self.attention_norm(x)
        with remade_in_backward(n, lambda: self.attention_norm(x)):
            a = self.attention(n, cos, sin, mask, cache, step, layer)
        if last_only:
            x, a = x[:, -1:], a[:, -1:]
        h, n = self.ffn_norm.add_and_norm(x, a)
        with remade_in_backward(n, lambda: self.ffn_norm(h)):
            return h + self.feed_forward(n)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype: the final norm's gain (the embedding table may be quantized)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab), or (B, 1, vocab) with last_only.

        Without a cache the sequence starts at position 0 (positions must be None or 0..T-1).
        With a cache, positions (B, T) are each row's absolute positions, consecutive per row.
        """
        return self.logits(self.hidden_states(tokens, positions, cache, last_only))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last block's output -> float32 logits (the final norm, then the head)."""
        return self.output(self.norm(hidden)).float()

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                      last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) -> the last block's output (B, T, dim), or (B, 1, dim) with last_only, before the final
        norm and the head."""
        b, t = tokens.shape
        if positions is None:
            positions = torch.arange(t, device=tokens.device).expand(b, t)
        x = self.tok_embeddings(tokens)  # (B, T, dim)
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        step = None
        if cache is None:
            window = self.config.sliding_window  # long sequences need no (T, T) mask: see banded_attention
            mask = None if attends_by_blocks(t, window) else banded_causal_mask(t, window, tokens.device)
        else:
            step = cache.prepare(positions)
            mask = step.mask
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, step, i, last_only and i == len(self.layers) - 1)
        return x


def swap_class(model: nn.Module, old: type, new: type) -> nn.Module:
    """Each submodule of exactly class `old` becomes a `new`, a subclass: the same module and state, other
    methods (the CPU kernels' fast paths: fastattention.py, fastnorm.py). In place."""
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
    return model


def swap_modules(model: nn.Module, transform) -> nn.Module:
    """Replace, in place, each submodule for which transform(name, module) returns another module."""
    for name, module in list(model.named_modules()):
        new = transform(name, module)
        if new is not module:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    return model
