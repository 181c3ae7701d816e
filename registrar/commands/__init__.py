"""The `registrar` subcommands' handlers; registrar/cli.py parses and says their errors."""
