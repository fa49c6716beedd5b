"""CLI subcommands: each module here defines ``register(subparsers)`` (see :mod:`vsteer.cli`).

Every command that loads a model takes ``--device`` and ``--dtype`` through
:func:`add_device_args` and loads it with :func:`load_model_from_args`.
"""

from __future__ import annotations

DEVICE_HELP = "where the model runs: auto (CUDA when available, else CPU), cpu, cuda, cuda:1"
DTYPE_HELP = "dtype the weights load in: float32, bfloat16, float16, or auto (bfloat16 on CUDA)"


def add_device_args(p, device: str | None = "auto", dtype: str | None = "float32") -> None:
    """``--device`` and ``--dtype`` (``None`` defaults: leave the choice to a recipe)."""
    p.add_argument(
        "--device", default=device, help=f"{DEVICE_HELP} (default: {device or 'the recipe key device'})"
    )
    p.add_argument(
        "--dtype", default=dtype, help=f"{DTYPE_HELP} (default: {dtype or 'the recipe key dtype'})"
    )


def load_model_from_args(args, name: str | None = None):
    """``(model, tokenizer)`` for ``name`` (default ``args.model``) on ``args.device`` in ``args.dtype``."""
    from vsteer.models import load_model

    return load_model(name or args.model, dtype=args.dtype, device=args.device)


def add_output_args(p, help: str, flags: tuple[str, ...] = ("-o", "--output")) -> None:
    """``-o/--output FILE`` and ``--overwrite`` for a command that writes one file."""
    p.add_argument(*flags, dest="output", required=True, help=help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing file (atomically)")


def check_output_file(args, *inputs) -> None:
    """Refuse, before any model loads, an output that would lose a file: an existing file without
    ``--overwrite``, a directory, one of the command's own ``inputs``, or an unwritable place."""
    import os
    from pathlib import Path

    from vsteer.errors import DataError

    out = Path(args.output).expanduser()
    if out.is_dir():
        raise DataError(f"output {str(out)!r} is a directory; name the file to write")
    for given in inputs:
        if given is not None and Path(given).expanduser().resolve() == out.resolve():
            raise DataError(f"output {str(out)!r} is also the input; write to another file")
    if out.exists() and not getattr(args, "overwrite", False):
        raise DataError(f"{str(out)!r} exists; pass --overwrite to replace it")
    parent = next((p for p in (out.parent, *out.parent.parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(
            f"cannot write {str(out)!r}: {str(parent or out.parent)!r} is not a writable directory"
        )
