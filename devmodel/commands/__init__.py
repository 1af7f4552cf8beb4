"""Subcommands of the ``devmodel`` command line, one module each."""
