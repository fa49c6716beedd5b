"""``vsteer monitor fit``, ``vsteer monitor score``, ``vsteer monitor eval``, ``vsteer monitor search``."""

from __future__ import annotations

import json
import sys

from vsteer.commands import add_device_args, add_output_args, check_output_file, load_model_from_args

DEFAULT_MODEL = "smollm2-135m-instruct"
BUILTIN = ("advbench", "jbb", "helpful")


def register(sub) -> None:
    p = sub.add_parser("monitor", help="value-site monitors: fit, score, evaluate (docs/monitoring.md)")
    msub = p.add_subparsers(dest="monitor_command", required=True)

    f = msub.add_parser("fit", help="fit a linear monitor on positive vs negative texts")
    f.add_argument("--model", default=DEFAULT_MODEL)
    f.add_argument(
        "--positive",
        required=True,
        help=f"texts to flag: {', '.join(BUILTIN)}, a .txt (one per line) or .jsonl file",
    )
    f.add_argument("--negative", required=True, help="texts to pass, same forms")
    f.add_argument("--site", default="v", help="v, k, q, z, attn, mlp or resid (default v)")
    f.add_argument("--layers", default=None, help="e.g. 10 or 8,12 (default: the middle layer)")
    f.add_argument("--position", default="last", help="last or mean (default last)")
    f.add_argument(
        "--fpr", type=float, default=0.01, help="false-positive rate of the threshold (default 0.01)"
    )
    f.add_argument("--calibration", type=float, default=0.25, help="share of items held out to calibrate")
    f.add_argument("--limit", type=int, default=None, help="at most this many items per class")
    f.add_argument("--raw", action="store_true", help="no chat template: score the texts as they are")
    f.add_argument("--seed", type=int, default=0)
    add_device_args(f)
    add_output_args(f, "where to write the monitor (.safetensors)")
    f.set_defaults(func=_fit)

    s = msub.add_parser("score", help="score texts with a monitor (one JSON line per text)")
    s.add_argument("monitor", help="a monitor .safetensors file")
    s.add_argument("text", nargs="*", help="texts to score (or --file)")
    s.add_argument("--file", default=None, help="a .txt (one per line) or .jsonl file of texts")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--raw", action="store_true", help="no chat template")
    add_device_args(s)
    s.set_defaults(func=_score)

    for name, func, what, example, output, files in (
        ("eval", _eval, "the monitoring experiment: sites vs bag of words, conditional steering",
         "n_prompt=80", "reports/monitoring", "report.md, results.json, roc.png"),
        ("search", _search, "choose the refusal vector's layer and scale per site on reserved selection "
         "requests (the settings `eval` uses; docs/monitoring.md)",
         "n_select=16 or search_grid={v: {layers: [12], scales: [2, 4]}}", "reports/refusal-search",
         "report.md, results.json"),
    ):  # fmt: skip
        e = msub.add_parser(name, help=what)
        e.add_argument("--model", default=DEFAULT_MODEL)
        e.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"a MonitorOptions field, e.g. {example}",
        )
        e.add_argument("-o", "--output", default=output, help=f"directory for {files}")
        add_device_args(e)
        e.set_defaults(func=func)


def _read_texts(spec: str, limit: int | None = None) -> tuple[list[str], list[dict]]:
    """Texts and their sources from a builtin name or a file."""
    from pathlib import Path

    from vsteer.errors import DataError
    from vsteer.files import jsonl_rows

    if spec in BUILTIN:
        from vsteer.data import monitor_data as md

        texts = {
            "advbench": md.advbench_goals,
            "helpful": md.helpful_requests,
            "jbb": lambda: [r["goal"] for r in md.jbb_goals()],
        }[spec]()
        src = md.sources({"advbench": "advbench", "jbb": "jbb", "helpful": "helpful"}[spec])
    else:
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"{spec!r} is neither a file nor one of {', '.join(BUILTIN)}")
        if path.suffix == ".jsonl":
            texts = []
            for n, row in jsonl_rows(path):
                key = next((k for k in ("text", "prompt", "goal") if k in row), None)
                if key is None:
                    raise DataError(
                        f"{spec}:{n}: expected a 'text', 'prompt' or 'goal' field, got {sorted(row)}"
                    )
                texts.append(row[key])
        else:
            texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        from vsteer.data.readers import file_sha256

        src = [{"path": str(path), "sha256": file_sha256(path)}]
    return texts[:limit], src


def _wrap(texts, raw: bool):
    return texts if raw else [[{"role": "user", "content": t}] for t in texts]


def _fit(args) -> int:
    from vsteer.monitor import fit

    pos, pos_src = _read_texts(args.positive, args.limit)
    neg, neg_src = _read_texts(args.negative, args.limit)
    check_output_file(args, args.positive, args.negative)
    model, tok = load_model_from_args(args)
    layers = args.layers  # "8,12" or "8-16": fit parses it against the model's layers (one line if bad)
    mon = fit(
        model,
        tok,
        _wrap(pos, args.raw),
        _wrap(neg, args.raw),
        site=args.site,
        layers=layers,
        position=args.position,
        fpr=args.fpr,
        calibration=args.calibration,
        seed=args.seed,
        sources=pos_src + neg_src,
    )
    mon.extra["chat"] = not args.raw
    mon.save(args.output)
    print(
        f"{mon!r} -> {args.output} (calibration TPR {mon.extra.get('calibration_tpr')}, FPR {mon.extra.get('calibration_fpr')}, "
        f"95% upper bound {mon.extra.get('calibration_fpr_upper')})"
    )
    return 0


def _score(args) -> int:
    from vsteer.monitor import Monitor

    texts = list(args.text)
    if args.file:
        texts += _read_texts(args.file)[0]
    if not texts:
        print("vsteer monitor score: give texts or --file", file=sys.stderr)
        return 2
    model, tok = load_model_from_args(args)
    mon = Monitor.load(args.monitor, model)
    scores = mon.score(model, tok, _wrap(texts, args.raw))
    for text, s in zip(texts, scores, strict=True):
        print(json.dumps({"text": text, "score": round(float(s), 4), "flagged": bool(s > mon.threshold)}))
    return 0


def _options(args):
    """``MonitorOptions`` from the ``--set KEY=VALUE`` items (values read as YAML)."""
    from dataclasses import fields

    import yaml

    from vsteer.errors import RecipeError
    from vsteer.experiments.monitoring import MonitorOptions

    names = {f.name for f in fields(MonitorOptions)}
    kw = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise RecipeError(
                f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(names))}"
            )
        v = yaml.safe_load(value)
        kw[key] = tuple(v) if isinstance(v, list) and key in ("sites", "traits") else v
    return MonitorOptions(**kw)


def _write(res, output: str, plot: str | None = None) -> None:
    from pathlib import Path

    from vsteer.files import atomic_write

    out = Path(output)
    md = res.to_markdown(max_rows=None)
    atomic_write(out / "report.md", md + "\n")
    res.save_json(out / "results.json")
    if plot:
        res.plot(out / plot)
    print(md)


def _eval(args) -> int:
    from vsteer.experiments.monitoring import monitoring

    opts = _options(args)
    model, tok = load_model_from_args(args)
    _write(monitoring(model, tok, opts), args.output, "roc.png")
    return 0


def _search(args) -> int:
    from vsteer.experiments.monitoring import refusal_search

    opts = _options(args)
    model, tok = load_model_from_args(args)
    _write(refusal_search(model, tok, opts), args.output)
    return 0
