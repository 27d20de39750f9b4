"""`ventoux quantize SRC DST --scheme int4 --group-size 32 [--output-scheme int6]`: write a self-describing quantized
checkpoint."""

from __future__ import annotations

from ..cli import command
from ..errors import VentouxError


def _args(p):
    p.add_argument("src", help="float checkpoint folder or Hugging Face repo id")
    p.add_argument("dst", help="output folder (must not exist)")
    p.add_argument("--scheme", default="int4", help="int8, int6 or int4 (default int4), or with its group: int4-g64")
    p.add_argument("--group-size", type=int, default=None,
                   help="inputs per scale: 32, 64 or 128 (default: int4 32, int6 64, int8 one scale a row)")
    head = p.add_mutually_exclusive_group()
    head.add_argument("--include-output", action="store_true", default=None,
                      help="quantize the output head in the blocks' scheme (default: the head in int8)")
    head.add_argument("--output-scheme", default=None,
                      help="the output head's scheme: int8 (default), int6 (with int4-g64: llama.cpp Q4_0's bytes), "
                           "any other scheme, or float")
    p.add_argument("--dtype", default=None, help="dtype of the unquantized tensors (default: as stored)")


@command("quantize", "Quantize a checkpoint's linear layers (the scheme is recorded in its config.json).", _args)
def run(args):
    from ..hub import resolve
    from ..quantize import quantize_checkpoint
    from ..weights import check_output_folder, parse_dtype

    scheme = args.scheme
    if args.group_size is not None:
        if scheme not in ("int8", "int6", "int4"):
            raise VentouxError(f"--group-size goes with --scheme int8, int6 or int4, not {scheme!r}: pass "
                               f"{scheme!r} alone, or its base with --group-size")
        scheme = f"{scheme}-g{args.group_size}"
    dtype = parse_dtype(args.dtype) if args.dtype else None
    check_output_folder(args.dst)  # before the (long) load, not only when writing
    head = args.output_scheme if args.output_scheme is not None else args.include_output
    out = quantize_checkpoint(resolve(args.src), args.dst, scheme, head, dtype)
    print(f"wrote {out} ({scheme})")
