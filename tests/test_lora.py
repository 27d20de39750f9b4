"""LoRA layers (lora.py): a fresh adapter changes nothing, merging, gradients through frozen float, 16-bit-kernel
and quantized bases (frozen.py) against the float product, QLoRA, and several adapters in one batch.
Adapter files and the places adapters enter (load, generate, CLI): test_lora_files.py."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from conftest import TINY, TINY_FULL, hf_model, randomize_adapters, ventoux_from_hf
from torch import nn

from ventoux import fastlinear, lora
from ventoux.errors import VentouxError
from ventoux.fastlinear import HalfLinear, kernel_works
from ventoux.qlinear import Int4Linear, Int8Linear


def _tokens(b=2, t=12, seed=0):
    return torch.randint(0, TINY.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def _adapted(cfg=TINY_FULL, rank=4, alpha=8, seed=1, **kw):
    hf = hf_model(cfg)
    model = ventoux_from_hf(hf)
    lora.add_adapter(model, lora.LoraConfig(rank=rank, alpha=alpha, **kw))
    randomize_adapters(model, seed=seed)
    return hf, model


# ---- the adapter as a transformation of the model ----------------------------------------------------------
def test_fresh_adapter_leaves_logits_unchanged_and_trains_only_adapters():
    model = ventoux_from_hf(hf_model(TINY))
    tokens = _tokens()
    with torch.no_grad():
        before = model(tokens)
    lora.add_adapter(model, lora.LoraConfig(rank=8, alpha=16))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), before, rtol=0, atol=0)
    trainable = lora.trainable_parameters(model)
    assert len(trainable) == 2 * 7 * TINY.n_layers  # A and B of every block linear, nothing else
    assert all(p.requires_grad for p in trainable)
    assert not model.tok_embeddings.weight.requires_grad and not model.output.weight.requires_grad
    a = model.layers[0].attention.wq.adapters["default"]
    bound = 1 / TINY.dim**0.5  # kaiming_uniform_(a=sqrt(5)) on (rank, in): U(-1/sqrt(in), 1/sqrt(in)), as PEFT
    assert a.lora_A.abs().max() <= bound and a.lora_A.std() > bound / 3 and (a.lora_B == 0).all()
    assert a.scaling == 2.0
    assert set(lora.lora_state_dict(model)) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_targets_rank_and_bad_configs():
    model = ventoux_from_hf(hf_model(TINY))
    lora.add_adapter(model, lora.LoraConfig(rank=2, alpha=2, targets=("wq", "w2")))
    assert sorted(lora.lora_layers(model)) == sorted(f"layers.{i}.{m}" for i in range(TINY.n_layers)
                                                     for m in ("attention.wq", "feed_forward.w2"))
    for bad in (lora.LoraConfig(rank=0), lora.LoraConfig(dropout=1.0), lora.LoraConfig(targets=("output",))):
        with pytest.raises(VentouxError):
            lora.add_adapter(model, bad, name="other")
    with pytest.raises(VentouxError, match="already has an adapter"):
        lora.add_adapter(model, name="default")
    with pytest.raises(VentouxError, match="letters"):
        lora.add_adapter(model, name="a.b")


def test_merged_equals_unmerged():
    _, model = _adapted(TINY)
    tokens = _tokens()
    with torch.no_grad():
        unmerged = model(tokens)
        lora.merge(model)
        merged = model(tokens)
    assert not lora.lora_layers(model) and type(model.layers[1].feed_forward.w3) is nn.Linear
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_merge_into_a_16_bit_kernel_base_rounds_once():
    _, model = _adapted(TINY)
    model.to(torch.bfloat16)
    for layer in lora.lora_layers(model).values():
        layer.base = HalfLinear(layer.base)
    wq = model.layers[0].attention.wq
    expected = (wq.base.weight.float() + wq.adapters["default"].delta_weight().float()).to(torch.bfloat16)
    lora.merge(model)
    assert isinstance(model.layers[0].attention.wq, HalfLinear)
    assert torch.equal(model.layers[0].attention.wq.weight, expected)


def test_state_dict_round_trip_restores_the_adapter():
    _, model = _adapted(TINY)
    state = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    with torch.no_grad():
        expected = model(_tokens())
    randomize_adapters(model, seed=7)
    lora.load_lora_state_dict(model, state)
    with torch.no_grad():
        torch.testing.assert_close(model(_tokens()), expected, rtol=0, atol=0)
    with pytest.raises(VentouxError, match="does not match"):
        lora.load_lora_state_dict(model, dict(list(state.items())[1:]))


# ---- frozen bases the gradients flow through ---------------------------------------------------------------
def _swap_bases(model, make):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith("layers."):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(module))


def _float_copy(layer):
    """An nn.Linear with the weight a quantized / 16-bit layer computes with, in float32."""
    if isinstance(layer, HalfLinear):
        w = layer.weight.float()
    else:
        w = layer.dequantize(*layer.canonical())[:, :layer.in_features]
    linear = nn.Linear(layer.in_features, layer.out_features, bias=False)
    linear.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    return linear


BASES = {  # the frozen base layer, and the tolerance its kernel's rounding allows on the gradient
    "int8": (lambda m: Int8Linear.from_float(m.weight), 6e-2),  # vnni rounds activations to int8: a few %
    "int4": (lambda m: Int4Linear.from_float(m.weight, 32), 6e-2),
    "bf16": (HalfLinear, 5e-2),
}


LAYERS = [(cls, k) for cls in (Int8Linear, Int4Linear) for k in cls.kernels("cpu")] + [(HalfLinear, "half")]


@pytest.mark.parametrize("cls,kernel", LAYERS, ids=[f"{c.__name__}-{k}" for c, k in LAYERS])
def test_frozen_layer_passes_dy_times_its_weight_to_the_input(cls, kernel, monkeypatch):
    if cls is HalfLinear and not kernel_works():
        pytest.skip("ventoux's 16-bit CPU kernels do not run here")
    monkeypatch.setattr(fastlinear, "gemm_beats_pytorch", lambda: True)  # half_gemm for 40 rows on any CPU
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 160, generator=gen) / 8
    if cls is HalfLinear:
        layer, dtype = HalfLinear(nn.Linear(160, 48, bias=False).to(torch.bfloat16)), torch.bfloat16
        layer.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    else:
        layer, dtype = cls.from_float(w, kernel=kernel), torch.float32
    w_hat = _float_copy(layer).weight
    for rows in (3, 40):  # decode-sized and prefill-sized products take different kernels
        x = torch.randn(rows, 160, generator=gen).to(dtype).requires_grad_()
        y = layer(x)
        dy = torch.randn(y.shape, generator=gen).to(dtype)
        y.backward(dy)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(x.grad.float(), dy.float() @ w_hat, rtol=tol, atol=tol)


@pytest.mark.parametrize("cls,group", [(Int8Linear, None), (Int8Linear, 32), (Int4Linear, 32), (Int4Linear, 64)])
@pytest.mark.parametrize("kernel", ["vnni", "fallback"])
def test_backward_weight_slices_are_the_dequantized_weight(cls, group, kernel):
    """The backward's dequantized column slices, each built in row blocks, tile the exact dequantized weight
    (rounded once to the activations' dtype): here 3 slices of 128 columns and blocks of one tile (16 rows) of
    50 rows, read from vnni's tiles a block at a time or from the canonical tensors."""
    if kernel not in cls.kernels("cpu"):
        pytest.skip(f"{kernel} does not run here")
    w = torch.randn(50, 300, generator=torch.Generator().manual_seed(0)) / 8
    layer = cls.from_float(w, group, kernel=kernel)
    expected = layer.dequantize(*layer.canonical())  # (50, 384): the input width padded
    if kernel == "vnni":  # read from the tiles a block at a time, never unpacked whole
        layer._unpack = lambda: pytest.fail("the backward unpacked the whole weight")
    for dtype in (torch.float32, torch.bfloat16):
        slices = list(layer._weight_columns(dtype, budget=50 * 128, block=256))
        assert [start for start, _ in slices] == [0, 128, 256]
        assert torch.equal(torch.cat([s for _, s in slices], 1), expected.to(dtype))


@pytest.mark.parametrize("block, autocast", [(lora.BLOCK, False), (64, False), (lora.BLOCK, True)])
def test_adapter_saves_its_input_as_it_comes_with_autograd_gradients(block, autocast, monkeypatch):
    """Training keeps x in its own dtype (bf16) for the adapter's backward, not a float32 copy per adapter; its
    float32 temporaries are made in blocks (here also of one row or column: BLOCK 64), and the output and the
    gradients equal autograd's on the float32 expression rounded to x's dtype, under --bf16's autocast too."""
    monkeypatch.setattr(lora, "BLOCK", block)
    gen = torch.Generator().manual_seed(0)
    adapter = lora.Adapter(torch.randn(4, 64, generator=gen), torch.randn(32, 4, generator=gen), scaling=1.5)
    x = torch.randn(2, 5, 64, generator=gen).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(2, 5, 32, generator=gen).to(torch.bfloat16)
    saved = []
    with (torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
          torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)):
        y = adapter(x)
    assert not any(t.dtype == torch.float32 and t.numel() == x.numel() for t in saved)  # matmul saves (10, 64)
    y.backward(dy)
    got = [t.grad.clone() for t in (x, adapter.lora_A, adapter.lora_B)]
    x2, a, b = (t.detach().clone().requires_grad_() for t in (x, adapter.lora_A, adapter.lora_B))
    expected = ((x2.float() @ a.T @ b.T) * 1.5).to(x.dtype)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    expected.backward(dy)
    for g, e in zip(got, (x2.grad, a.grad, b.grad)):
        assert g.dtype == e.dtype
        # float32 sums in another order: on a Sapphire Rapids both are up to 1.3e-5 off the float64 sums here
        torch.testing.assert_close(g, e, rtol=1e-5, atol=4e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_norm_and_silu_mul_keep_less_with_autograd_numbers(dtype):
    """With a frozen gain, RMSNorm keeps its 16-bit input (not a float32 copy) and the FFN keeps silu's input
    only, not silu's output too (model.py's training path); outputs and input gradients are bit-identical to
    autograd's on the plain expressions."""
    from ventoux.model import FeedForward, RMSNorm

    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, 7, 64, generator=gen)).to(dtype)
    dy = torch.randn(2, 7, 64, generator=gen).to(dtype)
    norm = RMSNorm(64, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64, generator=gen))
    norm.weight.requires_grad_(False)

    def plain_norm(t):
        tf = t.float()
        return norm.weight * (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)

    hidden = 96
    ffn = FeedForward(TINY.replace(hidden_dim=hidden)).to(dtype)
    for p in ffn.parameters():
        p.requires_grad_(False)

    def plain_ffn(t):
        return ffn.w2(torch.nn.functional.silu(ffn.w1(t)) * ffn.w3(t))

    def run(f, t):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
            y = f(t)
        kept = {s.untyped_storage().data_ptr(): s.untyped_storage().nbytes() for s in saved}
        y.backward(dy)
        return y, t.grad, sum(kept.values())

    # the bytes no longer kept: half the float32 copy of x; silu's (2, 7, hidden) output
    for module, plain, fewer in ((norm, plain_norm, 2 * x.numel()), (ffn, plain_ffn, 2 * 7 * hidden * 2)):
        y, dx, kept = run(module, x.clone().requires_grad_())
        y_plain, dx_plain, kept_plain = run(plain, x.clone().requires_grad_())
        assert torch.equal(y, y_plain) and torch.equal(dx, dx_plain)
        assert kept <= kept_plain - fewer


