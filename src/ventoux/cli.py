"""The `ventoux` command line: each subcommand is a thin shell over the library.

    ventoux generate "To be, or not to be"          # the shipped demo model
    ventoux generate --model mistralai/Mistral-7B-v0.1 --temperature 0.7 "Once upon"
    ventoux chat --model ./Mistral-7B-Instruct-v0.3
    ventoux convert SRC DST --format hf|consolidated [--dtype bfloat16]
    ventoux info SRC

Every command registers itself in COMMANDS as (add_arguments, run). Imports of heavy modules
happen inside run(), so `ventoux --help` stays instant. A VentouxError is printed as one line
and the exit status is 1; no traceback for a user's mistake.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import get_args, get_origin, get_type_hints

from .errors import VentouxError

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], "int | None"]
COMMANDS: dict[str, tuple[str, AddArguments, Run]] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Decorator: register `run(args)` as subcommand `name`."""

    def register(run):
        COMMANDS[name] = (help, add_arguments, run)
        return run

    return register


# ---- shared argument groups ----------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str, flag: str) -> int:
    """A byte-count flag's value: a number with a decimal (5GB, 500MB, 2G) or binary (2GiB, 512MiB) unit, or none."""
    m = _SIZE.match(text)
    unit = m and m.group(2).upper()
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise VentouxError(f"{flag} {text!r} is not a size; write e.g. 5GB, 500MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])


def add_model_args(p: argparse.ArgumentParser, lora: bool = False) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="checkpoint folder or Hugging Face repo id (default: the shipped demo model)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the device's best)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--quantize", default=None, help="quantize while loading: int8, int6, int4, int4-g64, ... "
                   "(the output head in int8; int4+output: in the blocks' scheme; int4+output=float: unquantized; "
                   "int4-g64+output=int6: llama.cpp Q4_0's bytes)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (compiles for tens of seconds first; helps small models "
                        "on a CPU, and any model on CUDA)")
    p.add_argument("--no-mmap", dest="mmap", action="store_false",
                   help="copy the weights into memory instead of reading them from their files' memory maps (as "
                        "llama.cpp's --no-mmap): a bf16 model decodes faster on a CPU, loads slower, and its memory "
                        "is no longer shared with the page cache")
    if lora:
        p.add_argument("--lora", default=None, metavar="PATH",
                       help="a LoRA adapter to apply: a PEFT folder or mistral-finetune's lora.safetensors")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """One flag per SamplingParams field the CLI shows (params.py is the table, with the CLI's defaults)."""
    from .params import SamplingParams

    hints = get_type_hints(SamplingParams)
    for f, default in SamplingParams.surface_fields("cli"):
        kind = next(t for t in (get_args(hints[f.name]) or (hints[f.name],)) if t is not type(None))
        flags = ["--" + f.name.replace("_", "-")] + (["-t"] if f.name == "temperature" else [])
        if get_origin(kind) is list:  # stop: repeat the flag
            p.add_argument(*flags, action="append", type=get_args(kind)[0], default=default, help=f.metadata["help"])
        elif kind is bool:  # ignore_eos: a switch
            p.add_argument(*flags, action="store_true", help=f.metadata["help"])
        elif get_origin(kind) is dict:  # logit_bias: ID=BIAS, repeated; a dict in sampling_kwargs
            p.add_argument(*flags, action="append", type=_pair, default=default, metavar="ID=BIAS",
                           help=f.metadata["help"])
        else:
            p.add_argument(*flags, type=kind, default=default, help=f"{f.metadata['help']} (default: {default})")


def _pair(text: str) -> tuple[int, float]:
    """"ID=BIAS" -> (ID, BIAS), as --logit-bias takes it."""
    key, _, value = text.partition("=")
    try:
        return int(key), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ID=BIAS (a token id, =, a number), e.g. 1234=-100") \
            from None


def sampling_kwargs(args: argparse.Namespace) -> dict:
    from .params import SamplingParams

    kwargs = {f.name: getattr(args, f.name) for f, _ in SamplingParams.surface_fields("cli")}
    if kwargs["logit_bias"] is not None:
        kwargs["logit_bias"] = dict(kwargs["logit_bias"])
    return kwargs


def sampling_params(args: argparse.Namespace):
    """The sampling flags as SamplingParams: checked before anything is loaded (a typo costs no model load)."""
    from .params import SamplingParams

    return SamplingParams(**sampling_kwargs(args))


def load_from_args(args: argparse.Namespace, lora=None):
    """The model of add_model_args' flags (lora: adapters by name, ventoux.load's, in place of --lora); the flags
    are all checked before the (long) load starts."""
    from . import load
    from .api import pick_device
    from .quantize import parse_quantize
    from .weights import parse_dtype

    parse_dtype(args.dtype, pick_device(args.device))
    if args.quantize is not None:
        parse_quantize(args.quantize)
    return load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, compile=args.compile,
                lora=lora or getattr(args, "lora", None), mmap=args.mmap)


def main(argv: list[str] | None = None) -> int:
    from . import commands  # noqa: F401  (registers the subcommands)

    parser = argparse.ArgumentParser(prog="ventoux", description="Run, chat with, convert and train Mistral models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args) or 0
    except VentouxError as e:
        print(f"ventoux: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ventoux info X | head`: the reader left, nothing more to say
        sys.stderr.close()
        return 0
    except OSError as e:  # the system refused (disk full, permission, a file where a folder should be): say so
        print(f"ventoux: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":  # `python -m ventoux.cli`: run the imported module, where commands register
    from ventoux.cli import main as registered_main

    sys.exit(registered_main())
