"""Reading and writing checkpoints: HF safetensors (single file or shards) and Mistral's consolidated layout.

    cfg = read_config(folder)
    model = load_model(folder, cfg, parse_dtype("bfloat16", "cuda"), "cuda")   # api.load_model also quantizes
    save_hf(model, "out-hf")                 # config.json + model.safetensors (or shards + index)
    save_consolidated(model, "out-mistral")  # params.json + consolidated.safetensors

Loading builds the model on the meta device, checks every tensor's name and shape from the file headers
(nothing is read before the whole checkpoint is known to fit the config), then streams the tensors from
memory-mapped files one module at a time, each cast and moved on its own: peak host memory stays near one
copy of the weights in the requested dtype.

Per-module hook (quantize while loading): `transform(name, module)` is called for every module that owns
tensors, right after they are assigned (already on the target device and dtype). It returns the module to
keep: the same one, or a replacement (e.g. an int4 linear) that is swapped in at once, so the float weights
of only one module are alive at a time. `load_weights` streams into a model you built yourself on the meta
device (e.g. with quantized modules already swapped in): its state_dict names and shapes are what the file
must hold; floating tensors are cast to `dtype`, integer ones keep their own.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import names
from .config import ModelConfig
from .errors import VentouxError
from .model import Transformer

Transform = Callable[[str, nn.Module], "nn.Module | None"]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}
# Tensors some checkpoints carry that the model recomputes (rotary frequencies).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rope.freqs")
# Files that travel with the weights when a checkpoint is converted (glob patterns; hub.py uses them too).
TOKENIZER_FILES = ("tokenizer.model*", "*.model.v*", "*tekken*.json", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
HF_INDEX = "model.safetensors.index.json"
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I8": "int8", "U8": "uint8", "I32": "int32"}
_FLOAT_DTYPES = {"float32", "bfloat16", "float16", "float64", "F64", "F8_E4M3", "F8_E5M2"}
_LAYER_INDEX = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


def parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """A dtype from its name; None picks the device's best: bfloat16 on CUDA (float16 on GPUs without
    bf16), float16 on MPS (bf16 there needs a recent macOS), float32 on CPU (bf16 matmuls are slow there)."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if dtype is None:
        try:
            kind = torch.device(device or "cpu").type
        except RuntimeError:
            raise VentouxError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if kind == "mps" else torch.float32
    key = dtype.lower().removeprefix("torch.") if isinstance(dtype, str) else None
    if key not in _DTYPES:
        raise VentouxError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return _DTYPES[key]


def _hf_to_vx(name: str) -> str | None:
    """HF tensor name -> ventoux name, for any attribute of a known module (weight, or a quantizer's scales)."""
    module, _, attr = name.rpartition(".")
    mapped = names.from_hf(module + ".weight")
    return mapped and mapped.removesuffix("weight") + attr


def _vx_to_hf(name: str) -> str | None:
    module, _, attr = name.rpartition(".")
    mapped = names.to_hf(module + ".weight")
    return mapped and mapped.removesuffix("weight") + attr


# ---- finding and opening a checkpoint --------------------------------------------------------------
def find_checkpoint(folder: str | Path) -> tuple[str, list[Path], Path]:
    """(layout "hf" or "consolidated", weight files, the file a missing tensor is reported against)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VentouxError(f"no such folder: {folder}; pass a checkpoint folder or a Hugging Face repo id")
    index = folder / HF_INDEX
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise VentouxError(f"{index} is not a valid safetensors index (no weight_map); re-download it") from None
        for shard in shards:
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise VentouxError(f"{index} names the weight file {shard!r}, which is not a file name inside "
                                   f"{folder}; an index may only name files beside it (re-download the checkpoint)")
            if not (folder / shard).is_file():
                raise VentouxError(f"{index} refers to {shard}, which is not in {folder}; re-download the checkpoint")
        return "hf", [folder / s for s in shards], index
    for name, layout in (("model.safetensors", "hf"), ("consolidated.safetensors", "consolidated"),
                         ("consolidated.00.pth", "consolidated")):
        if (folder / name).is_file():
            if name.endswith(".pth") and (folder / "consolidated.01.pth").exists():
                raise VentouxError(f"{folder} holds a model-parallel checkpoint (consolidated.0N.pth); "
                                   "merge it into one file first")
            return layout, [folder / name], folder / name
    raise VentouxError(f"{folder} has no weights: expected model.safetensors, {HF_INDEX}, "
                       "consolidated.safetensors or consolidated.00.pth")


@dataclass
class WeightFile:
    """One weight file: each tensor's (shape, dtype name) from its header, and `get(name)` to read one."""

    path: Path
    header: dict[str, tuple[tuple[int, ...], str]]
    get: Callable[[str], torch.Tensor]


