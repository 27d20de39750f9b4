"""Adapter files: PEFT's folder (read and written) and mistral-finetune's lora.safetensors (read).

    save_adapter(model, "out/adapter", base_model_name_or_path="mistralai/Mistral-7B-v0.3")
    load_adapter(model, "out/adapter", name="math")     # PEFT: adapter_config.json + adapter_model.safetensors
    load_adapter(model, "run/checkpoints/checkpoint_000100/consolidated/lora.safetensors")  # mistral-finetune

PEFT (docs/source/developer_guides/checkpoint.md): tensors named
base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight (HF module names, the adapter name stripped),
scaling lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). ventoux's q/k rows are HF's, so B is written
and read as it is. mistral-finetune: layers.N.attention.wq.lora_A.weight in the consolidated layout (its q/k
rows pair up for rotary, so B of wq/wk is permuted on the way in) and a fixed scaling, 2.0 by default.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import names
from .errors import VentouxError
from .lora import TARGETS, adapter_names, install, lora_layers
from .weights import _check_finite, _write_atomically

PEFT_CONFIG, PEFT_WEIGHTS, MISTRAL_LORA = "adapter_config.json", "adapter_model.safetensors", "lora.safetensors"
MISTRAL_SCALING = 2.0  # mistral-finetune's LoraArgs.scaling default; its file does not record it
_PEFT_RE = re.compile(r"^base_model\.model\.(model\.layers\.\d+\.\w+\.\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_MISTRAL_RE = re.compile(r"^(layers\.\d+\.\w+\.\w+)\.lora_([AB])\.weight$")


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise VentouxError(f"{path} is not a readable safetensors file ({e}); re-download or re-save it") from None


def _pairs(model: nn.Module, tensors: dict[str, torch.Tensor], pattern: re.Pattern, to_ventoux, path: Path) -> dict:
    """{ventoux module name: (A, B)} from an adapter file's tensors, each checked against the model's layer: before
    anything divides by the rank, permutes B's rows or changes the model."""
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = pattern.match(key)
        module = m and to_ventoux(m.group(1))
        if module is None:
            raise VentouxError(f"{path} holds tensor {key!r}, which is not a LoRA A/B matrix of a block linear "
                               f"({', '.join(TARGETS)}); ventoux cannot apply it")
        _check_finite(t, key, path)
        found.setdefault(module, {})[m.group(2)] = key, t.float()
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise VentouxError(f"{path} has lora_{next(iter(ab))} but no lora_{'AB'[next(iter(ab)) == 'A']} for "
                               f"{module}; the file is incomplete")
        _check_shapes(model, module, ab, path)
    if not found:
        raise VentouxError(f"{path} holds no LoRA tensors")
    return {module: (ab["A"][1], ab["B"][1]) for module, ab in found.items()}


def _check_shapes(model: nn.Module, module: str, ab: dict[str, tuple[str, torch.Tensor]], path: Path) -> None:
    """A must be (rank >= 1, in) and B (out, rank) for the model's layer `module`."""
    try:
        layer = model.get_submodule(module)
    except AttributeError:
        raise VentouxError(f"{path} holds {ab['A'][0]!r}, an adapter for {module}, which this model does not have (the "
                           "adapter was made for a deeper model)") from None
    (key_a, a), (key_b, b) = ab["A"], ab["B"]
    why = "the adapter was made for another model, or the file is damaged"
    if a.dim() != 2 or a.shape[0] < 1 or a.shape[1] != layer.in_features:
        raise VentouxError(f"{path}: tensor {key_a!r} has shape {list(a.shape)}, but {module} needs "
                           f"[r, {layer.in_features}] with r >= 1 (its rank x its input size); {why}")
    if b.shape != (layer.out_features, a.shape[0]):
        raise VentouxError(f"{path}: tensor {key_b!r} has shape {list(b.shape)}, but {module} needs "
                           f"[{layer.out_features}, {a.shape[0]}] (its output size x the rank of lora_A); {why}")


def _from_hf(module: str) -> str | None:
    """model.layers.0.self_attn.q_proj -> layers.0.attention.wq."""
    name = names.from_hf(module + ".weight")
    return name and name.removesuffix(".weight")


