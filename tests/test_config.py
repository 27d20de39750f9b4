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


# ---- what the config derives and defaults to, and its bounds (written from a review of config.py) ------------
def test_n_params_counts_the_models_parameters_and_kv_bytes_its_cache():
    import torch

    from ventoux.cache import KVCache
    from ventoux.model import Transformer

    cfg = ModelConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, hidden_dim=112, vocab_size=97, head_dim=16)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert cfg.n_params == sum(p.numel() for p in model.parameters())
    for dtype in (torch.bfloat16, torch.float32):
        cache = KVCache(cfg, 1, dtype=dtype, capacity=10)
        per_slot = sum(t.nbytes for t in cache.k + cache.v) // (cache.capacity + 1)  # + its scratch slot
        assert cfg.kv_bytes_per_token(dtype.itemsize) == per_slot


def test_hf_config_defaults_are_transformers_mistral_defaults():
    from transformers import MistralConfig

    minimal = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
               "vocab_size": 100}
    cfg = ModelConfig.from_hf(minimal)
    hf = MistralConfig(**minimal)
    assert (cfg.n_kv_heads, cfg.norm_eps, cfg.max_seq_len, cfg.bos_id, cfg.eos_id) == (
        4, hf.rms_norm_eps, 32768, hf.bos_token_id, hf.eos_token_id)
    assert cfg.rope_theta == 10000.0 and cfg.sliding_window is None and cfg.head_dim == 16
    assert ModelConfig.from_hf({**minimal, "rope_parameters": {"rope_theta": 5e5}}).rope_theta == 5e5
    assert ModelConfig.from_hf({**minimal, "rope_theta": 2e4, "rope_parameters": {"rope_theta": 5e5}}).rope_theta == 2e4
    assert ModelConfig.from_hf({**minimal, "bos_token_id": None, "eos_token_id": [7, 2]}).eos_id == 7
    assert ModelConfig.from_hf({**minimal, "bos_token_id": None}).bos_id == 1


def test_params_json_defaults_and_sliding_window_written_only_when_set():
    cfg = ModelConfig.from_params({k: v for k, v in V01_PARAMS.items() if k not in ("n_kv_heads", "norm_eps",
                                                                                     "head_dim", "sliding_window")})
    assert (cfg.n_kv_heads, cfg.norm_eps, cfg.head_dim, cfg.sliding_window, cfg.max_seq_len) == (32, 1e-5, 128, None,
                                                                                                  32768)
    assert "sliding_window" not in cfg.to_params()
    assert ModelConfig.from_params(V01_PARAMS).to_params()["sliding_window"] == 4096


@pytest.mark.parametrize("field", ["dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size",
                                   "head_dim", "max_seq_len", "sliding_window"])
def test_each_size_is_accepted_up_to_its_limit_and_refused_one_above(field):
    from ventoux.config import LIMITS

    small = ModelConfig(dim=64, n_layers=1, n_heads=1, n_kv_heads=1, hidden_dim=8, vocab_size=8, head_dim=8)
    at_limit = {"n_heads": {"n_kv_heads": 1}, "n_kv_heads": {"n_heads": LIMITS["n_kv_heads"]}}.get(field, {})
    assert getattr(small.replace(**at_limit, **{field: LIMITS[field]}), field) == LIMITS[field]
    with pytest.raises(VentouxError) as e:
        small.replace(**{field: LIMITS[field] + 1})
    assert str(e.value) == (f"config field {field}={LIMITS[field] + 1} must be "
                            f"{'a positive integer or null' if field == 'sliding_window' else 'a positive integer'} "
                            f"(at most {LIMITS[field]})")


@pytest.mark.parametrize("changes, message", [
    ({"norm_eps": 1}, "config norm_eps (rms_norm_eps)=1 must be a number in (0, 1), e.g. 1e-5"),
    ({"rope_theta": 1}, "config rope_theta=1 must be a finite number > 1, e.g. 10000.0 (Mistral 7B v0.1) or "
                        "1000000.0 (v0.2, v0.3)"),
    ({"eos_id": 8}, "config eos_id (token id)=8 must be an integer in [0, vocab_size=8)"),
    ({"bos_id": -1}, "config bos_id (token id)=-1 must be an integer in [0, vocab_size=8)"),
    ({"n_heads": 3, "n_kv_heads": 2}, "config n_heads=3 must be a multiple of n_kv_heads=2"),
])
def test_each_range_refusal_whole_and_its_edges_accepted(changes, message):
    small = ModelConfig(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=8, vocab_size=8, head_dim=8)
    with pytest.raises(VentouxError) as e:
        small.replace(**changes)
    assert str(e.value) == message
    edge = small.replace(norm_eps=0.999, rope_theta=1.001, bos_id=0, eos_id=7)
    assert (edge.norm_eps, edge.rope_theta, edge.bos_id, edge.eos_id) == (0.999, 1.001, 0, 7)
    assert isinstance(small.replace(rope_theta=500000).rope_theta, float)


def test_read_config_prefers_config_json_and_names_what_is_wrong(tmp_path):
    import json

    from ventoux.config import read_config

    with pytest.raises(VentouxError) as e:
        read_config(tmp_path)
    assert str(e.value) == f"{tmp_path} has neither config.json nor params.json; point at a model checkpoint folder"
    (tmp_path / "params.json").write_text(json.dumps(V01_PARAMS))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(VentouxError, match=rf"^{tmp_path / 'config.json'} is not valid JSON \(.*\); re-download or "
                                           "fix the file$"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe")
    with pytest.raises(VentouxError, match="is not valid JSON"):
        read_config(tmp_path)