def _open_safetensors(path: Path) -> WeightFile:
    """The header is read now (a truncated file fails here); each tensor is read later through its own
    short-lived memory map, so pages already read do not stay mapped (and counted in RSS) until the end."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = {n: (tuple(f.get_slice(n).get_shape()), f.get_slice(n).get_dtype()) for n in f.keys()}
    except SafetensorError as e:
        raise VentouxError(f"{path} is truncated or corrupt ({e}); re-download it") from None

    def get(name: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor(name)

    return WeightFile(path, {n: (shape, _ST_DTYPES.get(d, d)) for n, (shape, d) in header.items()}, get)


def _open_pth(path: Path) -> WeightFile:
    """The older consolidated.00.pth, memory-mapped by torch.load."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VentouxError(f"{path} is truncated or corrupt ({first}); re-download it") from None
    if not isinstance(d, dict) or not all(isinstance(v, torch.Tensor) for v in d.values()):
        raise VentouxError(f"{path} does not hold a dict of tensors; it is not a consolidated checkpoint")
    return WeightFile(path, {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in d.items()},
                      d.__getitem__)


def open_checkpoint(folder: str | Path) -> tuple[str, list[WeightFile], Path]:
    """(layout, its weight files with their headers read, the file a missing tensor is reported against)."""
    layout, files, index = find_checkpoint(folder)
    return layout, [_open_pth(p) if p.suffix == ".pth" else _open_safetensors(p) for p in files], index


