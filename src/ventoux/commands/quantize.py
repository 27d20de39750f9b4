"""`ventoux quantize SRC DST --scheme int4 --group-size 32`: write a self-describing quantized checkpoint."""

from __future__ import annotations

from ..cli import command
from ..errors import VentouxError


def _args(p):
    p.add_argument("src", help="float checkpoint folder or Hugging Face repo id")
    p.add_argument("dst", help="output folder (must not exist)")
    p.add_argument("--scheme", default="int4", help="int8 or int4 (default int4)")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32 (default), 64 or 128")
    p.add_argument("--include-output", action="store_true", default=None,
                   help="quantize the output head in the blocks' scheme (default: the head in int8)")
    p.add_argument("--dtype", default=None, help="dtype of the unquantized tensors (default: as stored)")


@command("quantize", "Quantize a checkpoint's linear layers (the scheme is recorded in its config.json).", _args)
def run(args):
    from ..hub import resolve
    from ..quantize import quantize_checkpoint
    from ..weights import check_output_folder, parse_dtype

    scheme = args.scheme
    if args.group_size is not None:
        if scheme != "int4":
            raise VentouxError(f"--group-size applies to --scheme int4 only, not {scheme!r}")
        scheme = f"int4-g{args.group_size}"
    dtype = parse_dtype(args.dtype) if args.dtype else None
    check_output_folder(args.dst)  # before the (long) load, not only when writing
    out = quantize_checkpoint(resolve(args.src), args.dst, scheme, args.include_output, dtype)
    print(f"wrote {out} ({scheme})")
