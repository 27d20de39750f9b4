"""LoRA (lora.py, lora_files.py): adapters on float, 16-bit-kernel and quantized bases, against the real PEFT
package on transformers' Mistral, mistral-finetune's file layout, merging, and several adapters per batch."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from conftest import TINY, TINY_FULL, hf_model, ventoux_from_hf
from torch import nn

import ventoux
from ventoux import lora, names
from ventoux.api import DEMO_MODEL
from ventoux.errors import VentouxError
from ventoux.fastlinear import HalfLinear, kernel_works
from ventoux.lora_files import load_adapter, save_adapter
from ventoux.qlinear import Int4Linear, Int8Linear
from ventoux.weights import load_model, save_consolidated, save_hf

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tokens(b=2, t=12, seed=0):
    return torch.randint(0, TINY.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def _randomize(model, scale=0.05, seed=1, name=None):
    """Give the adapters non-zero B (a fresh one is B = 0, which would hide any layout mistake)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ".adapters." in key and (name is None or f".adapters.{name}." in key):
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def _adapted(cfg=TINY_FULL, rank=4, alpha=8, seed=1, **kw):
    hf = hf_model(cfg)
    model = ventoux_from_hf(hf)
    lora.add_adapter(model, lora.LoraConfig(rank=rank, alpha=alpha, **kw))
    _randomize(model, seed=seed)
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
    _randomize(model, seed=7)
    lora.load_lora_state_dict(model, state)
    with torch.no_grad():
        torch.testing.assert_close(model(_tokens()), expected, rtol=0, atol=0)
    with pytest.raises(VentouxError, match="does not match"):
        lora.load_lora_state_dict(model, dict(list(state.items())[1:]))


# ---- PEFT, both ways ---------------------------------------------------------------------------------------
def test_ventoux_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    from peft import PeftModel

    hf, model = _adapted(rank=4, alpha=8, dropout=0.1)
    model.eval()
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias")} == \
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "bias": "none"}
    assert sorted(config["target_modules"]) == sorted(HF_TARGETS)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), peft_model(tokens).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rslora,targets", [(False, HF_TARGETS), (True, ["q_proj", "v_proj", "down_proj"])])
def test_peft_adapter_loads_in_ventoux_with_the_same_logits(tmp_path, rslora, targets):
    from peft import LoraConfig, get_peft_model

    hf = hf_model(TINY_FULL)
    model = ventoux_from_hf(hf)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_rslora=rslora,
                                               task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, p in peft_model.named_parameters():
            if "lora_" in key:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(tmp_path / "peft")
    load_adapter(model, tmp_path / "peft")
    assert len(lora.lora_layers(model)) == len(targets) * TINY_FULL.n_layers
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), peft_model.eval()(tokens).logits, rtol=1e-4, atol=1e-4)


def test_mistral_finetune_lora_file_loads(tmp_path):
    """mistral-finetune trains on the consolidated layout: merge there (its own arithmetic, scaling 2.0), load
    the merged consolidated checkpoint as the reference, and compare with base + its lora.safetensors."""
    from safetensors.torch import load_file, save_file

    base = ventoux_from_hf(hf_model(TINY_FULL))
    save_consolidated(base, tmp_path / "base")
    consolidated = load_file(tmp_path / "base" / "consolidated.safetensors")
    gen = torch.Generator().manual_seed(5)
    adapter, merged = {}, dict(consolidated)
    for i in range(TINY_FULL.n_layers):
        for module in ("attention.wq", "attention.wk", "attention.wo", "feed_forward.w2"):
            w = consolidated[f"layers.{i}.{module}.weight"]
            a, b = 0.1 * torch.randn(3, w.shape[1], generator=gen), 0.1 * torch.randn(w.shape[0], 3, generator=gen)
            adapter[f"layers.{i}.{module}.lora_A.weight"], adapter[f"layers.{i}.{module}.lora_B.weight"] = a, b
            merged[f"layers.{i}.{module}.weight"] = w + 2.0 * b @ a
    save_file(adapter, tmp_path / "lora.safetensors")
    (tmp_path / "merged").mkdir()
    shutil.copy(tmp_path / "base" / "params.json", tmp_path / "merged")
    save_file(merged, tmp_path / "merged" / "consolidated.safetensors")
    reference = load_model(tmp_path / "merged", TINY_FULL, torch.float32)
    model = load_model(tmp_path / "base", TINY_FULL, torch.float32)
    load_adapter(model, tmp_path / "lora.safetensors")
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-4, atol=1e-4)


