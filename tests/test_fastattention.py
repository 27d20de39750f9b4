"""Decoding's attention kernels against float64 attention (cpu_kernels.attend_decode), against PyTorch's rotary, cache
write and attention bit for bit (cpu_kernels.decode_attention), and in a loaded model against model.Attention's
path (fastattention.KernelAttention), under every kernel build this CPU runs."""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_ISAS, TINY, TINY_FULL, hf_model, ventoux_from_hf

from ventoux import cpu_kernels, fastattention
from ventoux.api import load_model
from ventoux.cache import KVCache
from ventoux.fastattention import KernelAttention
from ventoux.fastblock import KernelBlock
from ventoux.model import Attention, Block, apply_rotary, rotary_tables, swap_class
from ventoux.weights import save_hf

decode_attention = cpu_kernels.decode_attention  # the kernels themselves, before a test wraps them
decode_attention_unchecked = cpu_kernels.decode_attention_unchecked


def reference(q, k, v, allowed):
    """float64 attention of q (B, H, G, D) over k, v (B, H, S, D) where allowed (B, S); zeros where none is."""
    scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5  # (B, H, G, S)
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    weights = torch.nan_to_num(scores.softmax(-1))  # a row with no slot: 0/0 -> 0
    return weights @ v.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,g,s,d", [(1, 8, 4, 257, 128), (3, 2, 1, 5, 16), (2, 1, 6, 40, 48), (1, 2, 16, 19, 64)])
def test_attend_decode_is_attention_over_the_allowed_slots(kernel_isa, dtype, b, h, g, s, d):
    gen = torch.Generator().manual_seed(s + d)
    q, k, v = (3 * torch.randn(b, h, n, d, generator=gen).to(dtype) for n in (g, s, s))
    allowed = torch.rand(b, s, generator=gen) > 0.4
    allowed[:, 0] = True
    if b > 1:
        allowed[-1] = False  # a row that may attend to nothing (an idle row's mask never is, but it is defined)
    out = cpu_kernels.attend_decode(q, k, v, allowed)
    assert out.shape == q.shape and out.dtype == dtype
    expected = reference(q, k, v, allowed)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    else:  # float32 sums, one rounding to bf16 (2^-9 relative)
        torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=1e-3)
    # the mask is honoured: another mask's attention is far from it
    assert not torch.allclose(cpu_kernels.attend_decode(q, k, v, allowed.roll(1, 1)).double(), expected, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_scores_make_their_rows_nan_as_pytorchs_softmax(kernel_isa, dtype):
    # A NaN in a query, or a key making a score +inf, makes that query head's output NaN, as
    # F.scaled_dot_product_attention's softmax does; a -inf score weighs 0. The kernel's max skipped a NaN score and
    # its e^x clamp turned NaN into e^-87, so such rows came out finite. The other rows keep their values.
    gen = torch.Generator().manual_seed(0)
    b, h, g, s, d = 2, 2, 4, 19, 32
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for n in (g, s, s))
    q[0, 0, 1, 3] = float("nan")
    q[1, 1, :, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    k[1, 1, 7, 0] = float("inf")  # scores +inf for heads 0 and 2 of (1, 1), -inf for 1 and 3
    allowed = torch.ones(b, s, dtype=torch.bool)
    allowed[0, 11:] = False
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = cpu_kernels.attend_decode(q, k, v, allowed).float()
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float().reshape(b, h * g, 1, d), k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1),
        attn_mask=allowed[:, None, None, :]).reshape(b, h, g, d)
    nan = torch.isnan(expected)
    assert nan[0, 0, 1].all() and nan[1, 1, 0].all() and nan[1, 1, 2].all() and nan.sum() == 3 * d
    assert torch.equal(torch.isnan(out), nan)
    torch.testing.assert_close(out[~nan], expected[~nan], rtol=0.02 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)