def _plan(model: nn.Module, layout: str, files: list[WeightFile], index: Path) -> dict[str, tuple[str, WeightFile]]:
    """ventoux name -> (name in the file, its file), after checking names and shapes against the model."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    found: dict[str, tuple[str, WeightFile]] = {}
    for file in files:
        for fname in file.header:
            if fname.endswith(_IGNORED_SUFFIXES):
                continue
            vx = _hf_to_vx(fname) if layout == "hf" else fname
            if vx not in expected:
                why = _quantization_differs(vx, expected)
                if why:
                    raise VentouxError(f"{file.path} holds tensor {fname!r}, which this model config does not have: "
                                       f"the checkpoint's quantization does not match its config.json's ({why}); "
                                       f"{_REQUANTIZE}")
                raise VentouxError(
                    f"{file.path} holds tensor {fname!r}, which this model config does not have; the config "
                    "contradicts the weights (check n_layers) or this is not a Mistral checkpoint")
            found.setdefault(vx, (fname, file))
    for vx, shape in expected.items():
        if vx not in found:
            fname = _vx_to_hf(vx) if layout == "hf" else vx
            if vx.endswith(_QUANTIZED_SUFFIXES):
                raise VentouxError(f"tensor {fname!r} is missing from {index}: the checkpoint's quantization does "
                                   f"not match its config.json's (which declares it quantized); {_REQUANTIZE}")
            raise VentouxError(f"tensor {fname!r} is missing from {index}; the file is incomplete (re-download it) "
                               "or the config contradicts the weights")
        fname, file = found[vx]
        if file.header[fname][0] != shape:
            raise VentouxError(
                f"tensor {fname!r} in {file.path} has shape {list(file.header[fname][0])} but the config expects "
                f"{list(shape)}; the config contradicts the weights (check dim, heads, head_dim, hidden_dim, vocab)")
        stored = file.header[fname][1]
        if dtypes[vx].is_floating_point != (stored in _FLOAT_DTYPES):
            want = "a floating-point" if dtypes[vx].is_floating_point else f"an {dtypes[vx]}".replace("torch.", "")
            raise VentouxError(f"tensor {fname!r} in {file.path} is stored as {stored} but the model needs {want} "
                               "tensor there; the file is not a (float or ventoux-quantized) Mistral checkpoint")
    return found


_QUANTIZED_SUFFIXES = (".qweight", ".qhigh", ".scales", ".zeros")  # what a quantized linear holds in place of .weight
_REQUANTIZE = ("fix the \"quantization\" entry of config.json, or quantize the float checkpoint again with "
               "`ventoux quantize`")


def _quantization_differs(vx: str | None, expected: dict) -> str | None:
    """Why the model lacks a tensor when the file and config.json disagree on which modules are quantized (a
    quantized tensor where the model wants a float weight, or the reverse); None for any other reason."""
    if vx is None:
        return None
    module, _, attr = vx.rpartition(".")
    if "." + attr in _QUANTIZED_SUFFIXES and (f"{module}.weight" in expected or f"{module}.qweight" in expected):
        return "the weights are quantized there, in a scheme config.json does not declare"
    if attr == "weight" and f"{module}.qweight" in expected:
        return "the weights are float there, but config.json declares them quantized"
    return None


def check_config(folder: str | Path, config: ModelConfig, config_path: Path) -> None:
    """Before anything is built from a config: the layers it asks for are the layers the weights of `folder`
    hold (read from the file headers), so a wrong or absurd n_layers is one line, not a model that is built
    until memory runs out. A folder without weights (a config-only download) is not checked."""
    try:
        find_checkpoint(folder)
    except VentouxError:
        return
    _, files, _ = open_checkpoint(folder)
    layers = {int(m.group(1)) for f in files for name in f.header if (m := _LAYER_INDEX.match(name))}
    if layers != set(range(config.n_layers)):
        held = f"{len(layers)} ({min(layers)}..{max(layers)})" if layers else "none"
        raise VentouxError(f"{config_path} asks for {config.n_layers} layers but the weights in {folder} hold "
                           f"layers {held}; fix the layer count (num_hidden_layers / n_layers) in the config")


# ---- loading ---------------------------------------------------------------------------------------
def load_model(folder: str | Path, config: ModelConfig, dtype: torch.dtype | None, device="cpu",
               transform: Transform | None = None) -> Transformer:
    """A Transformer with the float weights of `folder` (HF or consolidated layout), as stored: no quantization,
    no kernel swap (api.load_model composes those). dtype None keeps the stored one."""
    with torch.device("meta"):
        model = Transformer(config)
    return load_weights(model, folder, dtype, device, transform)


def load_weights(model: nn.Module, folder: str | Path, dtype: torch.dtype | None, device="cpu",
                 transform: Transform | None = None) -> nn.Module:
    """Stream the checkpoint in `folder` into `model` (built on the meta device), module by module."""
    cfg = model.config
    heads = {"attention.wq.weight": cfg.n_heads, "attention.wk.weight": cfg.n_kv_heads}
    layout, files, index = open_checkpoint(folder)
    plan = _plan(model, layout, files, index)
    owners = [(n, m) for n, m in model.named_modules() if any(k in plan for k in _own_keys(n, m))]
    for i, (mod_name, module) in enumerate(owners):
        tensors = {}
        for key in _own_keys(mod_name, module):
            if key not in plan:
                continue  # a non-persistent buffer
            fname, file = plan[key]
            t = file.get(fname)
            for suffix, n_heads in heads.items():  # consolidated q/k rotate interleaved pairs: permute
                if layout == "consolidated" and key.endswith(suffix):
                    t = names.interleaved_to_halves(t, n_heads)
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
            _check_finite(t, fname, file.path)
            tensors[key.rpartition(".")[2]] = t
        module.load_state_dict(tensors, strict=False, assign=True)
        if transform is not None:
            new = transform(mod_name, module)
            if new is not None and new is not module:
                parent, _, child = mod_name.rpartition(".")
                setattr(model.get_submodule(parent), child, new)
                owners[i] = None  # let the replaced module's float weights go now, not when loading ends
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:3]}")
    return model


def into_memory(model: nn.Module) -> nn.Module:
    """The model's floating-point parameters copied off their files' memory maps (ventoux.load(mmap=False), the CLI's
    --no-mmap, as llama.cpp's): on Linux onto 2 MB pages where they are that large (cpu_kernels.empty_on_huge_pages).
    A bf16 model's kernels read its weights in place, and from such a copy its decode ran 4-11% faster (AMD EPYC
    Zen 4 VM, benchmarks/huge_pages.py --quantize none); the price is the copy while loading, and memory the page
    cache no longer shares, nor can drop and read again. Quantized tiles are copies already. One tensor at a time,
    each parameter kept (its data replaced)."""
    from .cpu_kernels import empty_on_huge_pages

    for p in model.parameters():
        if p.device.type == "cpu" and p.is_floating_point():
            p.data = empty_on_huge_pages(tuple(p.shape), p.dtype, p.device).copy_(p.data)
    return model


FINITE_CHUNK = 1 << 20  # values summed at a time: a whole bf16 tensor summed as float32 is copied as float32


def _check_finite(t: torch.Tensor, name: str, path: Path) -> None:
    """NaN or inf in a weight would generate garbage silently: float32 sums find them, a chunk at a time (the
    head's float32 copy alone was 500 MB, the loading's peak); an inf sum can also be an overflow of finite
    values, so the exact test then decides."""
    if not t.is_floating_point():
        return
    if all(torch.isfinite(c.sum(dtype=torch.float32)) for c in t.reshape(-1).split(FINITE_CHUNK)):
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise VentouxError(f"tensor {name!r} in {path} holds {bad} NaN or infinite value(s) (as {t.dtype}); the "
                           "checkpoint is corrupt (re-download it), or its values overflow this dtype (load as "
                           "float32 or bfloat16)")


def _own_keys(mod_name: str, module: nn.Module) -> list[str]:
    prefix = mod_name + "." if mod_name else ""
    return [prefix + k for k, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]


# ---- writing ---------------------------------------------------------------------------------------
def tokenizer_files(folder: str | Path) -> list[Path]:
    """The tokenizer (and generation config) files of a checkpoint folder, to copy along with its weights."""
    return sorted({p for pattern in TOKENIZER_FILES for p in Path(folder).glob(pattern) if p.is_file()})


def save_hf(model: Transformer, folder: str | Path, dtype: torch.dtype | None = None,
            max_shard_bytes: int = 5 * 2**30, extra_files: Iterable[Path] = (), extra_config: dict | None = None,
            overwrite: bool = False) -> Path:
    """config.json + model.safetensors (or model-0000k-of-0000n shards and their index) in the HF layout.

    extra_config entries are merged into config.json (a quantized model records its scheme there)."""
    if "quantization" not in (extra_config or {}):
        _refuse_quantized(model, "quantize.save_quantized, which records the scheme in config.json")
    tensors = []  # (HF name, tensor as the model holds it): each is cast only when its shard is written
    for name, t in model.state_dict().items():
        hf = _vx_to_hf(name)
        if hf is None:
            raise VentouxError(f"cannot save tensor {name!r}: it has no name in the HF layout")
        tensors.append((hf, t))
    nbytes = {hf: t.numel() * _out_dtype(t, dtype).itemsize for hf, t in tensors}
    shards, size = [[]], 0  # group tensors into shards before writing any, so their names are known
    for hf, t in tensors:
        if shards[-1] and size + nbytes[hf] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((hf, t))
        size += nbytes[hf]
    stored = dtype or model.dtype
    config = {**model.config.to_hf(), "torch_dtype": str(stored).removeprefix("torch."), **(extra_config or {})}

    def write(tmp: Path):
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if len(shards) == 1:
            _save(shards[0], tmp / "model.safetensors", dtype)
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _save(shard, tmp / fname, dtype)
            weight_map.update({hf: fname for hf, _ in shard})
        index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
        (tmp / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    return _write_atomically(Path(folder), write, extra_files, overwrite)


def save_consolidated(model: Transformer, folder: str | Path, dtype: torch.dtype | None = None,
                      extra_files: Iterable[Path] = (), overwrite: bool = False) -> Path:
    """params.json + consolidated.safetensors in Mistral's layout (q/k rows back to interleaved pairs)."""
    _refuse_quantized(model, "the HF layout (quantize.save_quantized): Mistral's layout has no quantized form")
    cfg = model.config
    heads = {"attention.wq.weight": cfg.n_heads, "attention.wk.weight": cfg.n_kv_heads}
    tensors = []
    for name, t in model.state_dict().items():
        for suffix, n_heads in heads.items():
            if name.endswith(suffix):
                t = names.halves_to_interleaved(t, n_heads)
        tensors.append((name, t))

    def write(tmp: Path):
        (tmp / "params.json").write_text(json.dumps(cfg.to_params(), indent=2) + "\n")
        _save(tensors, tmp / "consolidated.safetensors", dtype)

    return _write_atomically(Path(folder), write, extra_files, overwrite)