def test_bad_adapter_files_are_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    model = ventoux_from_hf(hf_model(TINY))
    with pytest.raises(VentouxError, match="is not an adapter"):
        load_adapter(model, tmp_path)
    save_file({"layers.0.attention.wq.lora_A.weight": torch.zeros(2, TINY.dim)}, tmp_path / "lora.safetensors")
    with pytest.raises(VentouxError, match="no lora_B"):
        load_adapter(model, tmp_path)
    save_file({"tok_embeddings.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(VentouxError, match="block linear"):
        load_adapter(model, tmp_path)
    save_file({"layers.0.attention.wq.lora_A.weight": torch.zeros(2, 5),
               "layers.0.attention.wq.lora_B.weight": torch.zeros(TINY.dim, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(VentouxError, match="another model"):
        load_adapter(model, tmp_path)


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
def test_frozen_layer_passes_dy_times_its_weight_to_the_input(cls, kernel):
    if cls is HalfLinear and not kernel_works():
        pytest.skip("ventoux's 16-bit CPU kernels do not run here")
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
def test_adapter_gets_its_gradient_through_a_frozen_kernel_base(kind):
    """An adapter in layer 0 learns only through the later layers' frozen products: their kernels (vnni,
    half_gemm, PyTorch's packed ones) must pass the gradient to their input, equal to the float product's."""
    if kind == "bf16" and not kernel_works():
        pytest.skip("ventoux's 16-bit CPU kernels do not run here")
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
    _randomize(model)
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


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A float32 HF checkpoint of a tiny model (with the demo tokenizer, for ventoux.load) and an adapter."""
    hf, model = _adapted(TINY_FULL.replace(vocab_size=2048))  # the demo tokenizer's size
    save_adapter(model, tmp_path / "adapter")
    save_hf(ventoux_from_hf(hf), tmp_path / "base", extra_files=[DEMO_MODEL / "tokenizer.model"])
    with torch.no_grad():
        expected = model(_tokens())
    return tmp_path, expected


def test_load_with_adapters_and_generate_per_adapter(tiny_checkpoint):
    from ventoux.params import SamplingParams

    tmp_path, expected = tiny_checkpoint
    llm = ventoux.load(str(tmp_path / "base"), dtype="float32", device="cpu", lora=str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(llm.model(_tokens()), expected, rtol=1e-5, atol=1e-5)
    several = ventoux.load(str(tmp_path / "base"), dtype="float32", device="cpu",
                           lora={"tuned": tmp_path / "adapter", "again": tmp_path / "adapter"})
    base = ventoux.load(str(tmp_path / "base"), dtype="float32", device="cpu")
    prompts, greedy = [[1, 5, 9, 33, 7], [1, 40, 2, 17]], {"max_tokens": 8, "temperature": 0}
    tuned = [c.tokens for c in llm.generate(prompts, **greedy)]
    plain = [c.tokens for c in base.generate(prompts, **greedy)]
    assert tuned != plain  # the adapter changes the greedy continuation of these prompts
    assert [c.tokens for c in several.generate(prompts, adapter="tuned", **greedy)] == tuned
    assert [c.tokens for c in several.generate(prompts, **greedy)] == plain  # several: none unless asked
    several.generate(prompts, adapter="tuned", max_tokens=1)
    with torch.no_grad():  # the request's choice ended with it: a plain forward sees the base, any batch size
        torch.testing.assert_close(several.model(_tokens(3)), base.model(_tokens(3)), rtol=1e-5, atol=1e-5)
    with several.engine(max_batch=4) as engine:  # rows of one decode batch on different adapters
        handles = [engine.submit(p, SamplingParams(**greedy), adapter=a)
                   for p in prompts for a in ("tuned", None)]
        got = [[ev.token for ev in h if ev.token is not None] for h in handles]
    assert got == [tuned[0], plain[0], tuned[1], plain[1]]
    with pytest.raises(VentouxError, match="unknown adapter"):
        several.generate(prompts[0], max_tokens=2, adapter="nope")


def test_merge_cli_output_loads_in_transformers_with_the_unmerged_logits(tiny_checkpoint):
    from transformers import MistralForCausalLM

    from ventoux.cli import main

    tmp_path, expected = tiny_checkpoint
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged"),
                 "--dtype", "float32"]) == 0
    assert (tmp_path / "merged" / "tokenizer.model").is_file()
    hf = MistralForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32,
                                            attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(_tokens()).logits, expected, rtol=1e-4, atol=1e-4)
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "nowhere"), str(tmp_path / "m2")]) == 1


def test_loading_pipeline_quantizes_then_applies_the_adapter(tiny_checkpoint):
    from ventoux.api import load_model

    tmp_path, expected = tiny_checkpoint
    cfg = TINY_FULL.replace(vocab_size=2048)
    model = load_model(tmp_path / "base", cfg, torch.float32, quantize="int8", lora=tmp_path / "adapter")
    wq = model.layers[0].attention.wq
    assert isinstance(wq, lora.LoRALinear) and isinstance(wq.base, Int8Linear)
    with torch.no_grad():
        got = model(_tokens())
    assert (got - expected).norm() / expected.norm() < 0.05  # int8 weights (and activations, vnni) round


def test_weights_module_only_reads_and_writes_checkpoints():
    """weights.py neither quantizes, swaps kernels nor applies adapters (api.load_model composes those)."""
    import ast

    import ventoux.weights

    tree = ast.parse(open(ventoux.weights.__file__).read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"quantize", "fastlinear", "lora", "lora_files", "api", "qlinear"}


def test_generate_cli_applies_the_adapter(tiny_checkpoint, capsys):
    from ventoux.cli import main

    tmp_path, _ = tiny_checkpoint
    base, adapter = str(tmp_path / "base"), str(tmp_path / "adapter")
    llm = ventoux.load(base, dtype="float32", device="cpu", lora=adapter)
    expected = llm.generate("To be", max_tokens=6, temperature=0).text
    assert expected != ventoux.load(base, dtype="float32", device="cpu").generate("To be", max_tokens=6,
                                                                                  temperature=0).text
    flags = ["--model", base, "--dtype", "float32", "--device", "cpu", "--max-tokens", "6", "--temperature", "0"]
    assert main(["generate", *flags, "--lora", adapter, "To be"]) == 0
    assert capsys.readouterr().out == "To be" + expected + "\n"
    assert main(["generate", *flags, "--lora", str(tmp_path / "missing"), "To be"]) == 1
    assert "is not an adapter" in capsys.readouterr().err


def test_rotary_permutation_is_what_consolidated_b_needs():
    """names.interleaved_to_halves on B (out, r) is the same row move as on the weight (out, in)."""
    w, b, a = torch.randn(64, 64), torch.randn(64, 3), torch.randn(3, 64)
    assert torch.allclose(names.interleaved_to_halves(w + b @ a, 4),
                          names.interleaved_to_halves(w, 4) + names.interleaved_to_halves(b, 4) @ a, atol=1e-5)
