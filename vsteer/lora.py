"""LoRA adapters named by role: ``v``-only and the comparison arms, with equal budgets.

Targets are roles (``"v"``, ``"q"``, ``"k"``, ``"o"``, any combination of those letters such as
``"qk"``, ``"vo"``, ``"qkvo"``, and ``"mlp"``), resolved through the architecture spec
(:mod:`vsteer.arch`) into a plain PEFT :class:`~peft.LoraConfig` with full module paths.

Fused projections (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``, Phi-3 ``qkv_proj``): the
fused module is targeted and the rows of ``lora_B`` that belong to roles *not* asked for are
kept at exactly zero, so the adapter changes only the requested slice (e.g. V) of the fused
output. The guarantee rests on three things, installed on the modules themselves so that they
hold under any optimizer loop (Trainer, Accelerate, a plain ``for`` loop, DDP, FSDP2):

1. zero init: PEFT initialises ``lora_B`` to zeros (``init_lora_weights=True``); checked here;
2. an output mask: a forward hook on the ``lora_B`` module multiplies its output ``[..., out]``
   by a 0/1 mask over the fused output features. The gradient of a masked row of
   ``lora_B.weight`` is then exactly zero, whatever form the parameter takes when the gradient
   is computed: a plain tensor, a DDP replica, or the all-gathered FSDP2 ``DTensor`` whose
   gradient is reduce-scattered to row shards (a hook on the parameter object would be lost
   when ``fully_shard`` replaces it). SGD (with momentum), Adam and AdamW keep a parameter that
   starts at zero and only ever sees zero gradients at exactly zero: their moments stay zero,
   (decoupled) weight decay multiplies zero by a factor, and gradient clipping sees the norm of
   the kept rows only;
3. a check: :func:`check_masked_rows` raises if any masked row is non-zero (on FSDP2 each process
   checks its local row shard); the trainer runs it after every optimizer step
   (``MaskedRowsCallback``), and :func:`watch_optimizer` attaches it to a plain optimizer with
   ``register_step_post_hook``.

DeepSpeed ZeRO-3 (partitioned, empty local weights) is refused: nothing here can check the rows.
A bare :func:`lora_config` cannot carry the mask, so it refuses fused targets that need one
(``SFTTrainer(peft_config=...)`` would train the Q and K rows); pass the ``PeftModel`` from
:func:`add_adapter` as ``SFTTrainer(model=...)`` or use :func:`vsteer.train_from_recipe`.

For GPT-2 ``Conv1D`` (``fan_in_fan_out``) PEFT still stores ``lora_B`` as ``[out, r]``, so its
rows are the fused output features in both cases.

The saved adapter is a plain PEFT adapter (masked rows are stored as zeros);
``PeftModel.from_pretrained`` loads it without vsteer.

Parameter counts: a LoRA module of rank ``r`` on a ``[out, in]`` projection has
``r * (in + out)`` trainable parameters. On a masked fused module the masked rows are trainable
but stay zero: ``trainable`` counts them, ``effective = r * (in + kept_rows)`` does not.
Equal-budget arms are matched on ``effective``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vsteer.arch import ROLES, get_arch
from vsteer.errors import RecipeError, VsteerError

ATTN_ROLES = ROLES  # ("q", "k", "v", "o")
NAMED_TARGETS = ("v", "q", "k", "o", "qk", "qkv", "vo", "qkvo", "mlp")
BUDGET_TOLERANCE = 0.02
_MASK_ATTR = "_vsteer_lora_masks"


# --------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------
def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Normalise a target spec to a sorted tuple of roles, e.g. ``"vo"`` -> ``("v", "o")``.

    Accepts a string of role letters (``"qkvo"``), ``"mlp"``, ``"all"`` (``qkvo`` + ``mlp``),
    or a list of those (``["v", "mlp"]``).
    """
    items = [targets] if isinstance(targets, str) else list(targets)
    if not items:
        raise RecipeError("adapter targets are empty; expected e.g. 'v', 'qk', 'vo', 'qkvo' or 'mlp'")
    roles: set[str] = set()
    for item in items:
        if not isinstance(item, str) or not item:
            raise RecipeError(f"adapter target {item!r} is not a role string; expected e.g. 'v' or 'mlp'")
        if item == "mlp":
            roles.add("mlp")
        elif item == "all":
            roles.update((*ATTN_ROLES, "mlp"))
        elif set(item) <= set(ATTN_ROLES) and len(set(item)) == len(item):
            roles.update(item)
        else:
            raise RecipeError(
                f"unknown adapter target {item!r}; expected a combination of the letters q, k, v, o "
                f"(e.g. {', '.join(NAMED_TARGETS[:-1])}), 'mlp' or 'all'"
            )
    order = (*ATTN_ROLES, "mlp")
    return tuple(r for r in order if r in roles)