def test_silu_mul_backward_writes_b_gradient_over_w2_input_gradient(monkeypatch):
    """_SiluMul's backward works a block of rows at a time (here 3) and returns b's gradient in the memory of the
    gradient it was given (w2's input gradient, which nothing else reads): bit-identical to autograd's, also
    for a gradient that is not its own memory (the expanded gradient of a sum)."""
    from ventoux.model import _SiluMul

    monkeypatch.setattr(_SiluMul, "ROWS", 3 * 96)
    gen = torch.Generator().manual_seed(0)
    a0, b0 = (torch.randn(2, 7, 96, generator=gen).to(torch.bfloat16) for _ in range(2))
    w = torch.randn(96, 32, generator=gen).to(torch.bfloat16)
    dy = torch.randn(2, 7, 32, generator=gen).to(torch.bfloat16)

    def run(product, reduce):
        a, b = (t.clone().requires_grad_() for t in (a0, b0))
        m, b_mid = product(a, b * 1)
        given, got = [], []
        m.register_hook(lambda g: given.append(g.data_ptr()))
        b_mid.register_hook(lambda g: got.append(g.data_ptr()))
        reduce(m).backward(dy) if reduce is not sum_all else reduce(m).backward()
        return a.grad, b.grad, given, got

    def ours(a, b):
        return _SiluMul.apply(a, b), b

    def plain(a, b):
        return torch.nn.functional.silu(a) * b, b

    def sum_all(m):
        return m.float().sum()

    for reduce in (lambda m: m @ w, sum_all):
        da, db, given, got = run(ours, reduce)
        da_plain, db_plain, _, _ = run(plain, reduce)
        assert torch.equal(da, da_plain) and torch.equal(db, db_plain)
        if reduce is not sum_all:
            assert given == got  # b's gradient is where w2's input gradient was


