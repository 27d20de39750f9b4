"""Subcommands of the `ventoux` CLI; importing a module registers its commands (see cli.py)."""

from . import (
    bench,  # noqa: F401
    convert,  # noqa: F401
    eval,  # noqa: F401
    finetune,  # noqa: F401
    generate,  # noqa: F401
    merge,  # noqa: F401
    quantize,  # noqa: F401
    serve,  # noqa: F401
    train,  # noqa: F401
)
