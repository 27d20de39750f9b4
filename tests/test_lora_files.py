"""LoRA adapter files and where adapters enter: PEFT's folder (both ways, with the real peft package on
transformers' Mistral), mistral-finetune's lora.safetensors, ventoux.load(lora=...), per-request adapters,
the loading pipeline, `ventoux merge` and `--lora` on the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY, TINY_FULL, hf_model, ventoux_from_hf
from test_lora import _adapted, _tokens

import ventoux
from ventoux import lora, names
from ventoux.api import DEMO_MODEL
from ventoux.errors import VentouxError
from ventoux.lora_files import load_adapter, save_adapter
from ventoux.qlinear import Int8Linear
from ventoux.weights import load_model, save_consolidated, save_hf

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


D, KV = TINY.dim, TINY.n_kv_heads * TINY.head_dim
GOOD_PAIR = {"layers.0.attention.wv": (torch.ones(2, D), torch.ones(KV, 2))}  # installed first, were it not checked


def _write_adapter(folder, fmt: str, tensors: dict) -> tuple:
    """tensors {ventoux module: (A, B)} as a PEFT folder or as mistral-finetune's lora.safetensors;
    returns (the weights file, the file's name for a module's tensor)."""
    from safetensors.torch import save_file

    folder.mkdir()
    if fmt == "peft":
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
        file = folder / "adapter_model.safetensors"
        prefix = "base_model.model."
    else:
        file, prefix = folder / "lora.safetensors", ""

    def key(module: str, ab: str) -> str:
        name = names.to_hf(module + ".weight") if fmt == "peft" else module + ".weight"
        return f"{prefix}{name.removesuffix('.weight')}.lora_{ab}.weight"

    save_file({key(m, ab): t for m, pair in tensors.items() for ab, t in zip("AB", pair)}, file)
    return file, key


@pytest.mark.parametrize("fmt", ["peft", "mistral"])
@pytest.mark.parametrize("module,a,b,bad,expected", [
    ("attention.wq", torch.zeros(0, D), torch.zeros(D, 0), "A", f"[r, {D}] with r >= 1"),  # rank 0
    ("attention.wq", torch.zeros(2, D), torch.zeros(D + 5, 2), "B", f"[{D}, 2]"),
    ("attention.wk", torch.zeros(2, D), torch.zeros(7, 2), "B", f"[{KV}, 2]"),
    ("attention.wq", torch.zeros(2, D), torch.zeros(D), "B", f"[{D}, 2]"),
    ("attention.wo", torch.zeros(2, D + 1), torch.zeros(D, 2), "A", f"[r, {D}] with r >= 1"),
])
def test_adapter_tensors_of_the_wrong_shape_are_named_before_the_model_changes(tmp_path, fmt, module, a, b, bad,
                                                                               expected):
    file, key = _write_adapter(tmp_path / "adapter", fmt, {**GOOD_PAIR, f"layers.1.{module}": (a, b)})
    model = ventoux_from_hf(hf_model(TINY))
    with pytest.raises(VentouxError) as error:
        load_adapter(model, tmp_path / "adapter")
    shape = list((a, b)["AB".index(bad)].shape)
    assert str(error.value).startswith(f"{file}: tensor {key(f'layers.1.{module}', bad)!r} has shape {shape}, but "
                                       f"layers.1.{module} needs {expected}"), error.value
    assert str(error.value).endswith("; the adapter was made for another model, or the file is damaged")
    assert "\n" not in str(error.value) and not lora.lora_layers(model)  # nothing installed, not even the good pair


@pytest.mark.parametrize("fmt", ["peft", "mistral"])
def test_an_adapter_for_a_layer_the_model_lacks_is_named_and_rank_1_is_taken(tmp_path, fmt):
    file, key = _write_adapter(tmp_path / "deep", fmt, {**GOOD_PAIR, "layers.9.attention.wq": (torch.ones(2, D),
                                                                                               torch.ones(D, 2))})
    model = ventoux_from_hf(hf_model(TINY))
    with pytest.raises(VentouxError) as error:
        load_adapter(model, tmp_path / "deep")
    assert str(error.value) == (f"{file} holds {key('layers.9.attention.wq', 'A')!r}, an adapter for "
                                "layers.9.attention.wq, which this model does not have (the adapter was made for a "
                                "deeper model)")
    assert not lora.lora_layers(model)
    _write_adapter(tmp_path / "rank1", fmt, {"layers.1.attention.wq": (torch.ones(1, D), torch.ones(D, 1))})
    load_adapter(model, tmp_path / "rank1")
    assert model.get_submodule("layers.1.attention.wq").adapters["default"].rank == 1


@pytest.mark.parametrize("fmt", ["peft", "mistral"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_adapters_holding_nan_or_inf_are_refused_naming_the_tensor(tmp_path, fmt, value):
    b = torch.ones(D, 2)
    b[5, 1] = value
    file, key = _write_adapter(tmp_path / "adapter", fmt, {**GOOD_PAIR, "layers.1.attention.wq": (torch.ones(2, D), b)})
    model = ventoux_from_hf(hf_model(TINY))
    with pytest.raises(VentouxError) as error:
        load_adapter(model, tmp_path / "adapter")
    assert str(error.value).startswith(f"tensor {key('layers.1.attention.wq', 'B')!r} in {file} holds 1 NaN or "
                                       "infinite value(s)"), error.value
    assert not lora.lora_layers(model)


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """A real PEFT adapter of the TINY model (rank 2 on every block linear), as peft's save_pretrained writes it."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("peft") / "adapter"
    config = LoraConfig(r=2, lora_alpha=4, target_modules=HF_TARGETS, task_type="CAUSAL_LM")
    get_peft_model(hf_model(TINY), config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("field,value,rule", [
    ("lora_dropout", 1.5, "a number in [0, 1)"), ("lora_dropout", -0.5, "a number in [0, 1)"),
    ("lora_dropout", "abc", "a number in [0, 1)"), ("lora_dropout", 1, "a number in [0, 1)"),
    ("lora_alpha", 0, "a positive finite number"), ("lora_alpha", float("inf"), "a positive finite number"),
    ("lora_alpha", True, "a positive finite number"), ("r", 2.5, "a positive integer"),
    ("target_modules", 7, "a list of module names (or one pattern)"),
    ("target_modules", ["q_proj", 1], "a list of module names (or one pattern)"),
])
def test_bad_adapter_config_fields_are_one_line_errors(peft_adapter, tmp_path, field, value, rule):
    folder = shutil.copytree(peft_adapter, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    model = ventoux_from_hf(hf_model(TINY))
    with pytest.raises(VentouxError) as error:
        load_adapter(model, folder)
    assert str(error.value).startswith(f"{folder / 'adapter_config.json'}: {field} must be {rule}, not {value!r}")
    assert "\n" not in str(error.value) and not lora.lora_layers(model)
    (folder / "adapter_config.json").write_text(json.dumps(config))  # the adapter as PEFT wrote it loads
    assert len(lora.lora_layers(load_adapter(model, folder))) == len(HF_TARGETS) * TINY.n_layers


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


def test_merge_overwrite_replaces_only_a_checkpoint_folder(tiny_checkpoint, capsys, monkeypatch):
    from ventoux.cli import main

    tmp_path, _ = tiny_checkpoint
    base, adapter = str(tmp_path / "base"), str(tmp_path / "adapter")
    precious = tmp_path / "precious"
    (precious / "chapters").mkdir(parents=True)
    (precious / "thesis.txt").write_text("years of work")
    afile = tmp_path / "garbage.bin"
    afile.write_text("mine")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out, words in [(precious, ["holds chapters", "will not delete it"]), (afile, ["is not a folder"]),
                       (".", ["has no name of its own"]), ("..", ["has no name of its own"])]:
        assert main(["merge", "--overwrite", base, adapter, str(out)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(w in err for w in words), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing moved or deleted
    assert (precious / "thesis.txt").read_text() == "years of work" and afile.read_text() == "mine"
    (tmp_path / "empty").mkdir()
    for out in ("empty", "merged", "merged"):  # an empty folder, a new one, then ventoux's own output again
        assert main(["merge", "--overwrite", base, adapter, str(tmp_path / out)]) == 0
        assert (tmp_path / out / "model.safetensors").is_file()


def test_merge_refuses_an_adapter_holding_nan_and_writes_nothing(tiny_checkpoint, capsys):
    from safetensors.torch import load_file, save_file

    from ventoux.cli import main

    tmp_path, _ = tiny_checkpoint
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[-1]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"tensor {key!r} in {weights} holds 1 NaN" in err, err
    assert not (tmp_path / "merged").exists()


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
