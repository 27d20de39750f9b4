"""The configuration (config.py) where mutation testing (mutation/README.md, run through check_fresh.py: conftest
builds a ModelConfig at import) found it unpinned: the writers' keys (tests used the presets, whose values are
transformers' defaults, so a misspelt key read back the same), the readers' optional fields, each refusal's whole
message, a refusal on one of two conditions, zero sizes, and read_config on params.json and on weights that
contradict it."""

from __future__ import annotations

import json
import math

import pytest
from conftest import engine_model

from ventoux import config as config_module
from ventoux.config import ModelConfig, finite_number, read_config
from ventoux.errors import VentouxError

# Every field away from its default and from what the others imply (head_dim is not dim // n_heads).
ODD = ModelConfig(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, hidden_dim=40, vocab_size=50, head_dim=12,
                  norm_eps=1e-6, rope_theta=500000.0, sliding_window=64, max_seq_len=1024, bos_id=3, eos_id=4)
ODD_HF = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 96, "num_hidden_layers": 3,
          "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 12, "intermediate_size": 40,
          "vocab_size": 50, "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "sliding_window": 64,
          "max_position_embeddings": 1024, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 3,
          "eos_token_id": 4}
ODD_PARAMS = {"dim": 96, "n_layers": 3, "head_dim": 12, "hidden_dim": 40, "n_heads": 6, "n_kv_heads": 2,
              "norm_eps": 1e-6, "vocab_size": 50, "rope_theta": 500000.0, "max_seq_len": 1024, "sliding_window": 64}


def test_to_hf_writes_transformers_keys_that_transformers_reads_back():
    from transformers import MistralConfig

    assert ODD.to_hf() == ODD_HF
    hf = MistralConfig(**ODD.to_hf())
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim,
            hf.intermediate_size, hf.vocab_size, hf.rms_norm_eps, hf.sliding_window, hf.max_position_embeddings,
            hf.bos_token_id, hf.eos_token_id) == (96, 3, 6, 2, 12, 40, 50, 1e-6, 64, 1024, 3, 4)
    assert ModelConfig.from_hf(hf.to_dict()) == ODD


def test_params_json_round_trip_keeps_every_field_it_holds():
    assert ODD.to_params() == ODD_PARAMS
    assert ModelConfig.from_params(ODD_PARAMS) == ODD.replace(bos_id=1, eos_id=2)  # params.json holds no token ids


@pytest.mark.parametrize("bos, want", [(5, 5), (0, 0), (None, 1)])
def test_bos_token_id_is_read_and_null_means_1(bos, want):
    assert ModelConfig.from_hf({**ODD_HF, "bos_token_id": bos}).bos_id == want
    assert ModelConfig.from_hf({k: v for k, v in ODD_HF.items() if k != "bos_token_id"}).bos_id == 1


def test_eos_token_id_list_takes_the_first_and_an_empty_one_is_refused():
    assert ModelConfig.from_hf({**ODD_HF, "eos_token_id": [4, 7]}).eos_id == 4
    with pytest.raises(VentouxError) as e:
        ModelConfig.from_hf({**ODD_HF, "eos_token_id": []})
    assert str(e.value) == "config eos_id (token id)=None must be an integer in [0, vocab_size=50)"


@pytest.mark.parametrize("reader, name", [(ModelConfig.from_hf, "config.json"),
                                          (ModelConfig.from_params, "params.json")])
def test_a_non_object_is_refused_naming_the_file_and_the_type(reader, name):
    with pytest.raises(VentouxError) as e:
        reader([1, 2])
    assert str(e.value) == f"{name} must hold a JSON object of config fields, not list"


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "llama"}, "config.json describes model_type='llama' ['MistralForCausalLM']; ventoux runs Mistral "
                              "(MistralForCausalLM) dense models only"),
    ({"architectures": ["LlamaForCausalLM"]}, "config.json describes model_type='mistral' ['LlamaForCausalLM']; "
                                              "ventoux runs Mistral (MistralForCausalLM) dense models only"),
    ({"architectures": "MistralForCausalLM"}, "config.json field architectures='MistralForCausalLM' must be a list of "
                                              'strings, e.g. ["MistralForCausalLM"]'),
    ({"num_local_experts": 8}, "config.json describes a mixture-of-experts model; ventoux runs dense Mistral only"),
    ({"num_experts_per_tok": 2}, "config.json describes a mixture-of-experts model; ventoux runs dense Mistral only"),
    ({"hidden_act": "gelu"}, "config.json field hidden_act='gelu' is not supported; ventoux runs Mistral's SiLU only "
                             '("silu" or "swish")'),
    ({"tie_word_embeddings": True}, "config.json field tie_word_embeddings=True is not supported; Mistral keeps a "
                                    "separate output head (lm_head.weight)"),
    ({"rope_parameters": {"type": "yarn", "factor": 4.0}},
     "config.json field rope_parameters={'type': 'yarn', 'factor': 4.0} asks for RoPE scaling, which ventoux does not "
     "implement (Mistral 7B checkpoints have none); use a checkpoint without it"),
])
def test_each_hf_refusal_whole(changes, message):
    with pytest.raises(VentouxError) as e:
        ModelConfig.from_hf({**ODD_HF, **changes})
    assert str(e.value) == message


