"""Configuration: HF and Mistral readers, the v0.1 rope_theta pitfall, presets, refusals."""

import pytest

import ventoux
from ventoux.config import PRESETS, ModelConfig
from ventoux.errors import VentouxError

# The released files, as published for each version (fields that matter here).
V01_PARAMS = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
              "norm_eps": 1e-05, "sliding_window": 4096, "vocab_size": 32000}
V03_HF = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
          "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
          "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
          "vocab_size": 32768, "torch_dtype": "bfloat16", "some_future_key": 123}


def test_v01_params_without_rope_theta_means_10000():
    cfg = ModelConfig.from_params(V01_PARAMS)
    assert cfg.rope_theta == 10000.0 and cfg.sliding_window == 4096
    assert cfg == PRESETS["mistral-7b-v0.1"].config.replace(max_seq_len=cfg.max_seq_len)


def test_hf_config_ignores_unknown_keys_and_matches_preset():
    cfg = ModelConfig.from_hf(V03_HF)
    assert cfg == PRESETS["mistral-7b-v0.3"].config
    assert abs(cfg.n_params - 7.248e9) < 0.01e9  # "about 7.24 B"


def test_hf_round_trip_through_transformers_config():
    from transformers import MistralConfig

    cfg = PRESETS["mistral-7b-v0.1"].config
    assert ModelConfig.from_hf(MistralConfig(**cfg.to_hf()).to_dict()) == cfg
    assert ModelConfig.from_params(cfg.to_params()) == cfg


def test_head_dim_is_honoured():
    cfg = ModelConfig.from_hf({**V03_HF, "head_dim": 64})
    assert cfg.head_dim == 64


@pytest.mark.parametrize("bad, word", [
    ({**V03_HF, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 8}, "mixtral"),
    ({**V03_HF, "num_key_value_heads": 5}, "n_kv_heads"),
    ({k: v for k, v in V03_HF.items() if k != "hidden_size"}, "hidden_size"),
])
def test_unsupported_or_broken_configs_are_refused(bad, word):
    with pytest.raises(VentouxError, match=word):
        ModelConfig.from_hf(bad)


def test_mixtral_params_are_refused():
    with pytest.raises(VentouxError, match="mixture-of-experts"):
        ModelConfig.from_params({**V01_PARAMS, "moe": {"num_experts": 8}})


def test_preset_name_loads_its_repo_and_says_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: patch the constant itself
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(VentouxError, match="mistralai/Mistral-7B-Instruct-v0.3"):
        ventoux.load("mistral-7b-instruct-v0.3")


@pytest.mark.parametrize("bad, word", [
    ({**V03_HF, "architectures": 5}, "architectures=5 must be a list of strings"),
    ({**V03_HF, "architectures": "MistralForCausalLM"}, "architectures=.* must be a list of strings"),
    ({**V03_HF, "hidden_act": "relu"}, "hidden_act='relu' is not supported"),
    ({**V03_HF, "hidden_act": None}, "hidden_act=None is not supported"),
    ({**V03_HF, "rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling=.* RoPE scaling"),
    ({**V03_HF, "rope_scaling": {"factor": 4.0}}, "rope_scaling=.* RoPE scaling"),
    ({**V03_HF, "rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_parameters=.* RoPE scaling"),
    ({**V03_HF, "tie_word_embeddings": True}, "tie_word_embeddings=True is not supported"),
])
def test_hf_fields_that_would_change_the_model_are_refused_in_one_line(bad, word):
    with pytest.raises(VentouxError, match=word) as e:
        ModelConfig.from_hf(bad)
    assert "config.json field" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("extra", [
    {"hidden_act": "silu"}, {"hidden_act": "swish"}, {"rope_scaling": None},
    {"rope_scaling": {"rope_type": "default"}}, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    {"torch_dtype": "int7"}, {"torch_dtype": 5}, {"dtype": "bfloat16"},  # the dtype fields are never read
])
def test_hf_fields_meaning_plain_mistral_are_accepted(extra):
    assert ModelConfig.from_hf({**V03_HF, **extra}) == PRESETS["mistral-7b-v0.3"].config


@pytest.mark.parametrize("key, value", [("yarn", {"factor": 16, "original_max_position_embeddings": 16384}),
                                        ("rope_scaling", {"type": "linear", "factor": 2.0})])
def test_params_rope_scaling_is_refused(key, value):
    with pytest.raises(VentouxError, match=f"params.json field {key}=.* RoPE scaling"):
        ModelConfig.from_params({**V01_PARAMS, key: value})
    assert ModelConfig.from_params({**V01_PARAMS, key: None}).rope_theta == 10000.0


def test_read_config_names_the_file_for_a_bad_architectures(tmp_path):
    import json

    from ventoux.config import read_config

    (tmp_path / "config.json").write_text(json.dumps({**V03_HF, "architectures": 5}))
    with pytest.raises(VentouxError, match=r"config\.json: config\.json field architectures=5"):
        read_config(tmp_path)
