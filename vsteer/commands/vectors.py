"""``vsteer extract``, ``vsteer generate``, ``vsteer chat``, ``vsteer export-gguf``."""

from __future__ import annotations

import sys

from vsteer.commands import add_device_args, add_output_args, check_output_file, load_model_from_args

DEFAULT_MODEL = "smollm2-135m-instruct"


def register(sub) -> None:
    p = sub.add_parser("extract", help="extract a steering vector from contrastive data")
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF id, directory or .gguf")
    p.add_argument(
        "--data",
        default=None,
        help="caa:BEHAVIOUR, persona:TRAIT, template:POS,NEG, sst2[:SPLIT] or your JSONL file of "
        "{positive, negative}, A/B items {question, answer_matching_behavior, answer_not_matching_behavior} "
        "(answer-balanced) or {text, label} (see docs/experiments.md)",
    )
    p.add_argument(
        "--from-prompt",
        default=None,
        metavar="SYSTEM_PROMPT",
        help="instead of --data: a persona vector, the mean difference between runs of each question with "
        "and without this system prompt (needs --questions; see docs/steering.md)",
    )
    p.add_argument(
        "--questions",
        default=None,
        help="with --from-prompt: hh-rlhf:helpful (shipped), a .txt file (one question a line) or a JSONL "
        "file of rows with a question/prompt/text field",
    )
    p.add_argument("--site", default="v", help="v, k, q, z, attn, mlp or resid (default v)")
    p.add_argument("--layers", default="all", help="e.g. 8-16, 12, 1,3,5-7 or all")
    p.add_argument("--method", default="mean_diff", help="mean_diff, pca_diff or logistic")
    p.add_argument(
        "--position",
        default=None,
        help="answer, last, completion or mean (default: per dataset); with --from-prompt: tail (default), "
        "last or K (the last K tokens)",
    )
    p.add_argument("--limit", type=int, default=None, help="at most this many pairs (A/B: rounded to even)")
    p.add_argument("--batch-size", type=int, default=16)
    add_device_args(p)
    add_output_args(p, "where to write the vector (.safetensors)", ("-o", "--output", "--out"))
    p.set_defaults(func=_extract)

    g = sub.add_parser("generate", help="generate with steering vectors")
    _steering_args(g)
    g.add_argument("prompt", nargs="+", help="one or more prompts (batched)")
    g.add_argument("--max-new-tokens", type=int, default=60)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--raw", action="store_true", help="no chat template: continue the prompt text")
    g.set_defaults(func=_generate)

    c = sub.add_parser(
        "chat", help="interactive chat with steering (/scale X, /vector PATH[:SCALE], /off, /quit)"
    )
    _steering_args(c)
    c.add_argument("--max-new-tokens", type=int, default=120)
    c.set_defaults(func=_chat)

    e = sub.add_parser("export-gguf", help="export a residual-stream vector as a llama.cpp control vector")
    e.add_argument("vector", help="a .safetensors steering vector at site resid")
    add_output_args(e, "the .gguf file to write")
    e.add_argument("--model-hint", default=None, help="controlvector.model_hint (default: the model type)")
    e.add_argument(
        "--model",
        default=None,
        help="the vector's model; needed for a v vector, exported exactly on parallel-residual models",
    )
    add_device_args(e)
    e.set_defaults(func=_export)


