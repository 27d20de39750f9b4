"""`python -m ventoux ...` is the `ventoux` command."""

import sys

from .cli import main

sys.exit(main())
