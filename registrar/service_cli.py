"""`python -m registrar.service_cli …`: the `registrar` command line without its console script.

For what starts the service by module name, with the interpreter it chooses (the TLS tests
run `python -m registrar.service_cli serve`). Every subcommand is that of `registrar`
(registrar/cli.py).
"""

from __future__ import annotations

import sys

from registrar.cli import main

if __name__ == "__main__":
    sys.exit(main())
