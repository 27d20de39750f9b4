"""LoRA behaviours that mutation testing (mutation/README.md) found unpinned: the adapter's blocked product with
more tokens than inputs (its blocks go over rows, not columns), and its gradients when one factor is frozen
(each gradient made for its own input), the reference autograd on the float32 expression; every refusal's
message whole; the dtype adapters are made and kept in; several adapters on one layer where the first does not
target it; a choice of rows that fits any batch; merge by name, and what merge leaves."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY, hf_model, randomize_adapters, ventoux_from_hf

from ventoux import lora
from ventoux.errors import VentouxError
from ventoux.qlinear import Int8Linear

NAMES = "wq, wk, wv, wo, w1, w2, w3"
LOAD = "(load them with ventoux.load(..., lora={name: path}))"


@pytest.mark.parametrize("frozen", ["A", "B", "x"])
def test_adapter_gradients_with_a_frozen_input_and_more_tokens_than_inputs(frozen, monkeypatch):
    monkeypatch.setattr(lora, "BLOCK", 64)  # blocks of 8 rows of 8 inputs, or of one column of 120 tokens
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 8, generator=gen), torch.randn(5, 3, generator=gen)
    adapter = lora.Adapter(a, b, scaling=1.5)
    x = torch.randn(4, 30, 8, generator=gen).requires_grad_(frozen != "x")  # 120 tokens of 8 inputs
    {"A": adapter.lora_A, "B": adapter.lora_B, "x": x}[frozen].requires_grad_(False)
    dy = torch.randn(4, 30, 5, generator=gen)
    y = adapter(x)
    y.backward(dy)
    x2, a2, b2 = (t.detach().clone().requires_grad_(t.requires_grad) for t in (x, adapter.lora_A, adapter.lora_B))
    expected = (x2 @ a2.T @ b2.T) * 1.5
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-5)
    expected.backward(dy)
    for got, want in ((x.grad, x2.grad), (adapter.lora_A.grad, a2.grad), (adapter.lora_B.grad, b2.grad)):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_low_rank_backward_makes_dx_in_the_input_dtype():
    """The adapter's input gradient is made in x's dtype (bf16), not in its float32 factors' dtype and cast
    by autograd afterwards: a float32 dx would be twice the memory at training's peak. Called directly, as
    autograd's cast would hide it."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=gen).to(torch.bfloat16)
    a, b = torch.randn(4, 32, generator=gen), torch.randn(16, 4, generator=gen)
    ctx = SimpleNamespace(saved_tensors=(x, x.float() @ a.T, a, b), scaling=2.0, needs_input_grad=(True, True, True))
    dx, da, db, _ = lora._LowRank.backward(ctx, torch.randn(6, 16, generator=gen).to(torch.bfloat16))
    assert dx.dtype == torch.bfloat16 and dx.shape == x.shape
    assert da.dtype == db.dtype == torch.float32


def _model():
    return ventoux_from_hf(hf_model(TINY))


def _two_adapters():
    """'narrow' (wv only) before 'wide' (every block linear), both with non-zero B, neither active."""
    model = _model()
    lora.add_adapter(model, lora.LoraConfig(rank=2, alpha=4, targets=("wv",)), name="narrow", activate=False)
    lora.add_adapter(model, lora.LoraConfig(rank=4, alpha=8), name="wide", activate=False)
    return randomize_adapters(model, seed=3)


@pytest.mark.parametrize("config, message", [
    (lora.LoraConfig(rank=0), "LoRA rank must be a positive integer, not 0"),
    (lora.LoraConfig(rank=2.0), "LoRA rank must be a positive integer, not 2.0"),
    (lora.LoraConfig(dropout=1.0), "LoRA dropout must be in [0, 1), not 1.0"),
    (lora.LoraConfig(targets=("wq", "output")), f"LoRA targets ['wq', 'output'] must be among {NAMES}"),
    (lora.LoraConfig(targets=()), f"LoRA targets [] must be among {NAMES}"),
])
def test_each_bad_lora_config_is_refused_whole(config, message):
    with pytest.raises(VentouxError) as e:
        config.check()
    assert str(e.value) == message


