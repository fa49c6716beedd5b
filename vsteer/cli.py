"""The ``vsteer`` command: a thin layer over the library.

Each area registers its subcommands in a module of :mod:`vsteer.commands` with a function
``register(subparsers)``; heavy imports happen inside the command functions, so
``vsteer --help`` stays fast. Input errors print one line and exit with status 2.

By default the command is quiet: the libraries underneath (transformers, datasets, TRL, PEFT,
Accelerate, the Hub client) log errors only and show no progress bars of their own, so the
only progress shown is vsteer's (one bar per section or long step). ``--verbose`` brings their
logs back.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
import warnings

from vsteer import __version__
from vsteer.errors import VsteerError

LIBRARIES = ("transformers", "datasets", "trl", "peft", "accelerate", "huggingface_hub", "torch")


def configure_logging(verbose: bool) -> None:
    """Quiet libraries (errors only, no progress bars of theirs) unless ``verbose``.

    Set through environment variables first, because transformers and datasets read them when
    they are imported, which happens later, inside the command. A variable the user set wins.
    """
    if verbose:
        for var in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY"):
            os.environ.setdefault(var, "info")
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    quiet = {
        "TRANSFORMERS_VERBOSITY": "error",
        "DATASETS_VERBOSITY": "error",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also transformers' own bars ("Loading weights")
    }
    for var, value in quiet.items():
        os.environ.setdefault(var, value)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in LIBRARIES:
        warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")
    # already imported (``main`` called from Python): the environment is read no more
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vsteer", description="Steer and test language models through the value path."
    )
    parser.add_argument("--version", action="version", version=f"vsteer {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the libraries' logs and progress bars (default: quiet)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import vsteer.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"vsteer.commands.{info.name}").register(sub)
    for command in sub.choices.values():  # also after the command: vsteer run claims --verbose
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
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
