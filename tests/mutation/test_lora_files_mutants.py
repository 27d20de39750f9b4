"""Adapter files (lora_files.py) behaviours that mutation testing (mutation/README.md) found unpinned: each bad
file's message whole (the CLI prints it as it is), what a PEFT config's fields do (scaling, rsLoRA, per-module
rank, dropout), a scaling given, and the whole adapter_config.json save_adapter writes."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import TINY, error_message, hf_model, ventoux_from_hf
from safetensors import safe_open
from safetensors.torch import save_file

from ventoux import lora
from ventoux.errors import VentouxError
from ventoux.lora_files import load_adapter, save_adapter

TARGETS = "wq, wk, wv, wo, w1, w2, w3"
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _peft(folder, config=None, tensors=None, rank=4):
    """A PEFT folder: a config (the given fields over r=4, lora_alpha=8) and q_proj's A and B of layer 0."""
    folder.mkdir(exist_ok=True)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, **(config or {})}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    gen = torch.Generator().manual_seed(0)
    if tensors is None:
        tensors = {f"{Q}.lora_A.weight": torch.randn(rank, TINY.dim, generator=gen),
                   f"{Q}.lora_B.weight": torch.randn(TINY.dim, rank, generator=gen)}
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


@pytest.fixture
def model():
    return ventoux_from_hf(hf_model(TINY))


_message = functools.partial(error_message, VentouxError)


@pytest.mark.parametrize("config, message", [
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not LORA; ventoux reads LoRA adapters only"),
    ({"use_dora": True}, "use_dora = True is not supported by ventoux (only plain LoRA: use_dora = False)"),
    ({"bias": "all"}, "bias = 'all' is not supported by ventoux (only plain LoRA: bias = 'none')"),
    ({"modules_to_save": ["lm_head"]},
     "modules_to_save = ['lm_head'] is not supported by ventoux (only plain LoRA: modules_to_save = None)"),
    ({"alpha_pattern": {"q_proj": 4}},
     "alpha_pattern = {'q_proj': 4} is not supported by ventoux (only plain LoRA: alpha_pattern = {})"),
    ({"fan_in_fan_out": True},
     "fan_in_fan_out = True is not supported by ventoux (only plain LoRA: fan_in_fan_out = False)"),
    ({"r": 0}, "r must be a positive integer, not 0; fix that field or re-save the adapter"),
    ({"r": "4"}, "r must be a positive integer, not '4'; fix that field or re-save the adapter"),
    ({"lora_alpha": None},
     "lora_alpha must be a positive finite number, not None; fix that field or re-save the adapter"),
    ({"lora_alpha": -8}, "lora_alpha must be a positive finite number, not -8; fix that field or re-save the adapter"),
])
def test_each_unsupported_peft_config_is_refused_whole(tmp_path, model, config, message):
    folder = _peft(tmp_path / "a", config)
    assert _message(lambda: load_adapter(model, folder)) == f"{folder / 'adapter_config.json'}: {message}"


def test_plain_values_of_the_unsupported_fields_are_taken(tmp_path, model):
    plain = {"use_dora": False, "bias": "none", "modules_to_save": None, "alpha_pattern": {}, "fan_in_fan_out": False}
    load_adapter(model, _peft(tmp_path / "a", plain))
    untyped = _peft(tmp_path / "b", {"lora_alpha": 0.5, "r": 1})  # no peft_type: LoRA; r is checked, not used
    config = json.loads((untyped / "adapter_config.json").read_text())
    del config["peft_type"]
    (untyped / "adapter_config.json").write_text(json.dumps(config))
    load_adapter(model, untyped, name="b")
    assert lora.adapter_names(model) == ["default", "b"]
    assert model.get_submodule("layers.0.attention.wq").adapters["b"].scaling == 0.5 / 4