def test_rank_one_is_a_rank():
    assert lora.LoraConfig(rank=1).check().rank == 1


def test_unknown_adapters_and_indices_are_refused_whole():
    plain, model = _model(), _two_adapters()
    cases = [
        (lambda: lora.check_adapter(plain, "x"), f"unknown adapter 'x'; this model has no adapters {LOAD}"),
        (lambda: lora.check_adapter(model, "x"), f"unknown adapter 'x'; this model has ['narrow', 'wide'] {LOAD}"),
        (lambda: lora.set_active(model, "x"), f"unknown adapter 'x'; this model has ['narrow', 'wide'] {LOAD}"),
        (lambda: lora.set_rows(plain, [None, "x"]), f"unknown adapter 'x'; this model has no adapters {LOAD}"),
        (lambda: lora.set_rows(plain, [-1, 3]), "adapter index 3 is out of range: this model has no adapters"),
        (lambda: lora.set_rows(model, ["x"]), "unknown adapter 'x'; this model has ['narrow', 'wide']"),
        (lambda: lora.set_rows(model, [-2]),
         "adapter index -2 is out of range: this model has 2 adapter(s) ['narrow', 'wide'] (-1: the base alone)"),
        (lambda: lora.set_rows(model, [2]),
         "adapter index 2 is out of range: this model has 2 adapter(s) ['narrow', 'wide'] (-1: the base alone)"),
        (lambda: lora.merge(model), "the model has several adapters ['narrow', 'wide']: say which one to merge"),
        (lambda: lora.merge(model, "x"), "unknown adapter 'x'; this model has ['narrow', 'wide']"),
        (lambda: lora.merge(plain, "x"), "unknown adapter 'x'; this model has none"),
    ]
    for call, message in cases:
        with pytest.raises(VentouxError) as e:
            call()
        assert str(e.value) == message
    lora.set_rows(plain, [None, -1, torch.tensor(-1)])  # a model without adapters: rows may ask for none
    lora.set_rows(model, torch.tensor([-1, 0, 1]))


def test_bad_adapter_tensors_are_refused_whole():
    model = _model()  # wq: 64 inputs, 64 outputs
    a, b = torch.zeros(4, 64), torch.zeros(64, 4)
    cases = [
        ("a b", {}, "adapter name 'a b' must be letters, digits, '_' or '-'"),
        ("half", {}, "adapter name 'half' is taken by PyTorch (a module attribute): choose another name"),
        ("training", {}, "adapter name 'training' is taken by PyTorch (a module attribute): choose another name"),
        ("x", {"output": (a, b)}, f"adapter 'x' targets 'output': LoRA applies only to the block linears {NAMES} "
                                  "(never embeddings or the output head)"),
        ("x", {"layers.9.attention.wq": (a, b)}, "adapter 'x' targets 'layers.9.attention.wq', which this model "
                                                 "does not have (the adapter was made for a deeper model)"),
        ("x", {"layers.0.attention.wq": (torch.zeros(4, 63), b)},
         "adapter 'x' for layers.0.attention.wq has A [4, 63] and B [64, 4], but the model's layer is 64x64: "
         "the adapter was made for another model"),
        ("x", {"layers.0.attention.wq": (torch.zeros(4), torch.zeros(64, 64, 4))},
         "adapter 'x' for layers.0.attention.wq has A [4] and B [64, 64, 4], but the model's layer is 64x64: "
         "the adapter was made for another model"),
        ("x", {"layers.0.attention.wq": (torch.tensor(1.0), b)},
         "adapter 'x' for layers.0.attention.wq has A [] and B [64, 4], but the model's layer is 64x64: "
         "the adapter was made for another model"),
    ]
    for name, tensors, message in cases:
        with pytest.raises(VentouxError) as e:
            lora.install(model, name, tensors, 2.0)
        assert str(e.value) == message
    lora.install(model, "x", {"layers.0.attention.wq": (a, b)}, 2.0)
    with pytest.raises(VentouxError) as e:
        lora.install(model, "x", {"layers.0.attention.wq": (a, b)}, 2.0)
    assert str(e.value) == "the model already has an adapter called 'x'; choose another name"


