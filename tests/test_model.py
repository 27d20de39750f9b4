import pytest
import torch
import torch.nn.functional as F

from ventoux.cache import KVCache
from ventoux.model import banded_attention, banded_causal_mask


def test_full_forward_matches_transformers(pair):
    hf, vx = pair
    tokens = torch.randint(0, vx.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        out = vx(tokens)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_banded_mask_is_window_tokens_including_self():
    m = banded_causal_mask(6, 3, "cpu")
    assert m[5].tolist() == [False, False, False, True, True, True]
    assert m[0].tolist() == [True, False, False, False, False, False]
    assert banded_causal_mask(6, 6, "cpu") is None  # window covers everything: plain causal


@pytest.mark.parametrize("t,window,heads,kv_heads", [(64, 8, 4, 2), (61, 8, 4, 4), (17, 8, 2, 1), (300, 32, 4, 2)])
def test_banded_attention_equals_the_banded_mask_with_gradients(t, window, heads, kv_heads):
    gen = torch.Generator().manual_seed(t)
    q = torch.randn(2, heads, t, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, t, 16, generator=gen, requires_grad=True) for _ in range(2))
    gqa = heads != kv_heads
    out = banded_attention(q, k, v, window, gqa)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=banded_causal_mask(t, window, "cpu"), enable_gqa=gqa)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    weights = torch.randn(ref.shape, generator=gen)  # a loss that weighs every output differently
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    refs = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_then_decode_equals_full_forward(pair):
    hf, vx = pair
    cfg = vx.config
    t = 50
    tokens = torch.randint(0, cfg.vocab_size, (1, t), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(tokens).logits[0]
        for chunk in (1, 3, 8, 13):
            cache = KVCache(cfg, 1, capacity=4)
            outs, start = [], 0
            while start < 30:  # chunked prefill of 30 tokens ...
                end = min(start + chunk, 30)
                pos = torch.arange(start, end)[None]
                outs.append(vx(tokens[:, start:end], pos, cache=cache)[0])
                start = end
            for p in range(30, t):  # ... then one token at a time
                outs.append(vx(tokens[:, p:p + 1], torch.tensor([[p]]), cache=cache)[0])
            torch.testing.assert_close(torch.cat(outs), ref, atol=1e-4, rtol=0, msg=f"chunk={chunk}")


def test_last_only_prefill_runs_the_last_feed_forward_on_the_last_position_alone(pair):
    """A prefill that wants the last position's logits (the engine's) runs the last block's feed-forward on that
    position only; its logits equal transformers' there, and the cache it fills (every position's keys and
    values) decodes the next tokens as transformers does."""
    hf, vx = pair
    cfg = vx.config
    tokens = torch.randint(0, cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(3))
    rows = []
    hook = vx.layers[-1].feed_forward.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[1]))
    with torch.no_grad():
        ref = hf(tokens).logits[0]
        cache = KVCache(cfg, 1, capacity=4)
        out = [vx(tokens[:, :20], torch.arange(20)[None], cache=cache, last_only=True)[0]]
        for p in range(20, 30):
            out.append(vx(tokens[:, p:p + 1], torch.tensor([[p]]), cache=cache, last_only=True)[0])
    hook.remove()
    assert rows == [1] * 11
    torch.testing.assert_close(torch.cat(out), ref[19:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_rotary_are_bit_identical_to_transformers(pair, dtype):
    """The decode step's fewer ops (F.rms_norm, rotary tables rounded once, rotate-half by roll) compute HF's
    numbers exactly, not merely closely: a bf16 model's tokens do not drift from the reference's."""
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding, apply_rotary_pos_emb

    from ventoux.model import apply_rotary, rotary_tables

    hf, vx = (m.to(dtype) for m in pair)
    gen = torch.Generator().manual_seed(3)
    x = (4 * torch.randn(2, 9, vx.config.dim, generator=gen)).to(dtype)
    with torch.no_grad():
        assert torch.equal(vx.layers[1].ffn_norm(x), hf.model.layers[1].post_attention_layernorm(x))
        positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [4090, 4091, 5000, 7, 8, 9, 100, 31, 32]])
        q = torch.randn(2, vx.config.n_heads, 9, vx.config.head_dim, generator=gen).to(dtype)
        k = torch.randn(2, vx.config.n_kv_heads, 9, vx.config.head_dim, generator=gen).to(dtype)
        cos, sin = rotary_tables(positions, vx.config.head_dim, vx.config.rope_theta, dtype)
        rotary = MistralRotaryEmbedding(hf.config)  # float32 frequencies (hf.to(dtype) would round its buffer)
        ref_q, ref_k = apply_rotary_pos_emb(q, k, *rotary(x, positions))
    assert torch.equal(apply_rotary(q, cos, sin), ref_q) and torch.equal(apply_rotary(k, cos, sin), ref_k)
