"""Weight-only quantization as a module swap, and the self-describing quantized checkpoint.

    quantize_model(model, "int4")                    # block linears -> Int4Linear (group 32), head -> int8
    quantize_model(model, "int4", include_output=True)   # the head in the blocks' scheme (int4) too
    quantize_model(model, "int4", include_output=False)  # the head stays float
    quantize_model(model, "int8-g32")                # int8 with one scale per 32 inputs: llama.cpp Q8_0's size
    model = load_model(folder, cfg, dtype, device, quantize="int4-g64")   # api.py: quantize while loading
    model = load_model(folder, cfg, dtype, device, quantize="int4+output")  # ... the head in int4 too
    model = load_model(folder, cfg, dtype, device, quantize="int4+output=float")  # ... the head kept float
    save_quantized(model, "out-int4", "int4")        # config.json records {"quantization": {...}}
    model = load_quantized("out-int4")

The output head's format: by default int8 whatever the blocks' scheme (DEFAULT_HEAD), as llama.cpp keeps
the head of its Q4_0 files at higher precision (Q6_K). Measured on the demo model (benchmarks/eval_demo.py,
docs/benchmarks.md): an int4 head costs perplexity the blocks' int4 does not, an int8 head costs nothing
measurable, and the head is then read at half a bfloat16 head's bytes on the fast int8 kernel. A load spec
names another head with a suffix: "+output" (the blocks' scheme, as before), "+output=float" (kept in the
model's dtype: HalfLinear's kernels on a CPU), "+output=int6" (any scheme). "int4-g64+output=int6" is llama.cpp
Q4_0's bytes (a 4.5-bit body, a 6.5-bit head): on x86, where ventoux's kernels run int6, it decodes about 5%
faster than int4-g64's int8 head for +7% KL (docs/benchmarks.md). The default head stays int8: every device has a
fast int8 product (PyTorch's int8pack off x86), int6 only ours, and it is the more exact.

The token embedding table: int8, one scale a row (qlinear.Int8Embedding), in every scheme, as llama.cpp keeps
the tables of its quantized files quantized (Q4_0 in a Q4_0 file): half a 16-bit table's memory (128 MB less
for Mistral 7B), and only the rows a batch reads are dequantized. Measured on the demo model (docs/benchmarks.md)
it costs no perplexity the blocks' scheme does not. Checkpoints written before tables were quantized hold a
float table, which is quantized as it loads; quantize_model(..., embedding=False) keeps a float table.

Schemes: "int8" (one scale per output row, about 8 bits a weight), "int8-g32" / "-g64" / "-g128" (one scale
per group of inputs: 8.5 bits a weight at 32, Q8_0's format), "int6" = "int6-g64" (6.5 bits, Q6_K's size),
"int6-g32", "int6-g128", "int4" = "int4-g32", "int4-g64", "int4-g128".

The layers and their kernels live in qlinear.py. A quantized checkpoint is an HF-layout checkpoint whose
config.json has a "quantization" entry ({"scheme": "int4", "group_size": 32, "include_output": true,
"output_scheme": "int8", "format_version": 1}; int8's group_size is null for one scale a row, as in every int8
file written before int8 had groups) and whose quantized linears hold qweight(/qhigh)/scales(/zeros) in place of weight,
in the device-independent layout: the device packing happens at load. Without "output_scheme" (older files),
include_output true means the head is in the blocks' scheme.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .errors import VentouxError
from .model import swap_modules
from .qlinear import (
    DEFAULT_GROUP_SIZE,
    GROUP_SIZES,
    INT6_GROUP_SIZE,
    Int4Linear,
    Int6Linear,
    Int8Embedding,
    Int8Linear,
    QuantizedLinear,
)


# ---- schemes -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scheme:
    bits: int
    group_size: int | None = None  # inputs per scale; None (int8 only): one scale per output channel

    @property
    def name(self) -> str:
        return f"int{self.bits}" + (f"-g{self.group_size}" if self.group_size else "")


SCHEMES = {"int8": Scheme(8), **{f"int8-g{g}": Scheme(8, g) for g in GROUP_SIZES},
           "int6": Scheme(6, INT6_GROUP_SIZE), **{f"int6-g{g}": Scheme(6, g) for g in GROUP_SIZES},
           "int4": Scheme(4, DEFAULT_GROUP_SIZE), **{f"int4-g{g}": Scheme(4, g) for g in GROUP_SIZES}}


def parse_scheme(scheme: str | Scheme) -> Scheme:
    """"int8" | "int8-g32" | "int8-g64" | "int8-g128" | "int6" | "int6-gG" | "int4" | "int4-gG" -> Scheme."""
    if isinstance(scheme, Scheme):
        return scheme
    key = str(scheme).strip().lower()
    if key not in SCHEMES:
        raise VentouxError(f"unknown quantization scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    return SCHEMES[key]


OUTPUT_SUFFIX = "+output"
DEFAULT_HEAD = Scheme(8)  # the output head's scheme unless told otherwise (see the module docstring)


def head_scheme(scheme: str | Scheme, include_output: bool | str | Scheme | None = None) -> Scheme | None:
    """The output head's scheme (None: kept float) for blocks in `scheme`: include_output None is the default
    head (DEFAULT_HEAD), True the blocks' scheme, False or "float" a float head, else a scheme."""
    if include_output is None:
        return DEFAULT_HEAD
    if include_output is True:
        return parse_scheme(scheme)
    if include_output is False or include_output == "float":
        return None
    return parse_scheme(include_output)