def _steering_args(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    add_device_args(p)
    p.add_argument(
        "--vector",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a steering vector (.safetensors or control-vector .gguf), optionally with its own scale; repeatable",
    )
    p.add_argument("--scale", default="1.0", help="multiplies every vector (default 1)")
    p.add_argument("--positions", default="all", help="all, prompt or generated (default all)")


def _parse_vector_arg(text: str) -> tuple[str, float]:
    from vsteer.vectors import check_scale

    path, sep, scale = text.rpartition(":")
    if sep and path and not scale.startswith(("/", "\\")):
        try:
            return path, check_scale(float(scale), "vector scale")
        except ValueError:
            pass
    return text, 1.0


def _parse_scale(text) -> float:
    from vsteer.errors import VectorError
    from vsteer.vectors import check_scale

    try:
        return check_scale(float(text))
    except (TypeError, ValueError):
        raise VectorError(f"scale must be a number, got {text!r}") from None


def _load_vector(path: str, model):
    from vsteer.vectors import SteeringVector

    if path.endswith(".gguf"):
        from vsteer.gguf_io import import_gguf

        return import_gguf(path, model)
    return SteeringVector.load(path, model)


def _load_vectors(args, model) -> list:
    return [(_load_vector(p, model), s) for p, s in map(_parse_vector_arg, args.vector)]


def _extract(args) -> int:
    from vsteer.extraction import extract, pairs_from_spec

    if args.from_prompt is not None or args.questions is not None:
        return _extract_from_prompt(args)
    if args.data is None:
        from vsteer.errors import DataError

        raise DataError(
            "extract needs --data (contrastive pairs) or --from-prompt SYSTEM_PROMPT --questions DATA"
        )
    pairs = pairs_from_spec(args.data, limit=args.limit)
    check_output_file(args, args.data)
    model, tokenizer = load_model_from_args(args)
    vec = extract(
        model,
        tokenizer,
        pairs,
        site=args.site,
        layers=args.layers,
        method=args.method,
        position=args.position,
        batch_size=args.batch_size,
        progress=True,
    )
    vec.save(args.output)
    norms = ", ".join(f"{layer}: {n:.3g}" for layer, n in vec.norms().items())
    print(f"wrote {args.output}: {vec!r} from {len(pairs)} pairs; norms {norms}")
    return 0


def _extract_from_prompt(args) -> int:
    from vsteer.errors import DataError
    from vsteer.extraction import METHODS, from_prompt, prompt_position, questions_from_data
    from vsteer.sites import check_site_name

    # every check before the model loads; the vector is written atomically (an old file survives a failure)
    if args.data is not None:
        raise DataError("give either --data (contrastive pairs) or --from-prompt (a system prompt), not both")
    if args.from_prompt is None:
        raise DataError("--questions goes with --from-prompt SYSTEM_PROMPT")
    if not args.from_prompt.strip():
        raise DataError(
            "--from-prompt needs a non-empty system prompt, e.g. --from-prompt 'You are a pirate.'"
        )
    if args.questions is None:
        raise DataError("--from-prompt needs --questions DATA (hh-rlhf:helpful, a .txt file or a JSONL file)")
    if args.limit is not None and args.limit < 1:
        raise DataError(f"--limit must be at least 1, got {args.limit}")
    check_site_name(args.site)
    position = int(args.position) if args.position and args.position.isdigit() else args.position
    if position not in (None, "tail"):
        prompt_position(None, position, "plain_text")  # 'last' or K: checked without a tokenizer
    if args.method not in METHODS:
        raise DataError(f"unknown extraction method {args.method!r}; expected one of {', '.join(METHODS)}")
    questions = questions_from_data(args.questions, limit=args.limit)
    check_output_file(args, args.questions)
    model, tokenizer = load_model_from_args(args)
    vec = from_prompt(
        model,
        tokenizer,
        args.from_prompt,
        questions,
        site=args.site,
        layers=args.layers,
        position=position,
        method=args.method,
        batch_size=args.batch_size,
        progress=True,
    )
    vec.save(args.output)
    norms = ", ".join(f"{layer}: {n:.3g}" for layer, n in vec.norms().items())
    print(
        f"wrote {args.output}: {vec!r} from {len(questions)} questions with and without "
        f"{args.from_prompt!r} ({vec.extra['prompt_mode']}, last {vec.extra['n_last']} tokens); norms {norms}"
    )
    return 0


def _format_prompt(tokenizer, text: str, raw: bool) -> str:
    if raw:
        return text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


def _generate_text(
    model, tokenizer, prompts: list[str], vectors, scale, positions, max_new_tokens, sample=False
):
    import torch

    from vsteer.encoding import encode_batch
    from vsteer.models import model_device
    from vsteer.steering import steer

    # chat-template text carries its own special tokens; raw prompts are continued as given

    enc = encode_batch(tokenizer, prompts, add_special_tokens=False, device=model_device(model))
    kw = dict(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        if vectors:
            with steer(model, vectors, scale=scale, positions=positions):
                out = model.generate(**enc, **kw)
        else:
            out = model.generate(**enc, **kw)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _generate(args) -> int:
    import torch

    scale = _parse_scale(args.scale)
    model, tokenizer = load_model_from_args(args)
    vectors = _load_vectors(args, model)
    torch.manual_seed(args.seed)
    prompts = [_format_prompt(tokenizer, p, args.raw) for p in args.prompt]
    texts = _generate_text(
        model, tokenizer, prompts, vectors, scale, args.positions, args.max_new_tokens, args.sample
    )
    for prompt, text in zip(args.prompt, texts):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(text.strip())
    return 0


def _chat(args) -> int:
    from vsteer.errors import VsteerError

    scale = _parse_scale(args.scale)
    model, tokenizer = load_model_from_args(args)
    vectors = _load_vectors(args, model)
    history: list[dict] = []
    print("vsteer chat: /scale X, /vector PATH[:SCALE], /off, /reset, /quit", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        if not line:
            continue
        try:
            if line in ("/quit", "/exit"):
                return 0
            if line.startswith("/scale"):
                scale = _parse_scale(line.partition(" ")[2].strip())
                print(f"scale = {scale:g}", file=sys.stderr)
                continue
            if line.startswith("/vector"):
                path, s = _parse_vector_arg(line.partition(" ")[2].strip())
                vectors.append((_load_vector(path, model), s))
                print(f"{len(vectors)} vector(s) active", file=sys.stderr)
                continue
            if line == "/off":
                vectors = []
                print("steering off", file=sys.stderr)
                continue
            if line == "/reset":
                history = []
                continue
        except VsteerError as err:
            print(f"vsteer: error: {err}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        reply = _generate_text(
            model, tokenizer, [prompt], vectors, scale, args.positions, args.max_new_tokens
        )[0]
        reply = reply.strip()
        print(reply)
        history.append({"role": "assistant", "content": reply})


def _export(args) -> int:
    from vsteer.gguf_io import export_gguf
    from vsteer.vectors import SteeringVector

    check_output_file(args, args.vector)
    vec = SteeringVector.load(args.vector)
    model = None
    if args.model is not None:
        model, _ = load_model_from_args(args)
    path = export_gguf(vec, args.output, model_hint=args.model_hint, model=model)
    note = " (the v vector's exact residual change, W_O v)" if vec.site == "v" else ""
    print(f"wrote {path}: {len(vec.layers)} direction(s) for layers {vec.layers}{note}")
    return 0