def test_training_remakes_the_inputs_adapters_keep_instead_of_keeping_them():
    """In LoRA training, the inputs of wq (attention_norm's output, remade from its input, which the norm keeps),
    w1 (ffn_norm's, alike), wo (a copy of attention's output, which attention keeps) and w2 (silu(a) * b, remade
    from a and b, which the FFN keeps) are not kept for backward: the gradients are bit-identical to keeping
    them, which the model does when other saved-tensor hooks are active (as under checkpointing)."""
    import gc
    import weakref

    model = ventoux_from_hf(hf_model(TINY)).to(torch.bfloat16)
    lora.add_adapter(model, lora.LoraConfig(rank=4, alpha=8))
    randomize_adapters(model)
    trainable = lora.trainable_parameters(model)
    tokens = _tokens()

    def run(other_hooks):
        inputs = []
        watch = [model.get_submodule(f"layers.{i}.{name}").register_forward_pre_hook(
            lambda m, args: inputs.append(weakref.ref(args[0])))
            for i in range(TINY.n_layers) for name in ("attention.wq", "attention.wo", "feed_forward.w1",
                                                       "feed_forward.w2")]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if other_hooks else nullcontext():
            loss = model(tokens).square().mean()
        for w in watch:
            w.remove()
        gc.collect()
        kept = sum(r() is not None for r in inputs)
        loss.backward()
        grads = [p.grad.clone() for p in trainable]
        model.zero_grad(set_to_none=True)
        return kept, grads

    kept, grads = run(other_hooks=False)
    kept_plain, grads_plain = run(other_hooks=True)
    # kept: layer 0's wq input alone, the norm of the embeddings (no gradient before it: remade, it would keep
    # its input instead, as large)
    assert kept == 1 and kept_plain == 4 * TINY.n_layers
    assert all(torch.equal(g, e) for g, e in zip(grads, grads_plain))