def parse_quantize(spec: str | Scheme) -> tuple[Scheme, Scheme | None]:
    """A load-time quantize option -> (blocks' scheme, head's scheme or None for float): "int4" (head int8),
    "int4-g64+output" (head int4-g64, as before), "int4+output=float", "int4+output=int4-g128"."""
    if isinstance(spec, Scheme):
        return spec, DEFAULT_HEAD
    blocks, plus, head = str(spec).strip().lower().partition(OUTPUT_SUFFIX)
    scheme = parse_scheme(blocks)
    if not plus:
        return scheme, DEFAULT_HEAD
    if head and not head.startswith("="):
        raise VentouxError(f"quantize {spec!r}: write the head's format as +output=SCHEME (int8, int4-g64, float)")
    return scheme, head_scheme(scheme, head[1:] or True)


def spec_of(scheme: Scheme, head: Scheme | None) -> str:
    """The load-time quantize option of (blocks' scheme, head's scheme or None): parse_quantize's inverse."""
    if head == DEFAULT_HEAD:
        return scheme.name
    return f"{scheme.name}{OUTPUT_SUFFIX}={head.name if head else 'float'}"


# ---- the swap ------------------------------------------------------------------------------------
LINEARS = {8: Int8Linear, 6: Int6Linear, 4: Int4Linear}  # a scheme's bits -> its layer
BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def is_target(name: str, include_output: bool = False) -> bool:
    """Whether the module called `name` (layers.N.attention.wq, ..., output) is quantized by the swap."""
    if name == "output":
        return include_output
    return name.startswith("layers.") and name.split(".", 2)[-1] in BLOCK_LINEARS


def quantize_module(module: nn.Module, scheme: str | Scheme, kernel: str | None = None) -> QuantizedLinear:
    """One nn.Linear -> its quantized replacement, on the linear's device."""
    scheme = parse_scheme(scheme)
    if not isinstance(module, nn.Linear) or module.bias is not None:
        what = "one with a bias" if isinstance(module, nn.Linear) else type(module).__name__
        raise VentouxError(f"only bias-free nn.Linear layers can be quantized, not {what}")
    return LINEARS[scheme.bits].from_float(module.weight, scheme.group_size, kernel=kernel)


def quantize_embedding(name: str, module: nn.Module) -> nn.Module:
    """A per-module hook: the token embedding table -> Int8Embedding, every other module as it is."""
    if name == "tok_embeddings" and isinstance(module, nn.Embedding):
        return Int8Embedding.from_float(module.weight)
    return module


def quantizer(scheme: str | Scheme, include_output: bool | str | Scheme | None = None, kernel: str | None = None,
              embedding: bool = True):
    """A per-module hook for weights.load_model(transform=...): quantizes each target linear as it loads, the
    output head as head_scheme(scheme, include_output) says, and the embedding table in int8 (unless told not)."""
    scheme = parse_scheme(scheme)
    head = head_scheme(scheme, include_output)

    def transform(name: str, module: nn.Module) -> nn.Module:
        if embedding and name == "tok_embeddings":
            return quantize_embedding(name, module)
        if not isinstance(module, nn.Linear) or not is_target(name, head is not None):
            return module
        if name == "output" and head != scheme:  # a kernel asked for the blocks may not exist here
            return quantize_module(module, head, kernel if kernel == "fallback" else None)
        return quantize_module(module, scheme, kernel)  # a block linear, or a head in the blocks' scheme

    return transform


def quantize_model(model: nn.Module, scheme: str | Scheme, include_output: bool | str | Scheme | None = None,
                   kernel: str | None = None, embedding: bool = True) -> nn.Module:
    """Swap every block linear, the output head (see head_scheme) and the embedding table (unless told not)
    for their quantized versions, in place."""
    return swap_modules(model, quantizer(scheme, include_output, kernel, embedding))


def _chain(first, then):
    return lambda name, module: then(name, first(name, module))