def test_bad_files_are_refused_whole(tmp_path, model):
    folder = _peft(tmp_path / "a")
    config = folder / "adapter_config.json"
    config.write_text("{not json")
    assert _message(lambda: load_adapter(model, folder)) == f"{config} is not valid JSON; re-save the adapter"
    config.write_text("[1]")
    assert _message(lambda: load_adapter(model, folder)) == (f"{config}: peft_type None is not LORA; ventoux reads "
                                                              "LoRA adapters only")
    _peft(folder)
    (folder / "adapter_model.safetensors").unlink()
    assert _message(lambda: load_adapter(model, folder)) == (
        f"{folder} has adapter_config.json but no adapter_model.safetensors (adapter_model.bin is not read: re-save "
        "it with safe_serialization=True)")
    (folder / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    message = _message(lambda: load_adapter(model, folder))
    assert message.startswith(f"{folder / 'adapter_model.safetensors'} is not a readable safetensors file (")
    assert message.endswith("); re-download or re-save it")
    _peft(folder, tensors={"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64)})
    assert _message(lambda: load_adapter(model, folder)) == (
        f"{folder / 'adapter_model.safetensors'} holds tensor 'base_model.model.lm_head.lora_A.weight', which is not "
        f"a LoRA A/B matrix of a block linear ({TARGETS}); ventoux cannot apply it")
    empty = tmp_path / "empty"
    assert _message(lambda: load_adapter(model, empty)) == (
        f"{empty} is not an adapter: expected a folder with adapter_config.json and adapter_model.safetensors "
        "(PEFT), or mistral-finetune's lora.safetensors")


@pytest.mark.parametrize("tensors, message", [
    ({}, "holds no LoRA tensors"),
    ({"tok_embeddings.lora_A.weight": torch.zeros(2, 2)},
     f"holds tensor 'tok_embeddings.lora_A.weight', which is not a LoRA A/B matrix of a block linear ({TARGETS}); "
     "ventoux cannot apply it"),
    ({"layers.0.attention.wz.lora_A.weight": torch.zeros(2, 2)},
     f"holds tensor 'layers.0.attention.wz.lora_A.weight', which is not a LoRA A/B matrix of a block linear "
     f"({TARGETS}); ventoux cannot apply it"),
    ({"layers.0.attention.wq.lora_A.weight": torch.zeros(2, 64)},
     "has lora_A but no lora_B for layers.0.attention.wq; the file is incomplete"),
    ({"layers.0.attention.wq.lora_B.weight": torch.zeros(64, 2)},
     "has lora_B but no lora_A for layers.0.attention.wq; the file is incomplete"),
])
def test_each_bad_mistral_finetune_file_is_refused_whole(tmp_path, model, tensors, message):
    file = tmp_path / "lora.safetensors"
    save_file(tensors, file)
    assert _message(lambda: load_adapter(model, tmp_path)) == f"{file} {message}"


def test_peft_names_with_the_adapter_name_still_inside_are_read(tmp_path, model):
    """Some PEFT versions keep the adapter's name in the tensor names (lora_A.default.weight)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, TINY.dim, generator=gen), torch.randn(TINY.dim, 4, generator=gen)
    load_adapter(model, _peft(tmp_path / "a", tensors={f"{Q}.lora_A.my-task.weight": a,
                                                       f"{Q}.lora_B.my-task.weight": b}))
    adapter = model.get_submodule("layers.0.attention.wq").adapters["default"]
    assert torch.equal(adapter.lora_A, a) and torch.equal(adapter.lora_B, b)


def test_what_the_config_sets_and_what_a_caller_overrides(tmp_path, model):
    rank_pattern = {  # q_proj rank 4, k_proj rank 2 (PEFT's rank_pattern): each scaling from its own rank
        f"{Q}.lora_A.weight": torch.ones(4, 64), f"{Q}.lora_B.weight": torch.ones(64, 4),
        "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.ones(2, 64),
        "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": torch.ones(32, 2)}
    load_adapter(model, _peft(tmp_path / "a", {"lora_dropout": 0.25}, rank_pattern), name="plain", activate=False)
    load_adapter(model, _peft(tmp_path / "b", {"use_rslora": True}, rank_pattern), name="rs", dtype=torch.bfloat16)
    load_adapter(model, _peft(tmp_path / "c"), name="given", scaling=3.0)
    save_file({"layers.0.attention.wv.lora_A.weight": torch.ones(2, 64),
               "layers.0.attention.wv.lora_B.weight": torch.ones(32, 2)}, tmp_path / "lora.safetensors")
    load_adapter(model, tmp_path / "lora.safetensors", name="mistral")
    load_adapter(model, tmp_path / "lora.safetensors", name="mistral_given", scaling=0.5)
    load_adapter(model, tmp_path / "lora.safetensors", name="mistral_half", activate=False, dtype=torch.bfloat16)
    wq, wk, wv = (model.get_submodule(f"layers.0.attention.{n}") for n in ("wq", "wk", "wv"))
    assert (wq.adapters["plain"].scaling, wk.adapters["plain"].scaling) == (2.0, 4.0)  # 8 / 4, 8 / 2
    assert (wq.adapters["rs"].scaling, wk.adapters["rs"].scaling) == (4.0, 8 / 2 ** 0.5)  # 8 / sqrt(r)
    assert wq.adapters["given"].scaling == 3.0
    assert (wv.adapters["mistral"].scaling, wv.adapters["mistral_given"].scaling) == (2.0, 0.5)
    assert wq.adapters["plain"].dropout.p == 0.25 and isinstance(wq.adapters["rs"].dropout, torch.nn.Identity)
    assert wq.adapters["rs"].lora_A.dtype == torch.bfloat16 and wq.adapters["plain"].lora_A.dtype == torch.float32
    assert wv.adapters["mistral_half"].lora_B.dtype == torch.bfloat16 and wv.adapters["mistral"].lora_B.dtype == \
        torch.float32
    assert model.lora_selection.active == ["mistral_given"]


def test_save_adapter_refusals_whole(tmp_path, model):
    assert _message(lambda: save_adapter(model, tmp_path / "x")) == (
        "the model has adapters none: say which one to save")
    assert _message(lambda: save_adapter(model, tmp_path / "x", name="c")) == "unknown adapter 'c'; this model has none"
    for name in ("a", "b"):
        lora.add_adapter(model, lora.LoraConfig(rank=2, alpha=4, targets=("wq",)), name=name)
    assert _message(lambda: save_adapter(model, tmp_path / "x")) == (
        "the model has adapters ['a', 'b']: say which one to save")
    assert _message(lambda: save_adapter(model, tmp_path / "x", name="c")) == (
        "unknown adapter 'c'; this model has ['a', 'b']")
    lora.install(model, "mixed", {"layers.0.attention.wq": (torch.zeros(2, 64), torch.zeros(64, 2)),
                                  "layers.1.attention.wq": (torch.zeros(4, 64), torch.zeros(64, 4))}, 2.0)
    assert _message(lambda: save_adapter(model, tmp_path / "x", name="mixed")) == (
        "adapter 'mixed' mixes ranks or scalings across layers [(2, 2.0, 0.0), (4, 2.0, 0.0)]; one "
        "adapter_config.json cannot describe it")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("rank, alpha, want_alpha", [(4, 8, 8), (3, 4.5, 4.5)])
def test_save_adapter_writes_pefts_whole_config_and_tensors(tmp_path, model, rank, alpha, want_alpha):
    lora.add_adapter(model, lora.LoraConfig(rank=rank, alpha=alpha, dropout=0.1, targets=("wq", "w2")), name="t")
    lora.add_adapter(model, lora.LoraConfig(rank=2, targets=("wv",)), name="other")
    folder = save_adapter(model, tmp_path / "out", name="t", base_model_name_or_path="tiny")
    assert json.loads((folder / "adapter_config.json").read_text()) == {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "tiny", "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
        "layers_to_transform": None, "lora_alpha": want_alpha, "lora_dropout": 0.1, "modules_to_save": None,
        "peft_type": "LORA", "r": rank, "rank_pattern": {}, "revision": None, "target_modules": ["down_proj", "q_proj"],
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False}
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = sorted(f.keys())
        a = f.get_tensor(f"{Q}.lora_A.weight")
    assert type(json.loads((folder / "adapter_config.json").read_text())["lora_alpha"]) is type(want_alpha)
    with pytest.raises(VentouxError):  # an adapter folder is not replaced unless asked
        save_adapter(model, folder, name="t")
    save_adapter(model, folder, name="other", overwrite=True)
    assert json.loads((folder / "adapter_config.json").read_text())["target_modules"] == ["v_proj"]
    assert keys == sorted(f"base_model.model.model.layers.{i}.{m}.lora_{x}.weight" for i in range(TINY.n_layers)
                          for m in ("self_attn.q_proj", "mlp.down_proj") for x in "AB")
    assert torch.equal(a, model.get_submodule("layers.0.attention.wq").adapters["t"].lora_A.detach())
