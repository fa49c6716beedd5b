"""vsteer: steer and test language models through the attention value path.

Every public name loads its module on first use, so ``import vsteer`` (and ``vsteer --help``)
imports no torch or transformers. Functions and modules never share a name: ``vsteer.steer``
and ``vsteer.extract`` are functions, their modules are :mod:`vsteer.steering` and
:mod:`vsteer.extraction`.
"""

from __future__ import annotations

import importlib

# The one place the version is written (pyproject.toml reads it; ``vsteer --version`` prints it).
__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "ArchSpec": "vsteer.arch",
    "ModelArch": "vsteer.arch",
    "get_arch": "vsteer.arch",
    "DataError": "vsteer.errors",
    "ModelError": "vsteer.errors",
    "RecipeError": "vsteer.errors",
    "SiteError": "vsteer.errors",
    "VectorError": "vsteer.errors",
    "VsteerError": "vsteer.errors",
    "Activations": "vsteer.hooks",
    "Step": "vsteer.hooks",
    "add": "vsteer.hooks",
    "apply": "vsteer.hooks",
    "capture": "vsteer.hooks",
    "captured_forward": "vsteer.hooks",
    "intervene": "vsteer.hooks",
    "replace": "vsteer.hooks",
    "scale": "vsteer.hooks",
    "SITE_NAMES": "vsteer.sites",
    "Site": "vsteer.sites",
    "SteeringVector": "vsteer.vectors",
    "Monitor": "vsteer.monitor",
    "watch": "vsteer.monitor",
    "monitor": "vsteer.monitor",
    "extract": "vsteer.extraction",
    "steer": "vsteer.steering",
    "per_row": "vsteer.steering",
    "residual_change": "vsteer.steering",
    "load_model": "vsteer.models",
    "config_fingerprint": "vsteer.models",
    "add_adapter": "vsteer.lora",
    "lora_config": "vsteer.lora",
    "plan_adapter": "vsteer.lora",
    "train_from_recipe": "vsteer.train",
    "Intervention": "vsteer.interventions",
    "apply_intervention": "vsteer.interventions",
    "merge_intervention": "vsteer.interventions",
}


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'vsteer' has no attribute {name!r}")
    if module == f"vsteer.{name}":  # a public module (vsteer.monitor.fit), not a function
        return importlib.import_module(module)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = [*_PUBLIC, "__version__"]
