"""Quantization (quantize.py) where mutation testing (mutation/README.md) found it unpinned: quantize_checkpoint
outside the CLI's child process (its dtype, head, tokenizer files and overwrite), a user's hook chained after
quantizing, the kernel the head gets when the blocks name one, quantizing a quantized model, the checks of a
quantized checkpoint's config and tensors with their whole messages, and save_quantized's refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_quantize import CFG, _edit_config, _model, _saved
from torch import nn

from ventoux.api import load_model
from ventoux.errors import VentouxError
from ventoux.qlinear import Int4Linear, Int8Embedding, Int8Linear
from ventoux.quantize import (
    Scheme,
    config_entry,
    is_target,
    load_quantized,
    parse_quantize,
    parse_scheme,
    quantize_checkpoint,
    quantize_model,
    quantize_module,
    read_quantization,
    save_quantized,
)
from ventoux.weights import save_hf

TOKENS = torch.tensor([[5, 17, 3, 99, 42, 7]])
SCHEMES = ("int8, int8-g32, int8-g64, int8-g128, int6, int6-g32, int6-g64, int6-g128, int4, int4-g32, int4-g64, "
           "int4-g128")


def _float_checkpoint(tmp_path, dtype=torch.float32):
    src = tmp_path / "float"
    save_hf(_model().to(dtype), src)
    (src / "tokenizer.model").write_bytes(b"not read here, only copied")
    return src


def test_quantize_checkpoint_writes_what_quantize_model_gives_with_the_tokenizer(tmp_path):
    src = _float_checkpoint(tmp_path)
    dst = quantize_checkpoint(src, tmp_path / "q", "int4-g64", include_output="int8-g32", dtype=torch.bfloat16)
    assert read_quantization(dst) == (Scheme(4, 64), Scheme(8, 32))
    assert (dst / "tokenizer.model").read_bytes() == b"not read here, only copied"
    with safe_open(dst / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16  # loaded in the dtype asked for
    want = quantize_model(_model().to(torch.bfloat16), "int4-g64", include_output="int8-g32", kernel="fallback")
    got = load_quantized(dst)
    assert isinstance(got.output, Int8Linear) and got.output.group_size == 32
    with torch.no_grad():
        torch.testing.assert_close(got(TOKENS), want(TOKENS), rtol=0.02, atol=0.02)
    with pytest.raises(VentouxError, match="exists"):  # overwrite is off unless asked for
        quantize_checkpoint(src, dst, "int8")
    assert read_quantization(quantize_checkpoint(src, dst, "int8", overwrite=True)) == (Scheme(8), Scheme(8))


def test_quantize_checkpoint_refuses_a_quantized_source_whole(tmp_path):
    folder = _saved(tmp_path, "int4-g64")
    with pytest.raises(VentouxError) as e:
        quantize_checkpoint(folder, tmp_path / "again", "int8")
    assert str(e.value) == (f"{folder} is already quantized (int4-g64); quantize its float checkpoint, or dequantize "
                            "it first with `ventoux convert SRC DST --format hf --dtype bfloat16`")


def test_a_users_hook_runs_after_quantizing_on_every_module(tmp_path):
    src = _float_checkpoint(tmp_path)
    seen = {}

    def record(name, module):
        seen[name] = type(module)
        return module

    load_model(src, CFG, None, quantize="int4", transform=record)
    assert seen["layers.0.attention.wq"] is Int4Linear and seen["output"] is Int8Linear
    assert seen["tok_embeddings"] is Int8Embedding and seen["norm"].__name__ == "RMSNorm"


def test_a_users_hook_runs_after_an_old_files_table_is_quantized(tmp_path):
    folder = _saved(tmp_path, "int8")
    tensors = load_file(folder / "model.safetensors")  # as written before tables were quantized: a float table
    table = tensors.pop("model.embed_tokens.qweight").float() * tensors.pop("model.embed_tokens.scales")[:, None]
    save_file({**tensors, "model.embed_tokens.weight": table}, folder / "model.safetensors")
    seen = {}
    load_model(folder, CFG, None, transform=lambda name, module: seen.setdefault(name, module))
    assert isinstance(seen["tok_embeddings"], Int8Embedding)


def test_the_head_takes_the_fallback_kernel_the_blocks_ask_for():
    model = quantize_model(_model(), "int4", kernel="fallback")
    assert model.output.kernel == "fallback" and model.layers[0].attention.wq.kernel == "fallback"
    assert quantize_module(nn.Linear(64, 8, bias=False), "int8", kernel="fallback").kernel == "fallback"


def test_quantizing_a_quantized_model_changes_nothing():
    model = quantize_model(_model(), "int8-g32")
    with torch.no_grad():
        before = model(TOKENS)
        table = model.tok_embeddings
        assert quantize_model(model, "int8-g32").tok_embeddings is table
        torch.testing.assert_close(model(TOKENS), before, rtol=0, atol=0)


def test_only_bias_free_linears_are_quantized():
    for module, what in ((nn.Linear(8, 8, bias=True), "one with a bias"), (nn.Embedding(8, 8), "Embedding")):
        with pytest.raises(VentouxError) as e:
            quantize_module(module, "int8")
        assert str(e.value) == f"only bias-free nn.Linear layers can be quantized, not {what}"


def test_is_target_takes_the_block_linears_and_the_head_only_when_asked():
    assert is_target("layers.3.attention.wq") and is_target("layers.0.feed_forward.w2")
    assert not is_target("layers.0.attention_norm") and not is_target("attention.wq")
    assert not is_target("output") and is_target("output", include_output=True)


def test_parse_scheme_and_quantize_name_every_valid_scheme():
    with pytest.raises(VentouxError) as e:
        parse_scheme("int3")
    assert str(e.value) == f"unknown quantization scheme 'int3'; valid schemes: {SCHEMES}"
    assert parse_quantize(Scheme(4, 64)) == (Scheme(4, 64), Scheme(8))
    assert config_entry("int4-g64", True) == {"scheme": "int4", "group_size": 64, "include_output": True,
                                              "output_scheme": "int4-g64", "format_version": 1}


@pytest.mark.parametrize("changes, message", [
    ({"format_version": 2}, "quantization.format_version 2 is not one this ventoux reads (1); upgrade ventoux or "
                            "re-quantize the checkpoint"),
    ({"group_size": 48}, "quantization.group_size 48 is not one of (32, 64, 128); fix the config or re-quantize"),
    ({"include_output": "yes"}, "quantization.include_output must be true or false, not 'yes'"),
    ({"output_scheme": "int3"}, f"quantization.output_scheme 'int3' is unknown; valid: {SCHEMES}"),
])
def test_each_quantization_entry_refusal_whole(tmp_path, changes, message):
    folder = _saved(tmp_path, "int4")
    _edit_config(folder, **changes)
    with pytest.raises(VentouxError) as e:
        read_quantization(folder)
    assert str(e.value) == f"{folder / 'config.json'}: {message}"


def test_an_entry_without_version_or_head_fields_reads_as_version_1_with_a_float_head(tmp_path):
    folder = _saved(tmp_path, "int4")
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization"] = {"scheme": "int4", "group_size": 32}
    path.write_text(json.dumps(config))
    assert read_quantization(folder) == (Scheme(4, 32), None)


def test_a_broken_config_or_entry_is_refused_whole(tmp_path):
    folder = _saved(tmp_path, "int8")
    path = folder / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "quantization": "int8"}))
    with pytest.raises(VentouxError) as e:
        read_quantization(folder)
    assert str(e.value) == (f"{path}: quantization must be an object like {{'scheme': 'int4', 'group_size': 32, "
                            "'include_output': False, 'output_scheme': None, 'format_version': 1}")
    path.write_text("[1, 2]")
    with pytest.raises(VentouxError) as e:
        read_quantization(folder)
    assert str(e.value) == f"{path} is not a valid JSON object; re-download or fix the file"


@pytest.mark.parametrize("edit, message", [
    ({"group_size": None}, "holds group-wise scales {shape}, but config.json says quantization.scheme 'int8' with "
                           "group_size null (one scale a row); fix the config or re-quantize"),
    ({"group_size": 64}, "has shape {shape} for {inputs} inputs, which does not match config.json's "
                         "quantization.group_size 64; fix the config or re-quantize"),
])
def test_scales_that_contradict_the_config_are_named_whole(tmp_path, edit, message):
    folder = _saved(tmp_path, "int8-g32")
    _edit_config(folder, **edit)
    with pytest.raises(VentouxError) as e:
        load_quantized(folder)
    name = str(e.value).split("'")[1]
    with safe_open(folder / "model.safetensors", "pt") as f:
        shape = list(f.get_slice(name).get_shape())
        inputs = f.get_slice(name.removesuffix("scales") + "qweight").get_shape()[1]
    assert shape[1] * 32 == inputs
    assert str(e.value) == f"tensor {name!r} " + message.format(shape=shape, inputs=inputs)


def test_a_scales_tensor_without_its_qweight_is_named_as_missing(tmp_path):
    folder = _saved(tmp_path, "int8")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.qweight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(VentouxError, match="model.layers.1.mlp.up_proj.qweight"):
        load_quantized(folder)


def test_load_quantized_loads_in_the_dtype_asked_for(tmp_path):
    model = load_quantized(_saved(tmp_path, "int4"), dtype=torch.bfloat16)
    assert model.norm.weight.dtype == torch.bfloat16


def test_save_quantized_refusals_whole_and_its_files(tmp_path):
    with pytest.raises(VentouxError) as e:
        save_quantized(_model(), tmp_path / "a")
    assert str(e.value) == "the model is not quantized: pass a scheme (int8, int4, int4-g64, ...) to save it"
    with pytest.raises(VentouxError) as e:
        save_quantized(quantize_model(_model(), "int4"), tmp_path / "a", "int8")  # its head: int8, not int4
    assert str(e.value) == ("the model is quantized as int4-g32, not int8; load the float weights to quantize them "
                            "another way")
    extra = tmp_path / "tokenizer.model"
    extra.write_bytes(b"tok")
    folder = save_quantized(quantize_model(_model(), "int8"), tmp_path / "q", extra_files=[extra])
    assert (folder / "tokenizer.model").read_bytes() == b"tok"
    with pytest.raises(VentouxError, match="exists"):
        save_quantized(quantize_model(_model(), "int4"), folder)
    save_quantized(quantize_model(_model(), "int4"), folder, overwrite=True)
    assert read_quantization(folder)[0] == Scheme(4, 32)


def test_a_model_that_mixes_schemes_is_refused_whole(tmp_path):
    model = quantize_model(_model(), "int8")
    model.layers[1].attention.wq = quantize_module(nn.Linear(128, 128, bias=False), "int4")
    with pytest.raises(VentouxError) as e:
        save_quantized(model, tmp_path / "a")
    assert str(e.value) == ("the model mixes quantization schemes (['int4-g32', 'int8']); one config cannot "
                            "describe it")
    model = quantize_model(_model(), "int8")
    model.layers[1].feed_forward.w2 = nn.Linear(256, 128, bias=False)
    with pytest.raises(VentouxError) as e:
        save_quantized(model, tmp_path / "a")
    assert str(e.value) == ("the model mixes quantization schemes (['int8'] and float layers "
                            "layers.1.feed_forward.w2); one config cannot describe it")
