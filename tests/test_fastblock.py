"""A decode step's block as one kernel call (cpu_kernels.decode_block, fastblock.KernelBlock), against model.Block's
own path on the other kernels and PyTorch's ops (itself pinned to transformers in tests/test_model.py), under every
kernel build this CPU runs: its logits, its KV cache bit for bit, every block of every step on the kernel; and the
cases where it must step aside (adapters, gradients, prefill, many rows, re-stored weights)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, hf_model, ventoux_from_hf

from ventoux import cpu_kernels, fastblock
from ventoux.api import load_model
from ventoux.cache import KVCache
from ventoux.fastblock import MAX_ROWS, KernelBlock
from ventoux.lora import LoraConfig, add_adapter
from ventoux.model import Attention, Block, RMSNorm, rotary_tables
from ventoux.weights import save_hf

# widths the quantized layers take unpadded (multiples of 128); a window of 8 so that the cache wraps
CFG = TINY.replace(dim=128, hidden_dim=256, n_heads=4, n_kv_heads=2, head_dim=32, n_layers=2)
decode_block = cpu_kernels.decode_block_unchecked  # the kernel itself, before a test wraps it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blocks") / "model"
    save_hf(ventoux_from_hf(hf_model(CFG)), folder)
    return folder


@pytest.fixture
def block_calls(kernel_isa, monkeypatch):
    """The list of KernelBlock's calls to the kernel (after its one-time check, which calls it too)."""
    assert fastblock.kernel_works()
    calls = []
    monkeypatch.setattr(cpu_kernels, "decode_block_unchecked", lambda *a: calls.append(a) or decode_block(*a))
    return calls


def decode(model, rows=2, steps=8, cfg=CFG):
    """Logits of a 5-token prefill in two chunks (the second's last position only, as the engine asks) and
    `steps` decode steps for `rows` rows at different positions, and the cache."""
    tokens = torch.randint(0, cfg.vocab_size, (rows, 5 + steps), generator=torch.Generator().manual_seed(3))
    cache = KVCache(cfg, rows, dtype=model.dtype, capacity=32)
    with torch.inference_mode():
        out = [model(tokens[:, :3], torch.arange(3).expand(rows, 3), cache=cache),
               model(tokens[:, 3:5], torch.arange(3, 5).expand(rows, 2), cache=cache, last_only=True)]
        for t in range(5, 5 + steps):  # each row one position further than the one before
            out.append(model(tokens[:, t:t + 1], torch.arange(t, t + rows)[:, None], cache=cache))
    return torch.cat(out, 1), cache


def as_blocks(model, cls):
    for m in model.modules():
        if isinstance(m, Block):
            m.__class__ = cls
    return model


@pytest.mark.parametrize("scheme,dtype", [("int8", torch.bfloat16), ("int8-g32", torch.bfloat16),
                                          ("int4", torch.bfloat16), ("int4", torch.float32), (None, torch.bfloat16),
                                          ("int6-g32", torch.bfloat16)])
def test_every_decode_step_of_every_block_runs_on_the_kernel_as_on_the_blocks_path(kernel_isa, model_dir, scheme,
                                                                                     dtype, block_calls):
    model = load_model(model_dir, CFG, dtype, quantize=scheme)
    assert all(type(m) is KernelBlock for m in model.layers)
    on_kernel, cache = decode(model)
    assert len(block_calls) == 8 * CFG.n_layers  # the decode steps; the prefill runs Block.forward
    expected, expected_cache = decode(as_blocks(model, Block))
    assert len(block_calls) == 8 * CFG.n_layers
    # the first layer's cache holds the same bits; later layers read outputs rounded apart by silu's e^x
    assert torch.equal(cache.k[0], expected_cache.k[0]) and torch.equal(cache.v[0], expected_cache.v[0])
    tol = 1e-4 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(on_kernel, expected, rtol=tol, atol=tol)