def targets_label(roles: Sequence[str]) -> str:
    """``("q", "k", "v", "o")`` -> ``"qkvo"``; ``("v", "mlp")`` -> ``"v+mlp"``."""
    attn = "".join(r for r in ATTN_ROLES if r in roles)
    return "+".join(p for p in (attn, "mlp" if "mlp" in roles else "") if p)


@dataclass(frozen=True)
class TargetModule:
    """One module a LoRA adapter is put on.

    ``in_features``/``out_features`` in ``nn.Linear`` convention. ``keep_rows``: output rows of
    a fused projection that the adapter may change (``None``: all rows).
    """

    name: str
    layer: int
    roles: tuple[str, ...]
    in_features: int
    out_features: int
    keep_rows: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def masked(self) -> bool:
        return self.keep_rows is not None

    @property
    def effective_out(self) -> int:
        return self.out_features if self.keep_rows is None else len(self.keep_rows)

    def trainable(self, r: int) -> int:
        return r * (self.in_features + self.out_features)

    def effective(self, r: int) -> int:
        return r * (self.in_features + self.effective_out)


def _features(module: nn.Module, conv1d: bool) -> tuple[int, int]:
    base = getattr(module, "base_layer", module)
    w = base.weight
    if conv1d and type(base).__name__ == "Conv1D":
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[1]), int(w.shape[0])


def resolve_targets(
    model: nn.Module, targets: str | Sequence[str], layers: Iterable[int] | None = None
) -> list[TargetModule]:
    """The modules (full dotted paths from the causal LM) that ``targets`` names in ``model``."""
    roles = parse_targets(targets)
    arch = get_arch(model)
    layer_ids = range(arch.n_layers) if layers is None else sorted({arch.check_layer(i) for i in layers})
    if not layer_ids:
        raise RecipeError("adapter layers are empty; expected a list of layer indices or null for all")
    attn_roles = [r for r in roles if r != "mlp"]
    fused_roles = [r for r in attn_roles if arch.is_fused(r)]
    out: list[TargetModule] = []
    for layer in layer_ids:
        # hybrid models: attention roles exist only on the attention layers
        skip_attn = layers is None and not arch.has_attention(layer)
        if fused_roles and not skip_attn:
            module = arch.projection(layer, fused_roles[0])
            fin, fout = _features(module, arch.spec.conv1d)
            keep = None
            if set(fused_roles) != {"q", "k", "v"}:
                keep = torch.sort(torch.cat([arch.rows(r) for r in fused_roles])).values
            out.append(
                TargetModule(
                    arch.module_path(layer, fused_roles[0]), layer, tuple(fused_roles), fin, fout, keep
                )
            )
        for role in attn_roles:
            if role in fused_roles or skip_attn:
                continue
            module = arch.projection(layer, role)
            fin, fout = _features(module, arch.spec.conv1d)
            out.append(TargetModule(arch.module_path(layer, role), layer, (role,), fin, fout))
        if "mlp" in roles:
            mlp_path = f"{arch._layers_path}.{layer}.{arch.spec.mlp}"
            for name in arch.spec.mlp_targets:
                module = arch.mlp(layer).get_submodule(name)
                fin, fout = _features(module, arch.spec.conv1d)
                out.append(TargetModule(f"{mlp_path}.{name}", layer, ("mlp",), fin, fout))
    return out


