"""``vsteer extract``, ``vsteer generate``, ``vsteer chat``, ``vsteer export-gguf``."""

from __future__ import annotations

import sys

from vsteer.commands import add_device_args, load_model_from_args

DEFAULT_MODEL = "smollm2-135m-instruct"


def register(sub) -> None:
    p = sub.add_parser("extract", help="extract a steering vector from contrastive data")
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF id, directory or .gguf")
    p.add_argument(
        "--data",
        required=True,
        help="caa:BEHAVIOUR, persona:TRAIT, template:POS,NEG, sst2[:SPLIT] or your JSONL file of "
        "{positive, negative}, A/B items {question, answer_matching_behavior, answer_not_matching_behavior} "
        "(answer-balanced) or {text, label} (see docs/experiments.md)",
    )
    p.add_argument("--site", default="v", help="v, k, q, z, attn, mlp or resid (default v)")
    p.add_argument("--layers", default="all", help="e.g. 8-16, 12, 1,3,5-7 or all")
    p.add_argument("--method", default="mean_diff", help="mean_diff, pca_diff or logistic")
    p.add_argument("--position", default=None, help="answer, last, completion or mean (default: per dataset)")
    p.add_argument("--limit", type=int, default=None, help="at most this many pairs (A/B: rounded to even)")
    p.add_argument("--batch-size", type=int, default=16)
    add_device_args(p)
    p.add_argument("-o", "--output", required=True, help="where to write the vector (.safetensors)")
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
    e.add_argument("-o", "--output", required=True, help="the .gguf file to write")
    e.add_argument("--model-hint", default=None, help="controlvector.model_hint (default: the model type)")
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

    pairs = pairs_from_spec(args.data, limit=args.limit)
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

    vec = SteeringVector.load(args.vector)
    path = export_gguf(vec, args.output, model_hint=args.model_hint)
    print(f"wrote {path}: {len(vec.layers)} direction(s) for layers {vec.layers}")
    return 0
