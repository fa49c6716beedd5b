"""``vsteer export-gguf-lora ADAPTER_DIR``: a value-only LoRA adapter as a llama.cpp LoRA GGUF."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "export-gguf-lora",
        help="write a value-only PEFT LoRA adapter as a llama.cpp LoRA GGUF (llama-cli --lora FILE)",
    )
    p.add_argument(
        "adapter_dir", help="a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)"
    )
    p.add_argument("--out", default=None, help="the .gguf file to write (default: ADAPTER_DIR/adapter.gguf)")
    p.add_argument(
        "--model",
        default=None,
        help="the base model (default: the one named in vsteer.json / adapter_config.json)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing file (atomically)")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from vsteer.gguf_lora import export_gguf_lora

    model = None
    if args.model:
        from vsteer.models import load_model

        model, _ = load_model(args.model, device="cpu", dtype="float32")
    path = export_gguf_lora(args.adapter_dir, args.out, model=model, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0
