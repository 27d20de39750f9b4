"""Model configuration: one dataclass, read from HF config.json or Mistral params.json.

    cfg = ModelConfig.from_hf(json.load(open("config.json")))
    cfg = ModelConfig.from_params(json.load(open("params.json")))   # missing rope_theta -> 10000
    cfg = PRESETS["mistral-7b-v0.1"].config
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import VentouxError


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    vocab_size: int
    head_dim: int | None = None  # None -> dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # None -> full attention
    max_seq_len: int = 32768  # the context the model was trained for
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        for name in ("dim", "n_heads"):  # head_dim derives from these two
            _check_size(name, getattr(self, name))
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        for name in ("n_layers", "n_kv_heads", "hidden_dim", "vocab_size", "head_dim", "max_seq_len"):
            _check_size(name, getattr(self, name))
        if self.n_heads % self.n_kv_heads:
            raise VentouxError(
                f"config n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.sliding_window is not None:
            _check_size("sliding_window", self.sliding_window, "a positive integer or null")
        if not (finite_number(self.norm_eps) and 0 < self.norm_eps < 1):
            raise VentouxError(f"config norm_eps (rms_norm_eps)={self.norm_eps!r} must be a number in (0, 1), "
                               "e.g. 1e-5")
        if not (finite_number(self.rope_theta) and self.rope_theta > 1):
            raise VentouxError(f"config rope_theta={self.rope_theta!r} must be a finite number > 1, e.g. 10000.0 "
                               "(Mistral 7B v0.1) or 1000000.0 (v0.2, v0.3)")
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        for name in ("bos_id", "eos_id"):
            value = getattr(self, name)
            if not (_integer(value) and 0 <= value < self.vocab_size):
                raise VentouxError(f"config {name} (token id)={value!r} must be an integer in [0, vocab_size="
                                   f"{self.vocab_size})")
        if self.n_params > MAX_PARAMS:
            raise VentouxError(f"config describes {self.n_params / 1e9:.0f} B parameters, more than ventoux's "
                               f"limit of {MAX_PARAMS / 1e9:.0f} B; check n_layers, dim and hidden_dim")

    # ---- derived facts -------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        return self.n_layers * per_layer + 2 * self.vocab_size * self.dim + self.dim

    def kv_bytes_per_token(self, bytes_per_value: int) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_value

    # ---- readers and writers -------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        """From a transformers MistralConfig dict; unknown keys are ignored."""
        _check_object(d, "config.json")
        arch = d.get("model_type") or ""
        archs = d.get("architectures") or []
        if not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
            raise VentouxError(f"config.json field architectures={archs!r} must be a list of strings, "
                               'e.g. ["MistralForCausalLM"]')
        if arch not in ("mistral", "") or any(a != "MistralForCausalLM" for a in archs):
            raise VentouxError(
                f"config.json describes model_type={arch!r} {archs}; ventoux runs Mistral "
                "(MistralForCausalLM) dense models only"
            )
        if d.get("num_local_experts") or d.get("num_experts_per_tok"):
            raise VentouxError("config.json describes a mixture-of-experts model; ventoux runs dense Mistral only")
        # The model hard-codes SiLU; "swish" is the same function in transformers' ACT2FN.
        if d.get("hidden_act", "silu") not in ("silu", "swish"):
            raise VentouxError(f"config.json field hidden_act={d['hidden_act']!r} is not supported; ventoux runs "
                               'Mistral\'s SiLU only ("silu" or "swish")')
        # rope_parameters is where transformers 5 moves rope_scaling; without a type it only carries rope_theta.
        _check_plain_rope(d, "config.json", {"rope_scaling": "unknown", "rope_parameters": "default"})
        # Mistral keeps a separate output head: a tied checkpoint has no lm_head.weight, which would read as a
        # truncated download.
        if d.get("tie_word_embeddings"):
            raise VentouxError(f"config.json field tie_word_embeddings={d['tie_word_embeddings']!r} is not "
                               "supported; Mistral keeps a separate output head (lm_head.weight)")
        # torch_dtype (or dtype) is not read: the load dtype comes from the caller or the device, not the file.
        try:
            return cls(
                dim=d["hidden_size"],
                n_layers=d["num_hidden_layers"],
                n_heads=d["num_attention_heads"],
                n_kv_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
                hidden_dim=d["intermediate_size"],
                vocab_size=d["vocab_size"],
                head_dim=d.get("head_dim"),
                norm_eps=d.get("rms_norm_eps", 1e-6),
                rope_theta=d.get("rope_theta", _rope_parameters(d).get("rope_theta", 10000.0)),
                sliding_window=d.get("sliding_window"),
                max_seq_len=d.get("max_position_embeddings", 32768),
                bos_id=1 if d.get("bos_token_id") is None else d["bos_token_id"],
                eos_id=_first(d.get("eos_token_id", 2)),
            )
        except KeyError as e:
            raise VentouxError(f"config.json is missing the field {e.args[0]!r}; it is not a Mistral config") from None

    @classmethod
    def from_params(cls, d: dict) -> ModelConfig:
        """From Mistral's params.json. A missing rope_theta means 10000 (the v0.1 pitfall)."""
        _check_object(d, "params.json")
        if d.get("moe"):
            raise VentouxError("params.json describes a mixture-of-experts model; ventoux runs dense Mistral only")
        _check_plain_rope(d, "params.json", {"rope_scaling": "unknown", "yarn": "yarn"})  # newer Mistral: "yarn"
        try:
            return cls(
                dim=d["dim"],
                n_layers=d["n_layers"],
                n_heads=d["n_heads"],
                n_kv_heads=d.get("n_kv_heads", d["n_heads"]),
                hidden_dim=d["hidden_dim"],
                vocab_size=d["vocab_size"],
                head_dim=d.get("head_dim"),
                norm_eps=d.get("norm_eps", 1e-5),
                rope_theta=d.get("rope_theta", 10000.0),
                sliding_window=d.get("sliding_window"),
                max_seq_len=d.get("max_seq_len", 32768),
            )
        except KeyError as e:
            raise VentouxError(f"params.json is missing the field {e.args[0]!r}; it is not a Mistral config") from None

    def to_hf(self) -> dict:
        return {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_seq_len,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
        }

    def to_params(self) -> dict:
        d = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "max_seq_len": self.max_seq_len,
        }
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
        return d

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _check_object(d, name: str) -> None:
    if not isinstance(d, dict):
        raise VentouxError(f"{name} must hold a JSON object of config fields, not {type(d).__name__}")