def _module_scheme(module: nn.Module) -> Scheme | None:
    bits = next((b for b, cls in LINEARS.items() if isinstance(module, cls)), None)
    return None if bits is None else Scheme(bits, module.group_size)


def _model_scheme(model: nn.Module) -> tuple[Scheme, Scheme | None] | None:
    """(blocks' scheme, head's scheme or None) of a quantized model; None if no block linear is quantized."""
    schemes, floats = set(), []
    for name, module in model.named_modules():
        if name != "output" and _module_scheme(module) is not None:
            schemes.add(_module_scheme(module))
        elif isinstance(module, nn.Linear) and is_target(name):
            floats.append(name)
    if not schemes:
        return None
    if len(schemes) > 1 or floats:
        raise VentouxError(f"the model mixes quantization schemes ({sorted(s.name for s in schemes)}"
                           f"{' and float layers ' + floats[0] if floats else ''}); one config cannot describe it")
    return schemes.pop(), _module_scheme(model.get_submodule("output"))


# ---- the quantized checkpoint ---------------------------------------------------------------------
FORMAT_VERSION = 1
EMBEDDING_PREFIX = "model.embed_tokens."  # the table's tensors in a quantized (HF-layout) checkpoint


def config_entry(scheme: str | Scheme, include_output: bool | str | Scheme | None = None) -> dict:
    """The "quantization" entry of a quantized checkpoint's config.json (include_output: see head_scheme)."""
    scheme = parse_scheme(scheme)
    head = head_scheme(scheme, include_output)
    return {"scheme": f"int{scheme.bits}", "group_size": scheme.group_size, "include_output": head is not None,
            "output_scheme": head.name if head else None, "format_version": FORMAT_VERSION}


def read_quantization(folder) -> tuple[Scheme, Scheme | None] | None:
    """(blocks' scheme, head's scheme or None) from folder/config.json's "quantization" entry; None for a float
    checkpoint."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text()).get("quantization")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise VentouxError(f"{path} is not a valid JSON object; re-download or fix the file") from None
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise VentouxError(f"{path}: quantization must be an object like {config_entry('int4', False)}")
    version = entry.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise VentouxError(f"{path}: quantization.format_version {version!r} is not one this ventoux reads "
                           f"({FORMAT_VERSION}); upgrade ventoux or re-quantize the checkpoint")
    kind, group = entry.get("scheme"), entry.get("group_size")
    if kind == "int8":  # group_size null (files from before int8 had groups): one scale a row
        if group is not None and group not in GROUP_SIZES:
            raise VentouxError(f"{path}: quantization.group_size {group!r} is not null (one scale a row) nor one of "
                               f"{GROUP_SIZES}; fix the config or re-quantize")
        scheme = Scheme(8, group)
    elif kind in ("int6", "int4"):
        if group not in GROUP_SIZES:
            raise VentouxError(f"{path}: quantization.group_size {group!r} is not one of {GROUP_SIZES}; "
                               "fix the config or re-quantize")
        scheme = Scheme(int(kind[3]), group)
    else:
        raise VentouxError(f"{path}: quantization.scheme {kind!r} is unknown; valid: 'int8', 'int6', 'int4'")
    include_output = entry.get("include_output", False)
    if not isinstance(include_output, bool):
        raise VentouxError(f"{path}: quantization.include_output must be true or false, not {include_output!r}")
    head = entry.get("output_scheme")
    if not include_output or head is None:  # older files: the head in the blocks' scheme, or float
        return scheme, scheme if include_output else None
    if head not in SCHEMES:
        raise VentouxError(f"{path}: quantization.output_scheme {head!r} is unknown; valid: {', '.join(SCHEMES)}")
    return scheme, SCHEMES[head]


def _check_tensors(folder, scheme: Scheme, head: Scheme | None = None) -> set[str]:
    """The files' quantized tensors must have the dtypes and scale shapes the config's scheme implies (checked
    from the headers, to name the tensor and the config field at fault). Returns the files' tensor names."""
    from .weights import open_checkpoint

    _, files, _ = open_checkpoint(folder)
    header = {name: entry for f in files for name, entry in f.header.items()}
    blocks = scheme
    for name, (shape, dtype) in header.items():
        scheme = head if name.startswith("lm_head.") and head is not None else blocks
        if name.startswith(EMBEDDING_PREFIX):
            scheme = Scheme(8)  # the table: int8, one scale a row, whatever the blocks' scheme
        qdtype = "int8" if scheme.bits == 8 else "uint8"
        if name.endswith(".qweight") and dtype != qdtype:
            raise VentouxError(f"tensor {name!r} is {dtype}, but config.json's quantization.scheme "
                               f"'int{scheme.bits}' stores {qdtype}; fix the config or re-quantize")
        qweight = header.get(name.removesuffix("scales") + "qweight")
        if not name.endswith(".scales") or qweight is None:
            continue
        inputs = qweight[0][1] * (1 if scheme.bits == 8 else 2)  # int4 and int6: two low nibbles a byte
        if scheme.group_size is None and len(shape) != 1:
            raise VentouxError(f"tensor {name!r} holds group-wise scales {list(shape)}, but config.json says "
                               "quantization.scheme 'int8' with group_size null (one scale a row); fix the config "
                               "or re-quantize")
        if scheme.group_size is not None and (len(shape) != 2 or inputs != shape[1] * scheme.group_size):
            raise VentouxError(f"tensor {name!r} has shape {list(shape)} for {inputs} inputs, which does not "
                               f"match config.json's quantization.group_size {scheme.group_size}; fix the config "
                               "or re-quantize")
    return set(header)


