"""``vsteer patch``, ``vsteer swap``, ``vsteer probe``, ``vsteer basis``, ``vsteer entities``: one claim each.

Each writes ``result.json``, ``result.md`` and ``plot.png`` into ``--out`` (atomically) and
prints the Markdown summary.
"""

from __future__ import annotations

import time

from vsteer.commands import add_device_args, load_model_from_args


def _common(p, default_out: str) -> None:
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="embedded name, HF id, directory or .gguf"
    )
    p.add_argument("--out", default=default_out, help="directory for result.json, result.md, plot.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    add_device_args(p)


def register(sub) -> None:
    p = sub.add_parser("patch", help="claim (c): patch v/k/q/z/resid of a counterfactual entity")
    _common(p, "results/patch")
    p.add_argument("--relations", default="city_country,animal_class", help="comma-separated fact relations")
    p.add_argument(
        "--pairs",
        help="JSONL of your own pairs: source, donor, source_entity, donor_entity, source_answer, donor_answer "
        "(optional relation)",
    )
    p.add_argument("--sites", default="v,k,q,z,resid", help="sites patched at all layers")
    p.add_argument("--sweep-sites", default="v,resid", help="sites also patched one layer at a time")
    p.add_argument(
        "--layers", help="layers of the one-layer sweep ('all', '0-29', '3,7'); default: 6 evenly spaced"
    )
    p.add_argument("--n-pairs", type=int, help="pairs per relation (default: all the fact set gives)")
    p.set_defaults(func=_patch)

    p = sub.add_parser("swap", help="claim (a): swap W_V/W_K/W_Q/W_O (and activations) between layer pairs")
    _common(p, "results/swap")
    p.add_argument("--n-pairs", type=int, default=10, help="sampled layer pairs (0: all pairs)")
    p.add_argument("--pair", action="append", help="a layer pair A,B (repeatable; overrides sampling)")
    p.add_argument("--matrices", default="v,k,q,o")
    p.add_argument("--n-windows", type=int, default=4, help="WikiText-2 windows for perplexity")
    p.add_argument("--window", type=int, default=96, help="tokens per window")
    p.add_argument("--n-prompts", type=int, default=16, help="neutral prompts for KL")
    p.add_argument("--no-activations", action="store_true", help="weight swaps only")
    p.add_argument(
        "--early-layers",
        type=int,
        default=2,
        help="sample pairs within the strata with and without one of the first N layers, weighted by "
        "their shares of all pairs (0: one simple random sample)",
    )
    p.add_argument(
        "--early-pairs",
        type=int,
        help="how many of the sampled pairs come from the early stratum (default: its proportional "
        "share, at least 2)",
    )
    p.set_defaults(func=_swap)

    p = sub.add_parser("probe", help="claim (b): logistic probes on q/k/v/z/resid per layer")
    _common(p, "results/probe")
    p.add_argument(
        "--dataset",
        default="sst2",
        help="'sst2', 'persona:<trait>', 'persona:<JSONL of persona items>' or your JSONL of {text, label} "
        "(split half/half by seed; see docs/experiments.md)",
    )
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--sites", default="q,k,v,z,resid")
    p.add_argument(
        "--layers", help="'all', '0-29', '3,7' (default: 10 evenly spaced; last and middle always included)"
    )
    p.add_argument("--position", default="last", choices=("last", "mean"))
    p.set_defaults(func=_probe)

    p = sub.add_parser("basis", help="claim (d): OV-circuit readouts and sentiment alignment with W_V's span")
    _common(p, "results/basis")
    p.add_argument("--n-items", type=int, default=400, help="SST-2 sentences for the sentiment direction")
    p.add_argument("--vector", help="a steering vector file (.safetensors) to read out")
    p.add_argument("--top-k", type=int, default=8)
    p.set_defaults(func=_basis)

    p = sub.add_parser(
        "entities",
        help="patch an entity's values from another entity; score what the generated text is about",
    )
    _common(p, "results/entities")
    p.add_argument("--categories", default="animals,professions", help="comma-separated entity categories")
    p.add_argument("--n-pairs", type=int, default=12, help="base entities per category (0: all)")
    p.add_argument("--frames", type=int, default=2, help="sentence frames per category (1-3)")
    p.add_argument("--arms", default="base,v,k,v_random,donor", help="comma-separated arms (also: resid)")
    p.add_argument("--layers", default="all", help="patched layers ('all', '0-29', '3,7')")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.set_defaults(func=_entities)


def _split(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _save(result, out: str, started: float, model_name: str) -> int:
    from pathlib import Path

    from vsteer.files import atomic_write

    result.meta["seconds"] = round(time.perf_counter() - started, 1)
    result.meta["model_name"] = model_name
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result.save_json(out / "result.json")
    result.plot(out / "plot.png")
    md = (
        result.to_markdown()
        + f"\n\n_{model_name}, seed {result.meta.get('seed')}, {result.meta['seconds']} s_\n"
    )
    atomic_write(out / "result.md", md)
    print(md)
    print(f"wrote {out / 'result.json'}, {out / 'result.md'}, {out / 'plot.png'}")
    return 0


def _load(args):
    return load_model_from_args(args)


def _progress(args) -> bool | None:
    return False if args.no_progress else None


def _patch(args) -> int:
    from vsteer.experiments.patching import CounterfactualPair, PatchConfig, run_patching
    from vsteer.sites import parse_layers

    pairs = None
    if args.pairs:  # checked row by row before the model loads
        from vsteer.data.user import validate

        pairs = [CounterfactualPair(**row) for row in validate(args.pairs, "patching")]
    model, tok = _load(args)
    started = time.perf_counter()
    from vsteer.arch import get_arch

    n_layers = get_arch(model).n_layers
    config = PatchConfig(
        relations=_split(args.relations),
        sites=_split(args.sites),
        sweep_sites=_split(args.sweep_sites),
        layers=parse_layers(args.layers, n_layers) if args.layers else None,
        n_pairs=args.n_pairs,
    )
    result = run_patching(model, tok, config, pairs=pairs, seed=args.seed, progress_bar=_progress(args))
    return _save(result, args.out, started, args.model)


def _swap(args) -> int:
    from vsteer.errors import SiteError
    from vsteer.experiments.swaps import SwapConfig, run_swaps

    pairs = None
    if args.pair:
        try:
            pairs = [tuple(int(x) for x in p.split(",")) for p in args.pair]
        except ValueError:
            raise SiteError(f"cannot parse layer pair in {args.pair!r}; expected A,B such as 3,17") from None
        if any(len(p) != 2 for p in pairs):
            raise SiteError(f"a layer pair is two layers A,B; got {args.pair!r}")
    model, tok = _load(args)
    started = time.perf_counter()
    config = SwapConfig(
        n_pairs=None if args.n_pairs == 0 else args.n_pairs,
        n_windows=args.n_windows,
        window=args.window,
        n_prompts=args.n_prompts,
        matrices=_split(args.matrices),
        activations=not args.no_activations,
        early_layers=args.early_layers,
        early_pairs=args.early_pairs,
    )
    result = run_swaps(model, tok, config, pairs=pairs, seed=args.seed, progress_bar=_progress(args))
    return _save(result, args.out, started, args.model)


def _probe(args) -> int:
    from vsteer.experiments.probing import ProbeConfig, load_probe_dataset, run_probes

    # read and check the data before the model loads: a bad file fails in a second
    train, test = load_probe_dataset(args.dataset, args.n_train, args.n_test, args.seed)
    model, tok = _load(args)
    started = time.perf_counter()
    config = ProbeConfig(
        dataset=args.dataset,
        n_train=args.n_train,
        n_test=args.n_test,
        sites=_split(args.sites),
        layers=args.layers,
        position=args.position,
    )
    result = run_probes(model, tok, config, train, test, seed=args.seed, progress_bar=_progress(args))
    return _save(result, args.out, started, args.model)


def _basis(args) -> int:
    from vsteer.experiments.basis import BasisConfig, run_basis

    model, tok = _load(args)
    vectors = None
    if args.vector:
        from vsteer.vectors import SteeringVector

        vectors = SteeringVector.load(args.vector, model)
    started = time.perf_counter()
    config = BasisConfig(n_items=args.n_items, top_k=args.top_k)
    result = run_basis(model, tok, config, vectors=vectors, seed=args.seed, progress_bar=_progress(args))
    return _save(result, args.out, started, args.model)


def _entities(args) -> int:
    from vsteer.experiments.entity_gen import EntityGenConfig, SentenceEmbedder, run_entity_gen

    scorer = SentenceEmbedder.from_pretrained()  # a missing scorer wheel fails before the model loads
    model, tok = _load(args)
    started = time.perf_counter()
    config = EntityGenConfig(
        categories=_split(args.categories),
        n_pairs=None if args.n_pairs == 0 else args.n_pairs,
        n_frames=args.frames,
        arms=_split(args.arms),
        layers=args.layers,
        max_new_tokens=args.max_new_tokens,
    )
    result = run_entity_gen(model, tok, config, seed=args.seed, progress_bar=_progress(args), scorer=scorer)
    return _save(result, args.out, started, args.model)
