"""``vsteer serve``: an OpenAI-compatible server with per-request value steering and adapters (docs/serving.md)."""

from __future__ import annotations

import os

from vsteer.commands import add_device_args, load_model_from_args

DEFAULT_MODEL = "smollm2-135m-instruct"


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server with per-request steering and adapters")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model (default {DEFAULT_MODEL})")
    p.add_argument("--vectors", default=None, help="directory of NAME.safetensors steering vectors")
    p.add_argument("--monitors", default=None, help="directory of NAME.safetensors monitors")
    p.add_argument("--adapters", default=None, help="directory of PEFT adapter directories (one per name)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("VSTEER_API_KEY"),
        help="require 'Authorization: Bearer KEY' (or VSTEER_API_KEY)",
    )
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting before 429 (default 256)")
    p.add_argument(
        "--max-tokens", type=int, default=512, help="largest max_tokens a request may ask (default 512)"
    )
    add_device_args(p)
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        from vsteer.errors import VsteerError

        raise VsteerError('vsteer serve needs the serve extra: pip install "vsteer[serve]"') from None
    from vsteer.models import resolve_model_name
    from vsteer.serve import Engine, Limits, create_app, find_adapters, load_monitors, load_vectors

    vectors = load_vectors(args.vectors) if args.vectors else {}
    monitors = load_monitors(args.monitors) if args.monitors else {}
    adapters = find_adapters(args.adapters) if args.adapters else {}
    model, tokenizer = load_model_from_args(args)
    engine = Engine(
        model,
        tokenizer,
        resolve_model_name(args.model),
        vectors=vectors,
        adapters=adapters,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        monitors=monitors,
    ).start()
    app = create_app(engine, api_key=args.api_key, limits=Limits(max_tokens=args.max_tokens))
    for line in engine.refusals():
        print(f"vsteer serve: {line}", flush=True)
    print(
        f"vsteer serve: {engine.model_name} on http://{args.host}:{args.port} "
        f"({len(engine.vectors)} vectors, {len(engine.monitors)} monitors, {len(engine.adapters)} adapters)",
        flush=True,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
    return 0
