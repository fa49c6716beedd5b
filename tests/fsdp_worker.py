"""Train a v-only LoRA on a tiny GPT-2 (fused ``c_attn``) for a few AdamW steps; save the adapter.

Started by ``tests/test_fsdp.py``: with ``torchrun --nproc_per_node 2`` every decoder block and the
root are sharded with FSDP2 (``fully_shard``: parameters become row-sharded ``DTensor``s, gradients
are reduce-scattered) over gloo on the CPU; as a plain ``python`` process it trains the same model
unsharded. Each step uses the same global batch of 4 sequences (rank ``i`` of ``n`` takes rows
``i::n``), weight decay and gradient clipping, and the masked rows are checked after every step
(``watch_optimizer``). Usage: ``python tests/fsdp_worker.py OUT_DIR [STEPS]``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import VOCAB, make_tiny_model  # noqa: E402

from vsteer.lora import add_adapter, check_masked_rows, watch_optimizer  # noqa: E402


def batch(step: int) -> torch.Tensor:
    """The global batch of ``step``: ``[4, 12]`` token ids (no padding: equal tokens per row)."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(3, VOCAB, (4, 12), generator=g)


def main(out: Path, steps: int) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    base = make_tiny_model("gpt2")
    for module in base.modules():  # GPT-2 drops out 10% by default: random masks differ per process
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model = add_adapter(base, "v", r=4)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.get_base_model().transformer.h:
            fully_shard(block)
        fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    param_type = type(params[0]).__name__
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    watch_optimizer(model, opt)  # raises on the first step a masked row moves
    model.train()
    losses = []
    for step in range(steps):
        ids = batch(step)[rank::world]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(float(loss))
    checked = check_masked_rows(model)
    state = None
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(str(out / "adapter"), state_dict=state)
        info = {"world_size": world, "param_type": param_type, "losses": losses, "checked_modules": checked}
        if world > 1:
            info["backend"] = dist.get_backend()
        (out / "info.json").write_text(json.dumps(info))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 4)
    # Leave without interpreter finalisation: gloo's C++ threads can abort a process that is torn down
    # after its work is done ("terminate called without an active exception", seen once in the fresh-clone CI of ee7980a).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
