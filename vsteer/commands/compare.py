"""``vsteer compare RECIPE.yaml``: train adapter arms at one budget and compare them."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="train LoRA arms (v, qk, o, qkvo, all) at an equal budget on one task and compare them",
    )
    p.add_argument("recipe", help="comparison recipe YAML (see vsteer/recipes/compare_*.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set steps=60 --set data.n_test=300",
    )
    p.add_argument("--output", default=None, help="output directory (default: reports/compare-<name>)")
    p.add_argument("--check", action="store_true", help="validate the recipe, data and budgets, then stop")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_compare)


def _compare(args) -> int:
    from pathlib import Path

    from vsteer.compare import build_data, load_compare_recipe, plan_budgets, run_compare

    spec = load_compare_recipe(args.recipe, args.overrides)
    out = Path(args.output or f"reports/compare-{spec.name}")
    if args.check:
        from vsteer.models import load_model

        model, tok = load_model(spec.model)
        budget, plans = plan_budgets(model, spec)
        data = build_data(spec, tok)
        print(f"ok: {data.describe()}; budget {budget:,}")
        for plan in plans.values():
            print(f"  {plan.summary()}")
        return 0
    # pieces are written only once complete; the report files are replaced atomically at the end
    result = run_compare(spec, cache=out / "cache", progress=not args.quiet)
    report = result.write(out)
    print(report)
    return 0
