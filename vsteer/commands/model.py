"""``vsteer model info NAME``."""

from __future__ import annotations

from vsteer.commands import add_device_args


def register(sub) -> None:
    p = sub.add_parser("model", help="inspect models")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION")
    info = msub.add_parser("info", help="family, layers, heads, where each site lives, parameter count")
    info.add_argument(
        "name", nargs="?", default="smollm2-135m-instruct", help="embedded name, HF id, directory or .gguf"
    )
    add_device_args(info)
    info.set_defaults(func=_info)


def _info(args) -> int:
    from vsteer.models import format_model_info, model_info

    print(format_model_info(model_info(args.name, device=args.device, dtype=args.dtype)))
    return 0
