"""Subcommands of the `ventoux` CLI; importing a module registers its commands (see cli.py)."""

from . import bench  # noqa: F401
from . import convert  # noqa: F401
from . import generate  # noqa: F401
from . import train  # noqa: F401
