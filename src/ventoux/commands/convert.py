"""`ventoux convert` (HF <-> Mistral consolidated layout) and `ventoux info` (what a model is and costs).

    ventoux convert mistralai/Mistral-7B-v0.1 ./m7b --format consolidated --dtype bfloat16
    ventoux convert ./m7b ./m7b-hf --format hf --max-shard-size 2GB
    ventoux info ./Mistral-7B-Instruct-v0.3
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import command, parse_size
from ..errors import VentouxError


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="checkpoint folder or Hugging Face repo id")
    p.add_argument("dst", metavar="DST", help="output folder (must not exist yet)")
    p.add_argument("--format", required=True, choices=["hf", "consolidated"],
                   help="hf: config.json + model*.safetensors; consolidated: params.json + consolidated.safetensors")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="largest HF shard, e.g. 2GB or 500MB (default 5GB)")


@command("convert", "Convert a checkpoint between the HF and Mistral (consolidated) layouts.", _convert_args)
def convert(args: argparse.Namespace) -> None:
    """A quantized source (`ventoux quantize` output) keeps its scheme in the HF layout, or is dequantized to
    --dtype; Mistral's layout has no quantized form, so it needs --dtype there."""
    from ..api import load_model
    from ..config import read_config
    from ..hub import resolve
    from ..quantize import config_entry, read_quantization
    from ..weights import check_output_folder, parse_dtype, save_consolidated, save_hf, tokenizer_files

    dtype = parse_dtype(args.dtype) if args.dtype else None
    shard_bytes = parse_size(args.max_shard_size, "--max-shard-size")
    dst = Path(args.dst)
    check_output_folder(dst)  # before the (long) load, not only when writing
    src = resolve(args.src)
    stored = read_quantization(src)
    if stored is not None and dtype is None and args.format == "consolidated":
        raise VentouxError(f"{src} is quantized ({stored[0].name}) and Mistral's consolidated layout has no "
                           "quantized form: pass --dtype bfloat16 (or float16, float32) to dequantize it, or "
                           "--format hf to keep the quantization")
    model = load_model(src, read_config(src), dtype, "cpu")
    note, quantization = "", None
    if stored is not None and dtype is not None:
        dequantize(model, dtype)
        note = f", dequantized from {stored[0].name}"
    elif stored is not None:
        note, quantization = f", still {stored[0].name}", {"quantization": config_entry(*stored)}
    extra = tokenizer_files(src)
    if args.format == "hf":
        save_hf(model, dst, dtype, max_shard_bytes=shard_bytes, extra_files=extra, extra_config=quantization)
    else:
        save_consolidated(model, dst, dtype, extra_files=extra)
    copied = f", with {', '.join(p.name for p in extra)}" if extra else ""
    print(f"wrote {dst} ({args.format} layout{note}{copied})")


def dequantize(model, dtype) -> None:
    """Every quantized linear back to an nn.Linear holding its dequantized weights in `dtype`, and the embedding
    table to an nn.Embedding, in place."""
    from torch import nn

    from ..model import swap_modules
    from ..qlinear import Int8Embedding, QuantizedLinear, dequantize_int8

    def swap(name, module):
        if isinstance(module, Int8Embedding):
            table = nn.Embedding(module.num_embeddings, module.embedding_dim, device="meta")
            table.weight = nn.Parameter(dequantize_int8(module.qweight, module.scales).to(dtype), requires_grad=False)
            return table
        if not isinstance(module, QuantizedLinear):
            return module
        weight = module.dequantize(*module.canonical())[:, : module.in_features].to(dtype)
        linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        return linear

    swap_modules(model, swap)


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="checkpoint folder or Hugging Face repo id")


@command("info", "Show a model's architecture, parameter count and memory needs.", _info_args)
def info(args: argparse.Namespace) -> None:
    import torch

    from ..config import read_config
    from ..hub import resolve
    from ..weights import open_checkpoint

    folder = resolve(args.src, weights=False)  # a repo id: config and tokenizer only, not gigabytes of weights
    cfg = read_config(folder)
    rows = [("source", str(folder))]
    if any(folder.glob("*.safetensors")) or any(folder.glob("consolidated.*.pth")):
        layout, files, _ = open_checkpoint(folder)
        dtypes = sorted({dtype for f in files for _, dtype in f.header.values()})
        size = sum(f.path.stat().st_size for f in files)
        rows.append(("weights", f"{layout} layout, {len(files)} file(s), {_gb(size)} on disk, "
                                f"stored as {'/'.join(dtypes)}"))
    window = f"sliding window {cfg.sliding_window}" if cfg.sliding_window else "full attention"
    rows += [
        ("architecture", f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.n_kv_heads} kv heads), "
                         f"head_dim {cfg.head_dim}, hidden {cfg.hidden_dim}, vocab {cfg.vocab_size}"),
        ("parameters", f"{cfg.n_params / 1e9:.3f} B" if cfg.n_params >= 1e8 else f"{cfg.n_params / 1e6:.3f} M"),
        ("attention", window),
        ("rope theta", f"{cfg.rope_theta:g}"),
        ("context", f"{cfg.max_seq_len} tokens"),
        ("memory", " | ".join(f"{name} {_gb(b)}" for name, b in _weight_bytes(cfg).items())),
        ("kv cache", _cache_line(cfg)),
        ("threads", f"torch uses {torch.get_num_threads()} threads (set OMP_NUM_THREADS to change)"),
        ("cpu kernels", _kernels_line()),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _kernels_line() -> str:
    from ..fastlinear import kernel_works
    from ..qlinear import Int4Linear, Int8Linear

    half = "ventoux's (AVX-512)" if kernel_works() else "PyTorch's F.linear"
    return (f"bf16/fp16: {half}; int8: {Int8Linear.kernels('cpu')[0]}; "
            f"int4: {Int4Linear.kernels('cpu')[0]}")


def _weight_bytes(cfg) -> dict[str, int]:
    """Bytes of the weights in each dtype, and in `ventoux quantize`'s int8 and int4 (the head and the embedding
    table in int8, as those write them), counted on meta skeletons: exact, and no memory spent."""
    import torch

    from ..model import Transformer
    from ..quantize import quantize_model

    sizes = {"float32": 4 * cfg.n_params, "bfloat16": 2 * cfg.n_params}
    for scheme in ("int8", "int4"):
        with torch.device("meta"):
            model = quantize_model(Transformer(cfg).to(torch.bfloat16), scheme)
        sizes[scheme] = sum(t.nbytes for t in model.state_dict().values())
    return sizes


def _cache_line(cfg) -> str:
    per_1k = 1024 * cfg.kv_bytes_per_token(2)
    line = f"{_mb(per_1k)} per 1K tokens in bf16/fp16 ({_mb(2 * per_1k)} in float32), per sequence"
    if cfg.sliding_window:
        line += f"; capped at the window: {_mb(cfg.sliding_window * cfg.kv_bytes_per_token(2))} in bf16"
    return line


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"