def test_adapters_are_made_and_kept_in_the_dtype_asked():
    model = _model()
    a, b = torch.randn(4, 64, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)
    lora.install(model, "f32", {"layers.0.attention.wq": (a, b)}, 2.0)  # float32 by default, whatever is given
    lora.install(model, "bf16", {"layers.0.attention.wq": (a, b)}, 2.0, dtype=torch.bfloat16)
    lora.add_adapter(model, lora.LoraConfig(rank=4), name="fresh", dtype=torch.bfloat16, activate=False)
    adapters = model.get_submodule("layers.0.attention.wq").adapters
    assert [(n, ad.lora_A.dtype, ad.lora_B.dtype) for n, ad in adapters.items()] == [
        ("f32", torch.float32, torch.float32), ("bf16", torch.bfloat16, torch.bfloat16),
        ("fresh", torch.bfloat16, torch.bfloat16)]
    assert model.lora_selection.active == ["bf16"]  # "fresh" was added without activating it


def test_a_fresh_adapter_has_pefts_init():
    """PEFT's LoRA init: A kaiming-uniform with a = sqrt(5), so uniform in +-1/sqrt(inputs); B zeros."""
    torch.manual_seed(0)
    model = lora.add_adapter(_model(), lora.LoraConfig(rank=16))
    for name in ("layers.0.attention.wq", "layers.1.feed_forward.w2"):
        adapter = model.get_submodule(name).adapters["default"]
        bound = 1 / math.sqrt(adapter.lora_A.shape[1])
        assert bound * 0.95 < adapter.lora_A.abs().max() <= bound and not adapter.lora_B.any()


def test_state_dicts_per_adapter_and_their_refusals_whole():
    model = _two_adapters()
    narrow = lora.lora_state_dict(model, "narrow")
    assert sorted(narrow) == [f"layers.{i}.attention.wv.adapters.narrow.lora_{m}" for i in range(3) for m in "AB"]
    state = lora.lora_state_dict(model)
    cut = {k: v for k, v in state.items() if ".narrow." not in k}
    with pytest.raises(VentouxError) as e:
        lora.load_lora_state_dict(model, cut)
    assert str(e.value) == ("the adapter state does not match the model's adapters (missing "
                            f"{sorted(narrow)[:2]}, unexpected []); was it saved with other --rank/--targets?")
    with pytest.raises(VentouxError) as e:
        lora.load_lora_state_dict(model, {**cut, **{k + "x": v for k, v in narrow.items()}})
    assert str(e.value) == (f"the adapter state does not match the model's adapters (missing {sorted(narrow)[:2]}, "
                            f"unexpected {sorted(k + 'x' for k in narrow)[:2]}); was it saved with other "
                            "--rank/--targets?")
    key = "layers.0.attention.wv.adapters.narrow.lora_A"
    with pytest.raises(VentouxError) as e:
        lora.load_lora_state_dict(model, {**state, key: torch.zeros(3, 64)})
    assert str(e.value) == f"adapter tensor {key} is [3, 64], the model's is [2, 64]"


def test_a_layer_applies_every_chosen_adapter_it_has_after_one_it_lacks():
    model = _two_adapters()
    lora.set_active(model, ["narrow", "wide"])  # narrow first: wq has only wide
    layer = model.get_submodule("layers.0.attention.wq")
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x) + layer.adapters["wide"](x))
        lora.set_active(model, "wide")  # a name, not a list of letters
        torch.testing.assert_close(layer(x), layer.base(x) + layer.adapters["wide"](x))


