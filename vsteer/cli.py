"""The ``vsteer`` command: a thin layer over the library.

Each area registers its subcommands in a module of :mod:`vsteer.commands` with a function
``register(subparsers)``; heavy imports happen inside the command functions, so
``vsteer --help`` stays fast. Input errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from vsteer.errors import VsteerError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vsteer", description="Steer and test language models through the value path."
    )
    parser.add_argument("--version", action="version", version="vsteer 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import vsteer.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"vsteer.commands.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except VsteerError as err:
        print(f"vsteer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vsteer: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
