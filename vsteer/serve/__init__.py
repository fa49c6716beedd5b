"""``vsteer serve``: an OpenAI-compatible server with per-request value steering and adapters, batched.

:class:`~vsteer.serve.engine.Engine` batches requests (per-row vectors and adapters in one
forward); :func:`~vsteer.serve.app.create_app` puts OpenAI's routes in front of it. Needs the
``serve`` extra (FastAPI, uvicorn): ``pip install "vsteer[serve]"``.
"""

from vsteer.serve.engine import Engine, Request, Steer
from vsteer.serve.schema import ApiError, Limits

__all__ = [
    "Engine",
    "Request",
    "Steer",
    "ApiError",
    "Limits",
    "create_app",
    "load_vectors",
    "load_monitors",
    "find_adapters",
]


def create_app(*args, **kwargs):
    from vsteer.serve.app import create_app as _create

    return _create(*args, **kwargs)


def load_vectors(directory) -> dict:
    """``{name: SteeringVector}`` for every ``NAME.safetensors`` directly in ``directory``."""
    from pathlib import Path

    from vsteer.errors import VectorError
    from vsteer.vectors import SteeringVector

    d = Path(directory)
    if not d.is_dir():
        raise VectorError(f"--vectors {str(d)!r} is not a directory")
    return {p.stem: SteeringVector.load(p) for p in sorted(d.glob("*.safetensors"))}


def load_monitors(directory) -> dict:
    """``{name: Monitor}`` for every ``NAME.safetensors`` directly in ``directory``."""
    from pathlib import Path

    from vsteer.monitor import Monitor, MonitorError

    d = Path(directory)
    if not d.is_dir():
        raise MonitorError(f"--monitors {str(d)!r} is not a directory")
    return {p.stem: Monitor.load(p) for p in sorted(d.glob("*.safetensors"))}


def find_adapters(directory) -> dict:
    """``{name: path}`` for every subdirectory of ``directory`` holding a PEFT ``adapter_config.json``."""
    from pathlib import Path

    from vsteer.errors import VsteerError

    d = Path(directory)
    if not d.is_dir():
        raise VsteerError(f"--adapters {str(d)!r} is not a directory")
    return {p.name: p for p in sorted(d.iterdir()) if (p / "adapter_config.json").is_file()}