def _check_plain_rope(d: dict, name: str, default_types: dict) -> None:
    """Refuse RoPE scaling (YaRN, linear, ...): the model runs plain RoPE, so a scaled checkpoint would run wrong."""
    for key, default in default_types.items():
        rope = d.get(key)
        kind = rope.get("rope_type", rope.get("type", default)) if isinstance(rope, dict) else rope
        if kind not in (None, "default"):
            raise VentouxError(f"{name} field {key}={rope!r} asks for RoPE scaling, which ventoux does not implement "
                               "(Mistral 7B checkpoints have none); use a checkpoint without it")


def _rope_parameters(d: dict) -> dict:
    rope = d.get("rope_parameters")
    return rope if isinstance(rope, dict) else {}


def _first(x):
    if isinstance(x, list):
        return x[0] if x else None
    return x


# What a config may ask for: far above any Mistral model (7B: 32 layers, dim 4096, vocab 32768, 32K context;
# Nemo: vocab 131072, 128K context), far below what would exhaust a machine before the weights are checked.
LIMITS = {"dim": 2**16, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024, "hidden_dim": 2**18,
          "vocab_size": 2**22, "head_dim": 2**11, "max_seq_len": 2**24, "sliding_window": 2**24}
MAX_PARAMS = 2 * 10**12


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def finite_number(x) -> bool:
    """A real number (not a bool), neither NaN nor infinite: NaN passes no comparison, so ranges alone let it in."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_size(name: str, value, want: str = "a positive integer") -> None:
    if not (_integer(value) and 0 < value <= LIMITS[name]):
        raise VentouxError(f"config field {name}={value!r} must be {want} (at most {LIMITS[name]})")


def read_config(folder: Path) -> ModelConfig:
    """The config of a checkpoint folder: config.json (HF) wins over params.json (Mistral)."""
    folder = Path(folder)
    for name, reader in (("config.json", ModelConfig.from_hf), ("params.json", ModelConfig.from_params)):
        path = folder / name
        if path.exists():
            try:
                d = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise VentouxError(f"{path} is not valid JSON ({e}); re-download or fix the file") from None
            try:
                config = reader(d)
            except VentouxError as e:
                raise VentouxError(f"{path}: {e}") from None
            from .weights import check_config  # weights.py builds on this module

            check_config(folder, config, path)  # before anything is built from it
            return config
    raise VentouxError(f"{folder} has neither config.json nor params.json; point at a model checkpoint folder")


@dataclass(frozen=True)
class Preset:
    repo_id: str
    config: ModelConfig
    instruct: bool


_V01 = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32000,
                   head_dim=128, norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, max_seq_len=32768)
_V02 = _V01.replace(rope_theta=1e6, sliding_window=None, max_seq_len=32768)
_V03 = _V02.replace(vocab_size=32768)

PRESETS: dict[str, Preset] = {
    "mistral-7b-v0.1": Preset("mistralai/Mistral-7B-v0.1", _V01, False),
    "mistral-7b-instruct-v0.1": Preset("mistralai/Mistral-7B-Instruct-v0.1", _V01, True),
    "mistral-7b-instruct-v0.2": Preset("mistralai/Mistral-7B-Instruct-v0.2", _V02, True),
    "mistral-7b-v0.3": Preset("mistralai/Mistral-7B-v0.3", _V03, False),
    "mistral-7b-instruct-v0.3": Preset("mistralai/Mistral-7B-Instruct-v0.3", _V03, True),
}
