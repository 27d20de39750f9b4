"""Tensor names and the rotary permutation between Mistral's consolidated layout and HF's.

ventoux's own module names are the consolidated ones; its rotary is HF's (rotate halves), so
consolidated wq/wk rows are permuted on the way in (and back on the way out).
"""

from __future__ import annotations

import re

import torch

_GLOBAL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}
_HF_GLOBAL = {v: k for k, v in _GLOBAL.items()}
_HF_LAYER = {v: k for k, v in _LAYER.items()}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def to_hf(name: str) -> str | None:
    """ventoux/consolidated name -> HF name (None if unknown)."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def from_hf(name: str) -> str | None:
    """HF name -> ventoux/consolidated name (None if unknown)."""
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _HF_LAYER:
        return f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    return None


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Consolidated wq/wk rows (pairs 2i, 2i+1 rotate) -> HF rows (i, i + D/2 rotate)."""
    out_dim, dim = w.shape
    d = out_dim // n_heads
    return w.reshape(n_heads, d // 2, 2, dim).transpose(1, 2).reshape(out_dim, dim)


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of interleaved_to_halves: HF wq/wk rows -> consolidated rows."""
    out_dim, dim = w.shape
    d = out_dim // n_heads
    return w.reshape(n_heads, 2, d // 2, dim).transpose(1, 2).reshape(out_dim, dim)