def test_a_plan_is_made_once_and_every_block_shares_one_scratch(kernel_isa, model_dir, block_calls):
    """The checks before each call find the modules unchanged, so the plan made at the first step serves every
    step (making one costs more than checking it); the scratch memory is one buffer, allocated once."""
    model = load_model(model_dir, CFG, torch.bfloat16, quantize="int4")
    if hasattr(fastblock._scratch, "buffer"):
        del fastblock._scratch.buffer  # as in a new thread: the first call allocates it
    decode(model)
    plans, buffer = [m._plan for m in model.layers], fastblock._scratch.buffer
    decode(model)
    assert all(m._plan is plan for m, plan in zip(model.layers, plans)) and fastblock._scratch.buffer is buffer
    assert all(call[-1] is buffer for call in block_calls) and len(block_calls) == 16 * CFG.n_layers
    layout = plans[0].layout  # fusedproducts' groups run as one product each; bf16 layers one by one
    assert (layout.qkv.n, layout.gate_up.n) == (1, 1)
    assert layout.qkv.p[0].N == (CFG.n_heads + 2 * CFG.n_kv_heads) * CFG.head_dim and layout.qkv.p[1].N == 0
    layout = fastblock.BlockPlan(load_model(model_dir, CFG, torch.bfloat16).layers[0]).layout
    assert (layout.qkv.n, layout.gate_up.n) == (3, 2) and layout.qkv.p[2].N == CFG.n_kv_heads * CFG.head_dim


@pytest.mark.parametrize("change", ["eps", "hidden % 16", "head_dim % 16", "17 query heads a KV head",
                                    "attention", "norm", "strided norm", "16 query heads a KV head"])
def test_layout_of_refuses_blocks_the_kernel_cannot_run(kernel_isa, model_dir, change):
    block = load_model(model_dir, CFG, torch.bfloat16, quantize="int4").layers[0]
    assert fastblock.layout_of(block) is not None
    attention = block.attention
    if change == "eps":
        block.ffn_norm.eps = 1e-6
    elif change == "hidden % 16":
        block.feed_forward.w1.out_features = 250
    elif change == "head_dim % 16":
        attention.head_dim = 24
    elif change.endswith("query heads a KV head"):
        attention.n_heads = int(change.split()[0]) * attention.n_kv_heads
    elif change == "attention":
        attention.__class__ = Attention
    elif change == "norm":
        block.ffn_norm.__class__ = RMSNorm
    else:
        block.attention_norm.weight = torch.nn.Parameter(torch.ones(2 * CFG.dim, dtype=torch.bfloat16)[::2])
    refused = fastblock.layout_of(block) is None
    assert refused == (change != "16 query heads a KV head")  # as many as the attention kernel takes


def test_the_block_kernel_matches_the_blocks_path_at_every_batch_size_it_takes(kernel_isa, model_dir, block_calls):
    model = load_model(model_dir, CFG, torch.bfloat16, quantize="int4")
    for rows in (1, 3, MAX_ROWS, MAX_ROWS + 1):
        before = len(block_calls)
        on_kernel, _ = decode(model, rows=rows, steps=3)
        expected, _ = decode(as_blocks(model, Block), rows=rows, steps=3)
        as_blocks(model, KernelBlock)
        assert len(block_calls) - before == (3 * CFG.n_layers if rows <= MAX_ROWS else 0)  # more: Block's path
        torch.testing.assert_close(on_kernel, expected, rtol=0.05, atol=0.05)


def test_the_block_steps_aside_for_adapters_and_gradients(kernel_isa, model_dir, block_calls):
    model = load_model(model_dir, CFG, torch.bfloat16, quantize="int4")
    expected, _ = decode(model)
    add_adapter(model, LoraConfig(rank=4, targets=("wq", "wv")), dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.5)  # B starts at zero: give the adapters an effect
    calls_before = len(block_calls)
    adapted, _ = decode(model)
    assert len(block_calls) == calls_before  # wq and wv are adapters now: every step on Block's path
    assert not torch.allclose(adapted, expected, atol=0.05)  # and the adapter acts
    tokens = torch.randint(0, CFG.vocab_size, (1, 1))
    x = model.tok_embeddings(tokens).requires_grad_(True)
    cos, sin = rotary_tables(torch.tensor([[0]]), CFG.head_dim, CFG.rope_theta, x.dtype)
    model.layers[0](x, cos, sin, None).float().sum().backward()  # gradients: Block's path, which keeps them
    assert x.grad is not None and len(block_calls) == calls_before


