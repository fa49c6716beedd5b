"""File utilities of the core: atomic writes with the permissions of a normal write, shipped recipes,
numbered JSONL rows, and the safetensors files of steering vectors and monitors.

Every file vsteer publishes (vectors, GGUF exports, reports, results, adapter metadata) goes
through :func:`atomic_write`: readers see the old content or the new, never half a file, and
the file gets the mode ``open(path, "w")`` would give under the process umask (``tempfile``
creates its files mode 0600, which would leave published files readable by the owner only).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from vsteer.errors import DataError, RecipeError

__all__ = [
    "atomic_write",
    "umask",
    "share",
    "shipped_recipes",
    "resolve_recipe",
    "jsonl_rows",
    "save_layer_tensors",
    "load_layer_tensors",
]


def umask() -> int:
    """The process umask, e.g. ``0o022``.

    Read from ``/proc/self/status`` where there is one: ``os.umask`` can only be read by
    setting it, and another thread creating a file in between would get the wrong mode.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def share(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a directory, everything under it) the mode a normal write gives.

    Directories get ``0o777 & ~umask``, files ``0o666 & ~umask``: what ``mkdir`` and
    ``open(..., "w")`` create, unlike ``mkdtemp``/``mkstemp`` (owner only).
    """
    mask = umask()
    path = Path(path)
    if path.is_dir():
        path.chmod(0o777 & ~mask)
        for sub in path.rglob("*"):
            if not sub.is_symlink():
                sub.chmod((0o777 if sub.is_dir() else 0o666) & ~mask)
    else:
        path.chmod(0o666 & ~mask)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text written as UTF-8) to ``path`` atomically.

    The temporary file lives in the same directory (so ``os.replace`` is a rename on one file
    system), is flushed and fsync'ed before the rename, and gets mode ``0o666 & ~umask``.
    Missing parent directories are created. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        payload = data.encode("utf-8")
    elif isinstance(data, bytes | bytearray | memoryview):
        payload = bytes(data)
    else:
        raise TypeError(f"atomic_write writes bytes or str, got {type(data).__name__}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def shipped_recipes() -> Path:
    """The directory of the recipes shipped inside the package (``vsteer/recipes``)."""
    from importlib.resources import files

    return Path(str(files("vsteer") / "recipes"))


def resolve_recipe(recipe: str | os.PathLike) -> Path:
    """A recipe file: ``recipe`` itself if it is a file, else the shipped recipe of that name.

    ``claims``, ``claims.yaml`` and ``recipes/claims.yaml`` all name the shipped
    ``vsteer/recipes/claims.yaml`` when no such file exists relative to the working directory,
    so the README's commands work from any directory and from an installed wheel.
    """
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    shipped = shipped_recipes()
    parts = path.parts
    if not path.is_absolute() and parts:
        rel = Path(*parts[1:]) if parts[0] == "recipes" and len(parts) > 1 else path
        for candidate in (shipped / rel, shipped / rel.with_name(rel.name + ".yaml")):
            if candidate.is_file():
                return candidate
    names = sorted(p.stem for p in shipped.glob("*.yaml"))
    raise RecipeError(
        f"recipe {str(recipe)!r} not found (neither a file nor a shipped recipe); "
        f"shipped recipes: {', '.join(names) or 'none'}"
    )


def jsonl_rows(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """``(line number, row)`` of a JSONL file (``.jsonl`` or ``.jsonl.gz``), blank lines skipped; a
    line that is not a JSON object is one ``DataError`` naming ``file:line``."""
    import gzip
    import json

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{i}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: each line must be a JSON object, got {type(row).__name__}")
            rows.append((i, row))
    return rows


def save_layer_tensors(path: str | os.PathLike, tensors: dict, metadata: dict) -> Path:
    """Write ``path``: a safetensors file of float32 tensors ``layer.N`` (``tensors`` maps layer ``N``
    to a tensor of any shape) and ``metadata`` as JSON under the header key ``vsteer``, atomically.

    The format of :meth:`vsteer.SteeringVector.save` and :meth:`vsteer.Monitor.save`; never pickled.
    Returns ``path``.
    """
    import json

    from safetensors.torch import save

    blob = {f"layer.{layer}": t.detach().float().cpu().contiguous() for layer, t in tensors.items()}
    return atomic_write(path, save(blob, metadata={"vsteer": json.dumps(metadata, default=str)}))


def load_tensors(path: str | os.PathLike, kind: str, fmt: str, error: type[Exception]) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a vsteer safetensors file: ``{name: tensor}`` (in file order) and
    the JSON metadata under the header key ``vsteer``, whose ``format`` must be ``fmt``.

    Anything else (no file, not safetensors, no or unreadable ``vsteer`` metadata, another format)
    is one ``error`` line naming the file and calling it what it should have been, a ``kind``
    (``"monitor"``).
    """
    import json

    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise error(f"no {kind} file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("vsteer")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise error(f"cannot read {kind} {str(path)!r}: {first}") from None
    if raw is None:
        raise error(f"{str(path)!r} is a safetensors file without vsteer metadata; not a {kind}")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise error(f"{str(path)!r} has unreadable vsteer metadata (not a JSON object); not a {kind}")
    if meta.get("format") != fmt:
        raise error(f"{str(path)!r} has format {meta.get('format')!r}; expected {fmt!r} (a {kind})")
    return tensors, meta


def load_layer_tensors(
    path: str | os.PathLike, kind: str, fmt: str, error: type[Exception]
) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a file written by :func:`save_layer_tensors`: ``{N: tensor}`` (in
    file order) and the JSON metadata (checked as in :func:`load_tensors`); a tensor not named
    ``layer.N`` or metadata ``layers`` other than the tensors' is one ``error`` line too.
    """
    tensors, meta = load_tensors(path, kind, fmt, error)
    out = {}
    for name, t in tensors.items():
        prefix, _, layer = name.partition(".")
        if prefix != "layer" or not layer.isdigit():
            raise error(f"{str(path)!r} has tensor {name!r}; expected names like 'layer.8'")
        out[int(layer)] = t
    layers = meta.get("layers")
    if layers is not None and not (
        isinstance(layers, list) and all(isinstance(x, int) for x in layers) and sorted(layers) == sorted(out)
    ):
        raise error(f"{str(path)!r}: metadata layers {layers} disagree with tensors {sorted(out)}")
    return out, meta


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (this process counts as alive): the owner
    test for temporary directories left by runs that died."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