def test_attend_decode_rejects_what_it_cannot_take():
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 9, 16)
    with pytest.raises(ValueError, match="one dtype"):
        cpu_kernels.attend_decode(q, k.bfloat16(), k.bfloat16(), torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="D % 16"):
        cpu_kernels.attend_decode(q[..., :8], k[..., :8], k[..., :8], torch.ones(1, 9, dtype=torch.bool))


def pytorch_decode_step(q, k, v, cos, sin, k_cache, v_cache, slots, allowed):
    """decode_attention's work in PyTorch's ops, as model.Attention does it: rotary, the cache write, attention."""
    b, h, d = allowed.shape[0], k_cache.shape[1], k_cache.shape[3]
    q = apply_rotary(q.reshape(b, -1, 1, d), cos[:, None, None], sin[:, None, None])  # (B, H*G, 1, D)
    k_cache[torch.arange(b), :, slots] = apply_rotary(k.reshape(b, h, d), cos[:, None], sin[:, None])
    v_cache[torch.arange(b), :, slots] = v.reshape(b, h, d)
    return cpu_kernels.attend_decode(q.reshape(b, h, -1, d), k_cache, v_cache, allowed).reshape(b, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,g,s,d", [(1, 8, 4, 129, 128), (3, 2, 1, 9, 16), (2, 1, 16, 20, 48)])
def test_decode_attention_is_pytorchs_rotary_cache_write_and_attention_bit_for_bit(kernel_isa, dtype, b, h, g, s, d):
    gen = torch.Generator().manual_seed(s + d)
    products = (3 * torch.randn(b, (g + 2) * h * d, generator=gen)).to(dtype)  # one joined product's rows
    q, k, v = products.split([g * h * d, h * d, h * d], -1)  # views, rows (g + 2) * h * d apart
    cos, sin = (t.view(b, d) for t in rotary_tables(torch.randint(-1, 5000, (b, 1), generator=gen), d, 1e6, dtype))
    k_cache, v_cache = (torch.randn(b, h, s, d, generator=gen).to(dtype) for _ in range(2))
    slots = torch.randperm(s, generator=gen)[:b]
    slots[-1] = s - 1  # the last slot (the scratch one in a KVCache)
    allowed = torch.rand(b, s, generator=gen) > 0.3
    allowed[torch.arange(b), slots] = True
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected = pytorch_decode_step(q, k, v, cos, sin, expected_k, expected_v, slots, allowed)
    out = cpu_kernels.decode_attention(q, k, v, cos, sin, k_cache, v_cache, slots, allowed)
    assert out.dtype == dtype and torch.equal(out, expected)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    assert not torch.equal(k_cache[torch.arange(b), :, slots], v_cache[torch.arange(b), :, slots])  # k was rotated


def test_decode_attention_rejects_what_it_cannot_take():
    q, k, cos = torch.randn(1, 64), torch.randn(1, 32), torch.randn(1, 16)
    cache, slots, allowed = torch.randn(1, 2, 9, 16), torch.tensor([3]), torch.ones(1, 9, dtype=torch.bool)
    with pytest.raises(ValueError, match="one dtype"):
        cpu_kernels.decode_attention(q, k, k, cos, cos, cache.bfloat16(), cache.bfloat16(), slots, allowed)
    with pytest.raises(ValueError, match="not \\(B, H\\*G\\*D\\)"):
        cpu_kernels.decode_attention(q[:, :40], k, k, cos, cos, cache, cache.clone(), slots, allowed)
    with pytest.raises(ValueError, match="slots within"):
        cpu_kernels.decode_attention(q, k, k, cos, cos, cache, cache.clone(), torch.tensor([9]), allowed)


@pytest.fixture(scope="module", params=["windowed", "full"])
def tiny_dir(request, tmp_path_factory):
    cfg = TINY if request.param == "windowed" else TINY_FULL
    folder = tmp_path_factory.mktemp("tiny") / request.param
    save_hf(ventoux_from_hf(hf_model(cfg)), folder)
    return folder, cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_models_decode_on_the_kernel_as_on_pytorchs_ops(kernel_isa, tiny_dir, dtype, monkeypatch):
    """Loading swaps in the kernel; decode steps over a cache that wraps (the windowed model) give the logits that
    model.Attention's path gives, for two rows at different positions, and the first layer's cache the same bits."""
    folder, cfg = tiny_dir
    model = swap_class(load_model(folder, cfg, dtype, "cpu"), KernelBlock, Block)  # blocks on the module path
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert attentions and all(type(m) is KernelAttention for m in attentions)
    calls = []
    monkeypatch.setattr(cpu_kernels, "decode_attention_unchecked", lambda *a: calls.append(1) or
                        decode_attention_unchecked(*a))
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    logits, first_layer = {}, {}
    for cls in (KernelAttention, Attention):
        for m in attentions:
            m.__class__ = cls
        cache = KVCache(cfg, 2, dtype=dtype, capacity=16)
        steps = []
        with torch.inference_mode():
            model(tokens[:, :3], torch.arange(3).expand(2, 3), cache=cache)
            for t in range(3, 20):  # row 1 runs 2 positions ahead of row 0
                positions = torch.tensor([[t], [t + 2]])
                steps.append(model(tokens[:, t:t + 1], positions, cache=cache))
        logits[cls], first_layer[cls] = torch.cat(steps, 1), (cache.k[0], cache.v[0])
    assert len(calls) == 17 * cfg.n_layers  # every decode step of every layer ran on the kernel
    tol = 1e-5 if dtype == torch.float32 else 0.03
    torch.testing.assert_close(logits[KernelAttention], logits[Attention], rtol=tol, atol=tol)
    assert all(map(torch.equal, first_layer[KernelAttention], first_layer[Attention]))  # its input is the same


def test_without_kernels_the_model_keeps_pytorchs_attention(tiny_dir, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, "none")
    folder, cfg = tiny_dir
    model = load_model(folder, cfg, torch.float32, "cpu")
    assert all(type(m) is Attention for m in model.modules() if isinstance(m, Attention))
    assert bool(KERNEL_ISAS) or cpu_kernels.library() is None


def step_inputs(cfg=TINY, dtype=torch.bfloat16, t=1, float_mask=False):
    """An attention step's arguments for two rows at positions 5 and 9 (and on, for t > 1) of a KVCache whose
    slots hold random earlier keys and values: q, k, v (B, T, heads * D) as the products give them."""
    gen = torch.Generator().manual_seed(cfg.head_dim + t)
    q, k, v = (torch.randn(2, t, n * cfg.head_dim, generator=gen).to(dtype)
               for n in (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads))
    cache = KVCache(cfg, 2, dtype=dtype, capacity=16)
    for buf in cache.k + cache.v:
        buf.copy_(torch.randn(buf.shape, generator=gen))
    positions = torch.tensor([[5], [9]]) + torch.arange(t)
    step = cache.prepare(positions)
    cos, sin = rotary_tables(positions, cfg.head_dim, cfg.rope_theta, dtype)
    mask = step.mask
    if float_mask:  # an additive mask, as SDPA also takes
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    return q, k, v, cos, sin, mask, cache, step


@pytest.fixture
def kernel_calls(kernel_isa, monkeypatch):
    """The list of KernelAttention's calls to the kernel (after its one-time check, which calls it too)."""
    assert fastattention.kernel_works()
    calls = []
    monkeypatch.setattr(cpu_kernels, "decode_attention_unchecked", lambda *a: calls.append(a) or
                        decode_attention_unchecked(*a))
    return calls


def kernel_attention(cfg=TINY):
    module = Attention(cfg)
    module.__class__ = KernelAttention
    return module


@pytest.mark.parametrize("case", ["float16", "float mask", "D % 16", "G > 16", "no kernel", "prefill", "no cache"])
def test_the_step_is_pytorchs_where_the_kernel_does_not_apply(kernel_calls, monkeypatch, case):
    cfg = {"D % 16": TINY.replace(head_dim=8), "G > 16": TINY.replace(n_heads=34)}.get(case, TINY)
    inputs = dict(cfg=cfg, dtype=torch.float16 if case == "float16" else torch.bfloat16,
                  float_mask=case == "float mask", t=3 if case == "prefill" else 1)
    if case == "no kernel":
        monkeypatch.setattr("ventoux.fastattention.kernel_works", lambda: False)
    module = kernel_attention(cfg)
    q, k, v, cos, sin, mask, cache, step = step_inputs(**inputs)
    if case == "no cache":  # a one-token sequence from position 0: no mask
        mask = cache = step = None
    out = module.attend(q, k, v, cos, sin, mask, cache, step)
    q, k, v, cos, sin, mask, cache, step = step_inputs(**inputs)
    if case == "no cache":
        mask = cache = step = None
    assert not kernel_calls and torch.equal(out, Attention.attend(module, q, k, v, cos, sin, mask, cache, step))


def test_gradients_flow_through_pytorchs_ops_and_inference_takes_the_kernel(kernel_calls):
    module = kernel_attention()
    q, k, v, cos, sin, mask, cache, step = step_inputs(dtype=torch.float32)
    q.requires_grad_(True)
    expected = module.attend(q, k, v, cos, sin, mask, cache, step)  # q needs a gradient: PyTorch's ops
    expected.sum().backward()
    assert not kernel_calls and q.grad is not None and q.grad.abs().sum() > 0
    for grad_mode, q_now in ((torch.enable_grad, q.detach()), (torch.no_grad, q)):  # no gradient needed, or none
        _, k, v, cos, sin, mask, kernels_cache, step = step_inputs(dtype=torch.float32)
        with grad_mode():
            out = module.attend(q_now, k, v, cos, sin, mask, kernels_cache, step)
        torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)
        assert torch.equal(kernels_cache.k[0], cache.k[0]) and torch.equal(kernels_cache.v[0], cache.v[0])
    assert len(kernel_calls) == 2
    slots, allowed = kernel_calls[0][7], kernel_calls[0][8]
    assert torch.equal(slots, step.slots[:, 0]) and torch.equal(allowed, step.mask[:, 0, 0])
    for needs_gradient in ("k", "v"):  # the key or the value alone needing one: PyTorch's ops
        q, k, v, cos, sin, mask, cache, step = step_inputs(dtype=torch.float32)
        (k if needs_gradient == "k" else v).requires_grad_(True)
        module.attend(q, k, v, cos, sin, mask, cache, step)
    assert len(kernel_calls) == 2
    with torch.no_grad():  # as many query heads a KV head as the kernel takes: on it
        module = kernel_attention(TINY.replace(n_heads=cpu_kernels.ATTEND_MAX_G * TINY.n_kv_heads))
        module.attend(*step_inputs(cfg=TINY.replace(n_heads=cpu_kernels.ATTEND_MAX_G * TINY.n_kv_heads)))
    assert len(kernel_calls) == 3


def test_a_kernel_that_disagrees_with_pytorch_is_not_used(kernel_isa, tiny_dir, monkeypatch):
    """The one-time check (as the products have): a kernel that does not write the new value is refused at load."""
    folder, cfg = tiny_dir

    def broken(q, k, v, cos, sin, k_cache, v_cache, slots, allowed):
        return decode_attention(q, k, v, cos, sin, k_cache, v_cache.clone(), slots, allowed)

    monkeypatch.setattr(cpu_kernels, "decode_attention", broken)
    fastattention.kernel_works.cache_clear()
    try:
        assert not fastattention.kernel_works()
        model = load_model(folder, cfg, torch.float32, "cpu")
        assert all(type(m) is Attention for m in model.modules() if isinstance(m, Attention))
    finally:
        fastattention.kernel_works.cache_clear()  # the next test checks the real kernel again
