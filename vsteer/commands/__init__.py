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