def _layer0_adapter(model):
    """An adapter with non-zero A and B on three linears of layer 0 only (the same for every model)."""
    tensors = {}
    for i, name in enumerate(("layers.0.attention.wq", "layers.0.attention.wk", "layers.0.feed_forward.w2")):
        base = model.get_submodule(name)
        gen = torch.Generator().manual_seed(i)
        tensors[name] = (0.1 * torch.randn(2, base.in_features, generator=gen),
                         0.1 * torch.randn(base.out_features, 2, generator=gen))
    lora.install(model, "default", tensors, scaling=2.0)


@pytest.mark.parametrize("kind", BASES)
def test_adapter_gets_its_gradient_through_a_frozen_kernel_base(kind, monkeypatch):
    """An adapter in layer 0 learns only through the later layers' frozen products: their kernels (vnni,
    half_gemm, PyTorch's packed ones) must pass the gradient to their input, equal to the float product's."""
    if kind == "bf16" and not kernel_works():
        pytest.skip("ventoux's 16-bit CPU kernels do not run here")
    monkeypatch.setattr(fastlinear, "gemm_beats_pytorch", lambda: True)  # half_gemm on any CPU
    make, tol = BASES[kind]
    model = ventoux_from_hf(hf_model(TINY))
    if kind == "bf16":
        model.to(torch.bfloat16)  # as a bf16 checkpoint loads
    reference = copy.deepcopy(model).float()
    _swap_bases(model, make)
    assert all(m.kernel != "fallback" for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))), \
        "the fallback's F.linear has a backward anyway: this test is about the kernels"
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear, HalfLinear)):
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, _float_copy(module))
    grads = []
    for m in (model, reference):
        _layer0_adapter(m)
        m(_tokens(2, 12)).float().logsumexp(-1).mean().backward()
        grads.append({k: p.grad for k, p in m.named_parameters() if p.requires_grad})
    assert len(grads[1]) == 6
    for key, expected in grads[1].items():
        got = grads[0][key]
        assert got is not None and got.abs().max() > 0, f"{key} got no gradient through the {kind} base"
        err = (got.float() - expected).norm() / expected.norm()
        assert err < tol, f"{key}: relative error {err:.3g} against the float base"


