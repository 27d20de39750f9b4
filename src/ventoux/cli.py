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
import sys
from collections.abc import Callable

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
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="checkpoint folder or Hugging Face repo id (default: the shipped demo model)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the device's best)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    p.add_argument("--quantize", default=None, help="quantize while loading: int8, int4, int4-g64, ... "
                   "(add +output to quantize the output head too: int4+output)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (compiles for tens of seconds first; helps small models "
                        "on a CPU, and any model on CUDA)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--prefill-chunk", type=int, default=None)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                seed=args.seed, stop=args.stop, prefill_chunk=args.prefill_chunk)


def load_from_args(args: argparse.Namespace):
    from . import load

    return load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, compile=args.compile)


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
        print(f"ventoux: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ventoux info X | head`: the reader left, nothing more to say
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # `python -m ventoux.cli`: run the imported module, where commands register
    from ventoux.cli import main as registered_main

    sys.exit(registered_main())