def test_each_params_refusal_whole():
    with pytest.raises(VentouxError) as e:
        ModelConfig.from_params({**ODD_PARAMS, "moe": {"num_experts": 8}})
    assert str(e.value) == "params.json describes a mixture-of-experts model; ventoux runs dense Mistral only"
    with pytest.raises(VentouxError) as e:
        ModelConfig.from_params({k: v for k, v in ODD_PARAMS.items() if k != "hidden_dim"})
    assert str(e.value) == "params.json is missing the field 'hidden_dim'; it is not a Mistral config"


def test_rope_parameters_without_a_type_only_carry_rope_theta():
    assert ModelConfig.from_hf({**ODD_HF, "rope_parameters": {"rope_theta": 2e6}}).rope_theta == 500000.0
    no_theta = {k: v for k, v in ODD_HF.items() if k != "rope_theta"}
    assert ModelConfig.from_hf({**no_theta, "rope_parameters": {"rope_theta": 2e6}}).rope_theta == 2e6


@pytest.mark.parametrize("field", ["n_layers", "hidden_dim", "max_seq_len"])
def test_a_zero_size_is_refused(field):
    with pytest.raises(VentouxError) as e:
        ODD.replace(**{field: 0})
    assert str(e.value) == f"config field {field}=0 must be a positive integer (at most {config_module.LIMITS[field]})"


def test_norm_eps_zero_is_refused():
    with pytest.raises(VentouxError, match=r"^config norm_eps \(rms_norm_eps\)=0 must be a number in \(0, 1\)"):
        ODD.replace(norm_eps=0)


@pytest.mark.parametrize("x, want", [(1, True), (0.5, True), (True, False), (math.inf, False), (math.nan, False),
                                     ("1", False)])
def test_finite_number(x, want):
    assert finite_number(x) is want


def test_integer_sizes_refuse_floats_and_bools():
    for value in (3.0, True):
        with pytest.raises(VentouxError, match="n_layers"):
            ODD.replace(n_layers=value)


def test_parameter_limit_is_inclusive_and_its_refusal_whole(monkeypatch):
    monkeypatch.setattr(config_module, "MAX_PARAMS", ODD.n_params)
    assert ODD.replace() == ODD
    with pytest.raises(VentouxError) as e:
        ODD.replace(n_layers=4)
    assert str(e.value) == ("config describes 0 B parameters, more than ventoux's limit of 0 B; check n_layers, dim "
                            "and hidden_dim")
    monkeypatch.undo()
    with pytest.raises(VentouxError) as e:
        ODD.replace(n_layers=1024, dim=2**16, n_heads=512, n_kv_heads=512, head_dim=128, hidden_dim=2**18)
    # 1024 layers of 2**16 * 128 * 2048 (attention) + 3 * 2**16 * 2**18 (feed-forward) weights: 70.369e12
    assert str(e.value) == ("config describes 70369 B parameters, more than ventoux's limit of 2000 B; check "
                            "n_layers, dim and hidden_dim")


def test_read_config_reads_params_json_and_checks_it_against_the_weights(tmp_path):
    from ventoux.weights import save_consolidated

    (tmp_path / "params.json").write_text(json.dumps(ODD_PARAMS))
    assert read_config(tmp_path) == ODD.replace(bos_id=1, eos_id=2)
    tiny = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=32000)
    save_consolidated(engine_model(tiny, 0), tmp_path / "m")
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    (tmp_path / "m" / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    with pytest.raises(VentouxError) as e:
        read_config(tmp_path / "m")
    assert str(e.value) == (f"{tmp_path / 'm' / 'params.json'} asks for 3 layers but the weights in {tmp_path / 'm'} "
                            "hold layers 2 (0..1); fix the layer count (num_hidden_layers / n_layers) in the config")