def test_re_stored_weights_are_the_ones_the_kernel_reads(kernel_isa, model_dir, tmp_path, block_calls):
    """A checkpoint loaded into a loaded model (new tiles for each quantized layer) and a move to float32 (new
    norms): the block's plan is made again, and the kernel computes with the new weights, not stale pointers (the
    old ones stay alive in the old plan, so a stale call would run, on the other model's numbers)."""
    model = load_model(model_dir, CFG, torch.bfloat16, quantize="int4")
    decode(model)
    other_dir = tmp_path / "other"
    save_hf(ventoux_from_hf(hf_model(CFG, seed=1)), other_dir)
    other = load_model(other_dir, CFG, torch.bfloat16, quantize="int4")
    model.load_state_dict(other.state_dict())
    calls_before = len(block_calls)
    torch.testing.assert_close(decode(model)[0], decode(as_blocks(other, Block))[0], rtol=0.05, atol=0.05)
    assert len(block_calls) - calls_before == 8 * CFG.n_layers
    model.float()
    on_kernel = decode(model)[0]
    assert len(block_calls) - calls_before == 16 * CFG.n_layers  # float32 activations on the kernel too
    torch.testing.assert_close(on_kernel, decode(as_blocks(model, Block))[0], rtol=1e-4, atol=1e-4)


def test_blocks_whose_layers_are_not_all_on_kernels_keep_their_path(kernel_isa, tmp_path, block_calls):
    """TINY's width, 64, is padded for the quantized kernels (decode_block takes unpadded layers), and float16
    layers have no decode_block product: both decode as Block.forward does, every step."""
    folder = tmp_path / "tiny"
    save_hf(ventoux_from_hf(hf_model(TINY)), folder)
    for scheme, dtype in (("int4", torch.bfloat16), (None, torch.float16)):
        model = load_model(folder, TINY, dtype, quantize=scheme)
        assert all(type(m) is KernelBlock and m._plan is None for m in model.layers)
        decode(model, cfg=TINY)
        assert not block_calls and all(m._plan.layout is None for m in model.layers)


def test_decode_block_rejects_what_it_cannot_take(kernel_isa, model_dir):
    model = load_model(model_dir, CFG, torch.bfloat16, quantize="int4")
    layout = fastblock.BlockPlan(model.layers[0]).layout
    x, cos = torch.randn(2, CFG.dim, dtype=torch.bfloat16), torch.randn(2, CFG.head_dim, dtype=torch.bfloat16)
    cache = torch.zeros(2, CFG.n_kv_heads, 9, CFG.head_dim, dtype=torch.bfloat16)
    slots, allowed = torch.tensor([0, 8]), torch.ones(2, 9, dtype=torch.bool)
    scratch = torch.empty(cpu_kernels.decode_block_scratch_bytes(layout, 2, torch.bfloat16), dtype=torch.uint8)
    args = [x, cos, cos, cache, cache.clone(), slots, allowed, scratch]
    out = cpu_kernels.decode_block(layout, *args)
    assert out.shape == x.shape
    # int32 slots, an int64 mask and a float32 scratch of as many bytes are taken as what they hold
    as_ints = [x, cos, cos, cache, cache.clone(), slots.int(), allowed.long(), scratch.view(torch.float32)]
    assert torch.equal(cpu_kernels.decode_block(layout, *as_ints), out)
    for i, bad, message in ((0, x.float(), "one dtype"), (0, x[:, :64], "not contiguous"),
                            (5, torch.tensor([0, 9]), "slots within"), (7, scratch[:-1], "scratch is smaller")):
        with pytest.raises(ValueError, match=message):
            cpu_kernels.decode_block(layout, *args[:i], bad, *args[i + 1:])


def test_a_block_kernel_that_disagrees_is_not_used(kernel_isa, model_dir, monkeypatch):
    """The one-time check: a kernel that skips the feed-forward's residual is refused at load."""
    real = cpu_kernels.decode_block

    def broken(layout, x, *args):
        return real(layout, x, *args) - x

    monkeypatch.setattr(cpu_kernels, "decode_block", broken)
    fastblock.kernel_works.cache_clear()
    try:
        assert not fastblock.kernel_works()
        model = load_model(model_dir, CFG, torch.bfloat16, quantize="int4")
        assert all(type(m) is Block for m in model.layers)
    finally:
        fastblock.kernel_works.cache_clear()  # the next test checks the real kernel again