def test_rows_that_all_choose_alike_fit_any_batch_and_others_only_theirs():
    model = _two_adapters()
    layer = model.get_submodule("layers.0.attention.wq")
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lora.set_rows(model, ["wide", "wide"])
        torch.testing.assert_close(layer(x), layer.base(x) + layer.adapters["wide"](x))  # 3 rows: fits
        lora.set_rows(model, ["wide", None])
        with pytest.raises(VentouxError) as e:
            layer(x)
    assert str(e.value) == ("lora.set_rows was given 2 rows but the forward has 3; call set_rows before each "
                            "forward with one entry per row")


@pytest.mark.parametrize("rows", [None, ["wide", -1]])
def test_a_bfloat16_base_keeps_its_dtype_with_float32_adapters(rows):
    model = _two_adapters().to(torch.bfloat16)
    for ad in (model.get_submodule("layers.0.attention.wq").adapters["wide"],):
        ad.float()  # adapters in float32 beside a bfloat16 base, as loading makes them
    lora.set_active(model, "wide")
    lora.set_rows(model, rows)
    layer = model.get_submodule("layers.0.attention.wq")
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    want = layer.base(x).float() + (x.float() @ layer.adapters["wide"].lora_A.T @ layer.adapters["wide"].lora_B.T) * 2
    if rows is not None:
        want[1] = layer.base(x[1]).float()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)


def test_merge_by_name_folds_that_adapter_and_leaves_a_plain_model():
    model = _two_adapters()
    tokens = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    lora.set_active(model, "wide")
    with torch.no_grad():
        want = model(tokens)
        lora.merge(model, "wide")
        torch.testing.assert_close(model(tokens), want, rtol=1e-5, atol=1e-5)
    assert lora.adapter_names(model) == [] and not lora.lora_layers(model) and "lora_selection" not in vars(model)
    assert lora.merge(model) is model  # no adapter: nothing to fold


def test_merge_refuses_a_quantized_base_whole():
    model = _model()
    wq = model.get_submodule("layers.0.attention.wq")
    model.layers[0].attention.wq = Int8Linear.from_float(wq.weight.detach(), kernel="fallback")
    lora.add_adapter(model, lora.LoraConfig(rank=4))
    with pytest.raises(VentouxError) as e:
        lora.merge(model)
    assert str(e.value) == ("cannot merge into layers.0.attention.wq: its base is Int8Linear; load the base model "
                            "unquantized to merge an adapter")


def test_a_lora_layer_prints_its_adapters():
    model = _two_adapters()
    wv = model.get_submodule("layers.0.attention.wv")
    assert wv.extra_repr() == "narrow: rank 2, scaling 2, wide: rank 4, scaling 2"
    assert "(wq): LoRALinear(\n          wide: rank 4, scaling 2\n" in repr(model)


def test_merging_a_bfloat16_adapter_rounds_once():
    """B @ A made in float32 and added to the float32 weight, rounded once: a bf16 product would round twice."""
    model = _model()
    lora.add_adapter(model, lora.LoraConfig(rank=8, alpha=16), dtype=torch.bfloat16)  # scaling 2
    wq = model.get_submodule("layers.0.attention.wq")
    with torch.no_grad():
        wq.adapters["default"].lora_B.copy_(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)))
    a, b, w = (t.detach().float().clone() for t in (wq.adapters["default"].lora_A, wq.adapters["default"].lora_B,
                                                    wq.base.weight))
    lora.merge(model)
    assert torch.equal(model.layers[0].attention.wq.weight, w + (b @ a) * 2.0)
    assert not torch.equal(w + (b.bfloat16() @ a.bfloat16()).float() * 2.0, w + (b @ a) * 2.0)  # it would show
