import torch

from ventoux.cache import KVCache
from ventoux.model import banded_causal_mask


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
