"""CLI subcommands: each module here defines ``register(subparsers)`` (see :mod:`vsteer.cli`)."""