def _refuse_quantized(model: nn.Module, instead: str) -> None:
    """Quantized tensors written without their scheme make a checkpoint nothing can load."""
    quantized = next((n for n, _ in model.state_dict().items() if n.endswith(".qweight")), None)
    if quantized is not None:
        raise VentouxError(f"the model has quantized layers ({quantized.removesuffix('.qweight')}, ...): save it "
                           f"with {instead}, or dequantize it first")


def _out_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is written in: `dtype` for floating tensors, its own for integer ones."""
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def _save(items, path: Path, dtype: torch.dtype | None) -> None:
    save_file({name: t.detach().to("cpu", _out_dtype(t, dtype)).contiguous() for name, t in items}, str(path),
              metadata={"format": "pt"})


# The files ventoux writes into a checkpoint or adapter folder (save_hf, save_consolidated, lora_files'
# save_adapter, training checkpoints: adapter_state.safetensors and trainer.pt); --overwrite replaces only a
# folder holding nothing else, so a mistyped OUT never deletes the user's own files.
_WRITTEN_FILES = ("config.json", "params.json", "model.safetensors", "model-*-of-*.safetensors", HF_INDEX,
                  "consolidated.safetensors", "adapter_config.json", "adapter_model.safetensors",
                  "adapter_state.safetensors", "trainer.pt", *TOKENIZER_FILES)


def check_output_folder(folder: str | Path, overwrite: bool = False) -> None:
    """An output folder can be written: it does not exist (or, with overwrite, it is a checkpoint or adapter
    folder ventoux writes: nothing else is ever replaced), its parent is (or can be made) a writable folder.
    Temporary folders that killed writers left beside it (.NAME.tmp-PID, PID gone) are removed."""
    folder = Path(folder)
    if folder.name in ("", ".."):  # Path(".").name and Path("/").name are ""
        raise VentouxError(f"the output folder {str(folder)!r} has no name of its own; give a new folder's path "
                           "such as ./out")
    if folder.exists() or folder.is_symlink():
        if not overwrite:
            raise VentouxError(f"{folder} already exists; choose a new output folder or remove it")
        _check_replaceable(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder of the path should be, no permission, read-only disk
        raise VentouxError(f"cannot create the output folder {folder}: {e.strerror or e} "
                           f"({e.filename or folder.parent}); choose another output path") from None
    if not os.access(folder.parent, os.W_OK):
        raise VentouxError(f"cannot write into {folder.parent} (no permission); choose another output path")
    for stale in folder.parent.glob(f".{glob.escape(folder.name)}.tmp-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    # A trial folder where the real one will be written: os.access says yes to root even on /sys.
    probe = _tmp_name(folder)
    try:
        shutil.rmtree(probe, ignore_errors=True)  # left by an earlier crash of this same pid
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise VentouxError(f"cannot write the output folder {folder}: {e.strerror or e} in {folder.parent}; "
                           "choose another output path") from None


def _check_replaceable(folder: Path) -> None:
    """overwrite: only an empty folder or one holding just the files ventoux writes is replaced."""
    if folder.is_symlink() or not folder.is_dir():
        kind = "a symbolic link" if folder.is_symlink() else "not a folder"
        raise VentouxError(f"{folder} is {kind}; --overwrite replaces only a checkpoint or adapter folder ventoux "
                           "wrote: remove it yourself or choose another output path")
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink() or not entry.is_file() or not any(entry.match(p) for p in _WRITTEN_FILES):
            raise VentouxError(f"{folder} holds {entry.name}, which is not part of a checkpoint or adapter ventoux "
                               "writes; --overwrite will not delete it: remove it yourself or choose another output "
                               "path")


def _tmp_name(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.tmp-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process (or a pid we cannot ask about): leave its folder alone
    return True


def _write_atomically(folder: Path, write: Callable[[Path], None], extra_files: Iterable[Path],
                      overwrite: bool) -> Path:
    """Write into a temporary folder beside `folder`, then rename: a crash leaves no half-written checkpoint."""
    check_output_folder(folder, overwrite)  # also clears a temporary folder an earlier crash of this pid left
    tmp = _tmp_name(folder)
    try:
        tmp.mkdir()
        write(tmp)
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
        if folder.exists():  # overwrite: move the old one aside first so the swap is two renames
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, permissions: name the folder the user gave, not the temporary one
            raise VentouxError(f"cannot write the output folder {folder}: {e.strerror or e}; free some space or "
                               "choose another output path") from None
        raise
    return folder
