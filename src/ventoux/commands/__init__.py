"""Subcommands of the `ventoux` CLI; importing a module registers its commands (see cli.py)."""

from . import generate  # noqa: F401
