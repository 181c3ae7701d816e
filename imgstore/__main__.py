"""`python -m imgstore` is the `imgstore` command."""

from __future__ import annotations

import sys

from imgstore.cli import main

sys.exit(main())