def prepare_load(model: nn.Module, folder, quantize: str | Scheme | None = None, transform=None):
    """For api.load_model: (model, transform) that load `folder` quantized. A quantized checkpoint turns
    the meta skeleton's linears into quantized ones (the file's tensors then load into them); a float one
    with `quantize` gets a hook that quantizes each linear as soon as it is loaded."""
    stored = read_quantization(folder)
    if stored is None:
        if quantize is None:
            return model, transform
        scheme, head = parse_quantize(quantize)
        hook = quantizer(scheme, head or False)  # a float head: False (None would be the default head)
        return model, hook if transform is None else _chain(hook, transform)
    scheme, head = stored
    if quantize is not None:  # a restated scheme is fine; another scheme, or another head named with +output, is not
        blocks, asked_head = parse_quantize(quantize)
        if blocks != scheme or (OUTPUT_SUFFIX in str(quantize).lower() and asked_head != head):
            stored_spec = spec_of(scheme, head)
            raise VentouxError(f"{folder} is already quantized as {stored_spec}; drop quantize={quantize!r} "
                               f"or pass {stored_spec!r}")
    stored_table = EMBEDDING_PREFIX + "qweight" in _check_tensors(folder, scheme, head)
    model = quantize_model(model, scheme, head or False, embedding=stored_table)
    if not stored_table:  # written before tables were quantized: quantized as it loads, as from a float file
        transform = quantize_embedding if transform is None else _chain(quantize_embedding, transform)
    return model, transform


def save_quantized(model: nn.Module, folder, scheme: str | Scheme | None = None,
                   include_output: bool | str | Scheme | None = None, extra_files=(), overwrite: bool = False) -> Path:
    """Write a quantized checkpoint (HF layout + config "quantization" entry). A float model is quantized in
    place first with `scheme` (and include_output, see head_scheme); a quantized one must already match
    `scheme` if given."""
    from .weights import save_hf

    found = _model_scheme(model)
    if found is None:
        if scheme is None:
            raise VentouxError("the model is not quantized: pass a scheme (int8, int4, int4-g64, ...) to save it")
        quantize_model(model, scheme, include_output)
        found = _model_scheme(model)
    if scheme is not None and parse_scheme(scheme) != found[0]:
        raise VentouxError(f"the model is quantized as {found[0].name}, not {parse_scheme(scheme).name}; "
                           "load the float weights to quantize them another way")
    return save_hf(model, folder, extra_files=extra_files, overwrite=overwrite,
                   extra_config={"quantization": config_entry(found[0], found[1] or False)})


def load_quantized(folder, dtype=None, device="cpu") -> nn.Module:
    """A model from a quantized checkpoint (what api.load_model does for any checkpoint, checked here)."""
    from .api import load_model  # the loading pipeline, above this module
    from .config import read_config

    if read_quantization(folder) is None:
        raise VentouxError(f"{folder} is not a quantized checkpoint (its config.json has no quantization entry)")
    return load_model(folder, read_config(folder), dtype, device)


def quantize_checkpoint(src, dst, scheme: str | Scheme, include_output: bool | str | Scheme | None = None,
                        dtype=None, overwrite: bool = False) -> Path:
    """src (float checkpoint) -> dst (quantized), one linear at a time; no kernel packing on the way."""
    from .config import read_config
    from .weights import load_model, tokenizer_files

    stored = read_quantization(src)
    if stored is not None:
        raise VentouxError(f"{src} is already quantized ({stored[0].name}); quantize its float checkpoint, or "
                           "dequantize it first with `ventoux convert SRC DST --format hf --dtype bfloat16`")
    hook = quantizer(scheme, include_output, kernel="fallback")
    model = load_model(src, read_config(src), dtype, "cpu", transform=hook)
    return save_quantized(model, dst, extra_files=tokenizer_files(src), overwrite=overwrite)  # quantized already