def test_qlora_int4_base_gives_the_dequantized_base_logits():
    """Same arithmetic: an int4 base (the fallback kernel dequantizes exactly) with an adapter, and the float
    model holding the dequantized weights with the same adapter."""
    _, model = _adapted(TINY)
    state = lora.lora_state_dict(model)
    quantized = ventoux_from_hf(hf_model(TINY))
    _swap_bases(quantized, lambda m: Int4Linear.from_float(m.weight, 32, kernel="fallback"))
    dequantized = ventoux_from_hf(hf_model(TINY))
    for name, module in quantized.named_modules():
        if isinstance(module, Int4Linear):
            parent, _, child = name.rpartition(".")
            setattr(dequantized.get_submodule(parent), child, _float_copy(module))
    for m in (quantized, dequantized):
        lora.add_adapter(m, lora.LoraConfig(rank=4, alpha=8))
        lora.load_lora_state_dict(m, state)
    with torch.no_grad():
        torch.testing.assert_close(quantized(_tokens()), dequantized(_tokens()), rtol=1e-5, atol=1e-5)
    with pytest.raises(VentouxError, match="unquantized"):
        lora.merge(quantized)


# ---- several adapters on one base --------------------------------------------------------------------------
def test_two_adapters_in_one_batch_give_each_row_what_it_gets_alone():
    model = ventoux_from_hf(hf_model(TINY))
    lora.add_adapter(model, lora.LoraConfig(rank=4, alpha=8), name="a")
    lora.add_adapter(model, lora.LoraConfig(rank=2, alpha=8, targets=("wv", "w1")), name="b")
    randomize_adapters(model)
    assert lora.adapter_names(model) == ["a", "b"]
    tokens = _tokens(4, 10)
    alone = {}
    with torch.no_grad():
        for active in (None, "a", "b"):
            lora.set_active(model, active)
            alone[active] = model(tokens)
        lora.set_rows(model, [1, 0, -1, 1])
        mixed = model(tokens)
        with pytest.raises(VentouxError, match="rows"):
            model(tokens[:2])
    for row, active in enumerate(("b", "a", None, "b")):
        torch.testing.assert_close(mixed[row], alone[active][row], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone["a"], alone["b"]) and not torch.allclose(alone["a"], alone[None])
    with pytest.raises(VentouxError, match="out of range"):
        lora.set_rows(model, [2])
