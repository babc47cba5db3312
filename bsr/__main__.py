"""`python -m bsr`: the same as the `bsr` command."""

import sys

from .cli import main

sys.exit(main())
