"""``vsteer train RECIPE.yaml`` and ``vsteer adapter budget``."""

from __future__ import annotations

from vsteer.commands import add_device_args


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a role-named LoRA adapter from a YAML recipe (TRL SFT/DPO; works under accelerate launch)",
    )
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set training.max_steps=10 --set adapter.targets=o",
    )
    p.add_argument(
        "--output-dir", default=None, help="where adapters/<name>/ goes (default: the recipe's output_dir)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing adapter directory (and start over from an interrupted run's checkpoints)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint of an interrupted run"
    )
    p.add_argument("--check", action="store_true", help="validate the recipe and its data files, then stop")
    add_device_args(p, device=None, dtype=None)  # default: the recipe's keys device/dtype
    p.set_defaults(func=_train)

    a = sub.add_parser("adapter", help="inspect LoRA adapter plans")
    asub = a.add_subparsers(dest="adapter_command", metavar="ACTION")
    b = asub.add_parser("budget", help="ranks and exact parameter counts of LoRA arms on a model")
    b.add_argument("targets", nargs="+", help="arms, e.g. v qk o qkvo mlp")
    b.add_argument(
        "--model", default="smollm2-135m-instruct", help="embedded name, HF id, directory or .gguf"
    )
    b.add_argument("-r", "--rank", type=int, default=8, help="rank of the uniform arms / of the matched arm")
    b.add_argument("--match", default=None, help="match every arm's effective count to this arm at rank r")
    b.add_argument("--budget", type=int, default=None, help="match every arm to this effective count")
    add_device_args(b)
    b.set_defaults(func=_budget)


def _train(args) -> int:
    from vsteer.recipes import load_recipe

    overrides = list(args.overrides)
    overrides += [
        f"{key}={value}" for key, value in (("device", args.device), ("dtype", args.dtype)) if value
    ]
    recipe = load_recipe(args.recipe, overrides)
    if args.check:
        from vsteer.train import load_recipe_data

        data = load_recipe_data(recipe)
        print(
            f"recipe {recipe.name}: ok ({recipe.method}, {len(data.train)} train rows, {len(data.eval)} eval rows)"
        )
        return 0
    from vsteer.train import train_from_recipe

    result = train_from_recipe(
        recipe,
        output_dir=args.output_dir,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=True,  # one bar over the steps; --verbose: the libraries' own logs and bars
        verbose=getattr(args, "verbose", False),  # vsteer --verbose (cli.py)
    )
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        m = result.metrics
        print(f"adapter: {result.adapter_dir}")
        a = result.adapter
        if a.get("kind") == "intervention":
            print(
                f"  {a['intervention']} intervention at {a['site']}, rank {a['rank']}, layers {a['layers']}: "
                f"trainable {a['trainable_params_measured']:,} params"
            )
        else:
            print(
                f"  {a['targets']}: effective {a['effective_params']:,} params, trainable {a['trainable_params']:,}"
            )
        for key in sorted(m):
            print(f"  {key}: {m[key]:.4g}" if isinstance(m[key], float) else f"  {key}: {m[key]}")
    return 0


def _budget(args) -> int:
    from vsteer.commands import load_model_from_args
    from vsteer.lora import plan_adapter

    model, _ = load_model_from_args(args)
    for targets in args.targets:
        plan = plan_adapter(model, targets, args.rank, budget=args.budget, match=args.match)
        print(plan.summary())
    return 0