# --------------------------------------------------------------------------------------------
# plans and budgets
# --------------------------------------------------------------------------------------------
@dataclass
class AdapterPlan:
    """Targets, per-module ranks and exact parameter counts of one adapter, before it exists."""

    targets: tuple[str, ...]
    modules: list[TargetModule]
    ranks: dict[str, int]
    lora_alpha_per_rank: float = 2.0
    dropout: float = 0.0

    @property
    def label(self) -> str:
        return targets_label(self.targets)

    @property
    def trainable(self) -> int:
        """All LoRA parameters that ``requires_grad`` (masked fused rows included)."""
        return sum(m.trainable(self.ranks[m.name]) for m in self.modules)

    @property
    def effective(self) -> int:
        """LoRA parameters that can move away from zero (masked fused rows excluded)."""
        return sum(m.effective(self.ranks[m.name]) for m in self.modules)

    @property
    def base_rank(self) -> int:
        counts: dict[int, int] = {}
        for r in self.ranks.values():
            counts[r] = counts.get(r, 0) + 1
        return max(counts, key=lambda r: (counts[r], r))

    def lora_config(self, model: nn.Module | None = None):
        """A plain PEFT ``LoraConfig`` (``alpha / r`` is the same for every module)."""
        from peft import LoraConfig

        r = self.base_rank
        rank_pattern = {re.escape(n): k for n, k in self.ranks.items() if k != r}
        alpha_pattern = {p: self.lora_alpha_per_rank * k for p, k in rank_pattern.items()}
        conv1d = bool(model is not None and get_arch(model).spec.conv1d)
        return LoraConfig(
            r=r,
            lora_alpha=self.lora_alpha_per_rank * r,
            lora_dropout=self.dropout,
            target_modules=[m.name for m in self.modules],
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            fan_in_fan_out=conv1d,
            bias="none",
            task_type="CAUSAL_LM",
            init_lora_weights=True,
        )

    def to_dict(self) -> dict:
        return {
            "targets": self.label,
            "roles": list(self.targets),
            "modules": len(self.modules),
            "ranks": dict(self.ranks),
            "lora_alpha_per_rank": self.lora_alpha_per_rank,
            "trainable_params": self.trainable,
            "effective_params": self.effective,
            "masked_modules": {
                m.name: {
                    "keep_roles": list(m.roles),
                    "keep_rows": len(m.keep_rows),
                    "out_features": m.out_features,
                }
                for m in self.modules
                if m.masked
            },
        }

    def summary(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
        return (
            f"{self.label}: {len(self.modules)} modules, rank {rank_text}, "
            f"effective {self.effective:,} params, trainable {self.trainable:,}"
        )


def budget_ranks(modules: Sequence[TargetModule], budget: int) -> dict[str, int]:
    """Integer ranks (>= 1) per module whose effective parameter count is closest to ``budget``.

    Every module starts at the largest uniform rank that stays under the budget; the remainder
    is spent one rank at a time on the lowest-ranked module that still fits, spreading the
    extra ranks evenly over the layers; one last step may overshoot when that lands closer.
    """
    if not modules:
        raise RecipeError("cannot match a budget with no target modules")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise RecipeError(f"adapter budget must be a positive int of parameters, got {budget!r}")
    unit = [m.effective(1) for m in modules]
    r0 = max(1, budget // sum(unit))
    ranks = [r0] * len(modules)
    left = budget - r0 * sum(unit)
    n = len(modules)
    order = _spread_order(n)
    while left > 0:
        fits = [i for i in order if unit[i] <= left]
        if not fits:
            # overshoot by the smallest module if that is closer than stopping here
            i = min(order, key=lambda j: unit[j])
            if unit[i] - left < left:
                ranks[i] += 1
                left -= unit[i]
            break
        i = min(fits, key=lambda j: ranks[j])
        ranks[i] += 1
        left -= unit[i]
    total = sum(r * u for r, u in zip(ranks, unit))
    if abs(total - budget) > BUDGET_TOLERANCE * budget:
        raise VsteerError(
            f"cannot match a budget of {budget:,} parameters within {BUDGET_TOLERANCE:.0%} on these "
            f"{n} modules (closest: {total:,}; one rank of a module costs {min(unit):,}-{max(unit):,})"
        )
    return {m.name: r for m, r in zip(modules, ranks)}


def _spread_order(n: int) -> list[int]:
    """0..n-1 in an order that spreads any prefix evenly (bit-reversal-like, by golden ratio)."""
    phi = (math.sqrt(5) - 1) / 2
    return sorted(range(n), key=lambda i: (i * phi) % 1.0)


def plan_adapter(
    model: nn.Module,
    targets: str | Sequence[str] = "v",
    r: int = 8,
    *,
    layers: Iterable[int] | None = None,
    budget: int | None = None,
    match: str | Sequence[str] | None = None,
    lora_alpha_per_rank: float = 2.0,
    dropout: float = 0.0,
) -> AdapterPlan:
    """Resolve targets and choose ranks.

    ``r``: uniform rank (ignored when ``budget`` or ``match`` is given). ``budget``: effective
    parameter count to match within 2%. ``match``: another target spec whose adapter at rank
    ``r`` on the same layers sets the budget (``match="v"`` gives the ``v`` arm's budget).
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise RecipeError(f"adapter rank r must be a positive int, got {r!r}")
    if budget is not None and match is not None:
        raise RecipeError("give either adapter budget or adapter match, not both")
    layers = None if layers is None else list(layers)
    modules = resolve_targets(model, targets, layers)
    if match is not None:
        budget = sum(m.effective(r) for m in resolve_targets(model, match, layers))
    ranks = budget_ranks(modules, budget) if budget is not None else {m.name: r for m in modules}
    return AdapterPlan(parse_targets(targets), modules, ranks, float(lora_alpha_per_rank), float(dropout))


# --------------------------------------------------------------------------------------------
# adapters on models
# --------------------------------------------------------------------------------------------
def lora_config(model: nn.Module, targets: str | Sequence[str] = "v", r: int = 8, **kwargs):
    """The PEFT ``LoraConfig`` for ``targets`` on ``model`` (see :func:`plan_adapter`).

    Refused (:class:`VsteerError`) when a target is a slice of a fused projection (``"v"`` on
    GPT-2's ``c_attn``): a config alone cannot keep the other rows of ``lora_B`` at zero, so
    ``SFTTrainer(peft_config=...)`` / ``get_peft_model`` would train Q and K too. Use
    :func:`add_adapter` (and pass its ``PeftModel`` as ``SFTTrainer(model=...)``) or
    :func:`vsteer.train_from_recipe` there.
    """
    plan = plan_adapter(model, targets, r, **kwargs)
    masked = [m for m in plan.modules if m.masked]
    if masked:
        raise VsteerError(
            f"lora_config: target {plan.label!r} is a slice of the fused projection {masked[0].name} "
            f"({len(masked)} modules); a LoraConfig alone would also train the other rows "
            f"(SFTTrainer(peft_config=...) included). Use vsteer.add_adapter(model, {plan.label!r}) and pass "
            f"the PeftModel as SFTTrainer(model=...), or vsteer.train_from_recipe"
        )
    return plan.lora_config(model)


def add_adapter(
    model: nn.Module,
    targets: str | Sequence[str] = "v",
    r: int = 8,
    *,
    rank: int | None = None,
    layers: Iterable[int] | None = None,
    budget: int | None = None,
    match: str | Sequence[str] | None = None,
    lora_alpha_per_rank: float = 2.0,
    dropout: float = 0.0,
    adapter_name: str = "default",
):
    """Wrap ``model`` in a PEFT model with a LoRA adapter on ``targets``; returns the ``PeftModel``.

    On fused projections the rows of other roles are masked (see the module docstring). The plan
    (targets, ranks, counts) is at ``peft_model.vsteer_plan``.
    """
    from peft import get_peft_model

    if rank is not None:  # the name used in the docs; ``r`` is PEFT's
        r = rank

    if hasattr(model, "peft_config"):
        raise VsteerError("model already has a PEFT adapter; pass the plain base model to add_adapter")
    plan = plan_adapter(
        model,
        targets,
        r,
        layers=layers,
        budget=budget,
        match=match,
        lora_alpha_per_rank=lora_alpha_per_rank,
        dropout=dropout,
    )
    peft_model = get_peft_model(model, plan.lora_config(model), adapter_name=adapter_name)
    install_masks(peft_model, plan, adapter_name)
    peft_model.__dict__["vsteer_plan"] = plan
    return peft_model


def _lora_b(peft_model: nn.Module, name: str, adapter_name: str) -> torch.Tensor:
    module = peft_model.get_base_model().get_submodule(name)
    return module.lora_B[adapter_name].weight


def install_masks(peft_model: nn.Module, plan: AdapterPlan, adapter_name: str = "default") -> None:
    """Zero-check the non-target rows of ``lora_B`` on masked fused modules and mask their output
    (see the module docstring); the masks are kept on the model for :func:`check_masked_rows`."""
    masks: dict[str, torch.Tensor] = {}
    for m in plan.modules:
        if not m.masked:
            continue
        weight = _lora_b(peft_model, m.name, adapter_name)  # [out_features, r]
        _refuse_partitioned(weight, m.name)
        if weight.shape[0] != m.out_features:
            raise VsteerError(
                f"{m.name}: lora_B has {weight.shape[0]} rows, expected {m.out_features} output features"
            )
        keep = torch.zeros(m.out_features, 1, dtype=weight.dtype, device=weight.device)
        keep[m.keep_rows.to(weight.device)] = 1
        with torch.no_grad():
            local, offset = _local_rows(weight)
            if bool((local * (1 - keep[offset : offset + local.shape[0]])).ne(0).any()):
                raise VsteerError(
                    f"{m.name}: lora_B does not start at zero; masked LoRA needs init_lora_weights=True"
                )
        lora_b = peft_model.get_base_model().get_submodule(m.name).lora_B[adapter_name]
        lora_b.register_forward_hook(_OutputMask(keep[:, 0]))
        masks[m.name] = keep
    peft_model.__dict__[_MASK_ATTR] = (adapter_name, masks)


class _OutputMask:
    """Forward hook of a ``lora_B`` module: its output ``[..., out]`` times a 0/1 ``[out]`` mask, so
    masked rows of ``lora_B.weight`` get exactly zero gradient however the parameter is stored."""

    def __init__(self, keep: torch.Tensor):
        self.keep = keep  # [out]

    def __call__(self, module, args, output: torch.Tensor) -> torch.Tensor:
        if self.keep.device != output.device:  # the model moved (e.g. .to("cuda")): follow it once
            self.keep = self.keep.to(output.device)
        return output * self.keep.to(output.dtype)


def _refuse_partitioned(weight: torch.Tensor, name: str) -> None:
    if hasattr(weight, "ds_id") or hasattr(weight, "ds_numel"):
        raise VsteerError(
            f"{name}: lora_B is a DeepSpeed ZeRO-3 partitioned parameter; vsteer cannot keep or check the "
            f"V-slice rows under ZeRO-3: use ZeRO-2, DDP or FSDP2 (accelerate_configs/)"
        )


def _local_rows(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(rows held by this process [n_local, r], index of its first global row)``.

    A plain tensor is all rows from 0; an FSDP2 ``DTensor`` (``Shard(0)`` over the data-parallel
    mesh) is its local shard, so checking needs no communication."""
    from_local = getattr(weight, "to_local", None)
    if from_local is None:
        return weight, 0
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in weight.placements):
        raise VsteerError(
            f"lora_B is a DTensor with placements {weight.placements}; vsteer checks row shards "
            f"(Shard(0), as FSDP2 makes) or replicas only"
        )
    _, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    return from_local(), int(offset[0])


def masked_modules(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module path: [out, 1] 0/1 keep mask}`` of the masked fused modules (empty if none)."""
    entry = _find_masks(peft_model)
    return {} if entry is None else dict(entry[1])


def _find_masks(model: nn.Module):
    for candidate in (model, getattr(model, "module", None)):  # DDP wraps as .module
        if candidate is not None and _MASK_ATTR in candidate.__dict__:
            return candidate.__dict__[_MASK_ATTR]
    return None


def check_masked_rows(peft_model: nn.Module) -> int:
    """Raise if a masked row of a fused ``lora_B`` is not exactly zero; returns the modules checked.

    Under FSDP2 each process checks the rows it holds (no collective: safe to call on one rank)."""
    entry = _find_masks(peft_model)
    if entry is None:
        return 0
    adapter_name, masks = entry
    model = getattr(peft_model, "module", peft_model) if _MASK_ATTR not in peft_model.__dict__ else peft_model
    with torch.no_grad():
        for name, keep in masks.items():
            weight = _lora_b(model, name, adapter_name)
            _refuse_partitioned(weight, name)
            local, offset = _local_rows(weight)
            rows = keep[offset : offset + local.shape[0]].to(local.device, local.dtype)
            leaked = (local * (1 - rows)).abs().max() if local.numel() else local.new_zeros(())
            if leaked != 0:
                raise VsteerError(
                    f"{name}: masked rows of lora_B moved away from zero (max |value| {float(leaked):.3g}); "
                    f"something outside the gradient path changed the adapter weights"
                )
    return len(masks)


def watch_optimizer(peft_model: nn.Module, optimizer: torch.optim.Optimizer):
    """Check the masked rows after every ``optimizer.step()``; returns the removable handle."""
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: check_masked_rows(peft_model))


def count_parameters(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """Exact counts measured on the model: ``trainable`` (``requires_grad`` LoRA parameters of
    ``adapter_name``) and ``effective`` (minus the masked fused rows of ``lora_B``)."""
    trainable = sum(
        p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and f".{adapter_name}." in n
    )
    masked = 0
    for _name, keep in masked_modules(peft_model).items():
        masked += int((keep == 0).sum()) * _rank_of(peft_model, _name, adapter_name)
    return {"trainable": trainable, "effective": trainable - masked}


def _rank_of(peft_model: nn.Module, name: str, adapter_name: str) -> int:
    return int(_lora_b(peft_model, name, adapter_name).shape[1])
