"""vsteer: steer and test language models through the attention value path.

Core names are imported eagerly; the heavier parts (training, steering vectors, experiments)
load on first use so that ``import vsteer`` stays fast.
"""

from vsteer.arch import ArchSpec, ModelArch, get_arch
from vsteer.errors import DataError, ModelError, RecipeError, SiteError, VectorError, VsteerError
from vsteer.extract import extract
from vsteer.hooks import Activations, Step, add, apply, capture, captured_forward, intervene, replace, scale
from vsteer.sites import SITE_NAMES, Site
from vsteer.steer import steer
from vsteer.vectors import SteeringVector

# ``vsteer.extract`` and ``vsteer.steer`` name both a module and its main function: importing
# the modules here, then binding the functions, keeps ``vsteer.steer(...)`` a function however
# the submodules are imported later (Python sets the package attribute only on first import).

__version__ = "0.1.0"

_LAZY = {
    "load_model": "vsteer.models",
    "config_fingerprint": "vsteer.models",
    "add_adapter": "vsteer.lora",
    "lora_config": "vsteer.lora",
    "plan_adapter": "vsteer.lora",
    "train_from_recipe": "vsteer.train",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vsteer' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "ArchSpec",
    "ModelArch",
    "get_arch",
    "DataError",
    "ModelError",
    "RecipeError",
    "SiteError",
    "VectorError",
    "VsteerError",
    "Activations",
    "Step",
    "add",
    "apply",
    "capture",
    "captured_forward",
    "intervene",
    "replace",
    "scale",
    "SITE_NAMES",
    "Site",
    "SteeringVector",
    "extract",
    "steer",
    *_LAZY,
]