def _peft_config(folder: Path) -> dict:
    path = folder / PEFT_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise VentouxError(f"{path} is not valid JSON; re-save the adapter") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise VentouxError(f"{path}: peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else None!r} is not "
                           "LORA; ventoux reads LoRA adapters only")
    unsupported = {"use_dora": False, "bias": "none", "modules_to_save": None, "alpha_pattern": {},
                   "fan_in_fan_out": False}
    for field, plain in unsupported.items():
        if cfg.get(field) and cfg[field] != plain:
            raise VentouxError(f"{path}: {field} = {cfg[field]!r} is not supported by ventoux (only plain LoRA: "
                               f"{field} = {plain!r})")
    rules = {  # field: (is its value usable, what it must be); JSON true is a Python int, never a wanted number
        "r": (lambda v: type(v) is int and v > 0, "a positive integer"),
        "lora_alpha": (lambda v: _is_number(v) and 0 < v < math.inf, "a positive finite number"),
        "lora_dropout": (lambda v: v is None or _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "target_modules": (lambda v: v is None or isinstance(v, str) or isinstance(v, list)
                           and all(isinstance(m, str) for m in v), "a list of module names (or one pattern)"),
    }
    for field, (usable, rule) in rules.items():
        if not usable(cfg.get(field)):
            raise VentouxError(f"{path}: {field} must be {rule}, not {cfg.get(field)!r}; fix that field or "
                               "re-save the adapter")
    return cfg


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_adapter(model: nn.Module, path: str | Path, name: str = "default", activate: bool = True,
                 scaling: float | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Add the adapter at `path` (a PEFT folder, a folder with mistral-finetune's lora.safetensors, or that
    file) to `model` as `name`. scaling overrides the file's (mistral-finetune's default: 2.0)."""
    path = Path(path)
    if (path / PEFT_CONFIG).is_file():
        cfg = _peft_config(path)
        weights = path / PEFT_WEIGHTS
        if not weights.is_file():
            raise VentouxError(f"{path} has {PEFT_CONFIG} but no {PEFT_WEIGHTS} (adapter_model.bin is not read: "
                               "re-save it with safe_serialization=True)")
        pairs = _pairs(model, _read(weights), _PEFT_RE, _from_hf, weights)
        root = (lambda r: math.sqrt(r)) if cfg.get("use_rslora") else (lambda r: r)
        # each module's rank from its shape: a rank_pattern (r differing per module) needs nothing more
        scales = {m: scaling or cfg["lora_alpha"] / root(a.shape[0]) for m, (a, _) in pairs.items()}
        return install(model, name, pairs, scales, float(cfg.get("lora_dropout") or 0.0), activate, dtype)
    file = path / MISTRAL_LORA if path.is_dir() else path
    if not file.is_file():
        raise VentouxError(f"{path} is not an adapter: expected a folder with {PEFT_CONFIG} and {PEFT_WEIGHTS} "
                           f"(PEFT), or mistral-finetune's {MISTRAL_LORA}")
    pairs = _pairs(model, _read(file), _MISTRAL_RE, lambda m: m if m.rsplit(".", 1)[-1] in TARGETS else None, file)
    cfg = model.config
    heads = {"attention.wq": cfg.n_heads, "attention.wk": cfg.n_kv_heads}
    for module, (a, b) in pairs.items():  # consolidated q/k rows pair up for rotary: to ventoux's (HF's)
        n_heads = heads.get(module.split(".", 2)[-1])
        if n_heads:
            pairs[module] = (a, names.interleaved_to_halves(b, n_heads))
    return install(model, name, pairs, scaling or MISTRAL_SCALING, 0.0, activate, dtype)


def save_adapter(model: nn.Module, folder: str | Path, name: str | None = None,
                 base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """Write adapter `name` (default: the only one) as PEFT does: adapter_config.json +
    adapter_model.safetensors, loadable with peft.PeftModel.from_pretrained on the transformers model."""
    adapters = adapter_names(model)
    if name is None and len(adapters) != 1:
        raise VentouxError(f"the model has adapters {adapters or 'none'}: say which one to save")
    name = name or adapters[0]
    tensors, targets, shapes = {}, set(), set()
    for module_name, layer in lora_layers(model).items():
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        hf = "base_model.model." + names.to_hf(module_name + ".weight").removesuffix(".weight")
        tensors[f"{hf}.lora_A.weight"] = adapter.lora_A.detach().cpu().contiguous()
        tensors[f"{hf}.lora_B.weight"] = adapter.lora_B.detach().cpu().contiguous()
        targets.add(hf.rsplit(".", 1)[-1])
        dropout = adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) else 0.0
        shapes.add((adapter.rank, adapter.scaling, dropout))
    if name not in adapters:
        raise VentouxError(f"unknown adapter {name!r}; this model has {adapters or 'none'}")
    if len(shapes) != 1:
        raise VentouxError(f"adapter {name!r} mixes ranks or scalings across layers {sorted(shapes)}; "
                           "one adapter_config.json cannot describe it")
    rank, scaling, dropout = shapes.pop()
    alpha = scaling * rank
    config = {  # the fields PEFT's LoraConfig writes (peft 0.1x), plain LoRA values
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layers_pattern": None, "layers_to_transform": None, "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": dropout, "modules_to_save": None, "peft_type": "LORA", "r": rank, "rank_pattern": {},
        "revision": None, "target_modules": sorted(targets), "task_type": "CAUSAL_LM", "use_dora": False,
        "use_rslora": False,
    }

    def write(tmp: Path):
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})

    return _write_atomically(Path(folder), write, (), overwrite)
