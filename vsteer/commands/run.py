"""``vsteer run RECIPE``: the main job (every claim experiment, one report)."""

from __future__ import annotations

import sys

from vsteer.commands import add_device_args


def register(sub) -> None:
    p = sub.add_parser("run", help="run the claim experiments of a run recipe and write the report")
    p.add_argument("recipe", help="run recipe: a file or a shipped name, e.g. claims")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. profile=full or options.swaps.n_pairs=20",
    )
    add_device_args(p, device=None, dtype=None)  # default: the recipe's keys device/dtype
    p.add_argument(
        "--rules", default=None, help="verdict rules file (default: the shipped vsteer/recipes/verdicts.yaml)"
    )
    p.add_argument("--only", default=None, help="comma-separated sections to run (default: the recipe's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from vsteer.errors import RecipeError
    from vsteer.run import SECTIONS, load_run_spec, run

    overrides = list(args.overrides)
    overrides += [
        f"{k}={v}" for k, v in (("device", args.device), ("dtype", args.dtype), ("rules", args.rules)) if v
    ]
    spec = load_run_spec(args.recipe, overrides)
    only = None
    if args.only:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        for s in only:
            if s not in SECTIONS:
                raise RecipeError(f"unknown section {s!r} in --only; expected some of {', '.join(SECTIONS)}")
    command = "vsteer run " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["run"] else ""
    path = run(spec, only=only, progress=not args.no_progress, command=command)
    print(path)
    return 0
