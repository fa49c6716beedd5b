"""A cache of finished pieces of a run (adapters, vectors, experiment results), keyed by content.

A piece's key is the SHA-256 of everything it is computed from, as content, never as names:

- its options, with every string that names an existing file replaced by that file's hash
  (:func:`content_key`; so a recipe path is keyed by the recipe's text);
- the weights (:func:`vsteer.models.weights_fingerprint`), dtype and device of the model;
- the versions of the packages that change numbers (:func:`package_versions`);
- the source of the code that computes it: the AST of its module and of every module of the
  same package it imports, transitively (:func:`code_fingerprint`; report, verdict rules and
  CLI are left out, so they never invalidate a measurement);
- the shipped data and recipe files it read: every file opened under ``vsteer/data`` or
  ``vsteer/recipes`` while it was computed is recorded in the piece with its hash, and the
  piece is reused only while all of them still hash the same (:class:`PieceCache`).

Pieces store measurements (findings, records), never verdicts. A piece is written into a
temporary directory next to its final place and renamed when complete, so a run killed
halfway leaves either a finished piece or nothing that is ever picked up.

API, e.g. for a nested piece (an adapter inside the adapters section)::

    from vsteer.pieces import code_fingerprint, content_key, package_versions

    inputs = {
        "recipe": content_key(cfg.sft_recipe),   # {"file": ..., "sha256": ...}, not the path
        "options": content_key(options),         # dicts/lists recursed
        "code": code_fingerprint(["vsteer.experiments.adapters"]),
        "versions": package_versions(),
    }
    piece, where = cache.run("adapter-sft", inputs, compute)
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cache
from pathlib import Path

from vsteer.files import share

DONE = "piece.json"

# packages whose versions change numbers (kernels, tokenisation, training loops, resampling)
NUMERIC_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "numpy",
    "datasets",
    "scikit-learn",
    "vaderSentiment",
)

# modules whose code never changes a measurement: they render, judge or dispatch
CODE_EXCLUDED = (
    "vsteer.report",
    "vsteer.verdicts",
    "vsteer.cli",
    "vsteer.commands",
    "vsteer.pieces",
)


def piece_key(kind: str, inputs: dict) -> str:
    blob = json.dumps({"kind": kind, "inputs": inputs}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


# --- content hashes -----------------------------------------------------------------------------

_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime, inode, ctime) within the
    process: a same-size rewrite that keeps its mtime still changes the ctime."""
    p = Path(path).resolve()
    st = p.stat()
    sig = (str(p), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if sig not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[sig] = h.hexdigest()
    return _DIGESTS[sig]


def content_key(value):
    """``value`` with every string/path naming an existing file replaced by its content hash.

    Dicts, lists, tuples and dataclasses are walked; other values are returned unchanged.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): content_key(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [content_key(v) for v in value]
    if isinstance(value, (str, os.PathLike)) and _is_file(value):
        out = {"file": Path(value).name, "sha256": file_digest(value)}
        if Path(value).suffix in (".yaml", ".yml"):  # a recipe: the files it names count too
            refs = _yaml_refs(Path(value))
            if refs:
                out["refs"] = refs
        return out
    return value


def _yaml_refs(path: Path, depth: int = 0) -> list:
    """Content hashes of the files a YAML file names (relative to its directory or the working
    directory), recipes inside it followed up to 3 deep."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return []
    refs = []

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str) and v and len(v) < 4096 and "\n" not in v:
            for candidate in (path.parent / v, Path(v)):
                if _is_file(candidate):
                    entry = {"file": v, "sha256": file_digest(candidate)}
                    if candidate.suffix in (".yaml", ".yml") and depth < 3:
                        entry["refs"] = _yaml_refs(candidate, depth + 1)
                    refs.append(entry)
                    break

    walk(data)
    return refs


def _is_file(value) -> bool:
    s = os.fspath(value)
    if not s or len(s) > 4096 or "\n" in s:
        return False
    try:
        return Path(s).is_file()
    except (OSError, ValueError):
        return False


@cache
def package_versions() -> dict[str, str | None]:
    """Installed versions of :data:`NUMERIC_PACKAGES` (None when absent) and Python's."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in NUMERIC_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# --- code fingerprints --------------------------------------------------------------------------


def _source_file(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _is_excluded(module: str, excluded: Iterable[str]) -> bool:
    return any(module == e or module.startswith(e + ".") for e in excluded)


def _imports(module: str, path: Path) -> set[str]:
    """Modules of the same top-level package that ``module`` imports anywhere in its source."""
    top = module.split(".")[0]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # ``from pkg import name``: the submodule ``pkg.name`` if there is one, else ``pkg``
            for a in node.names:
                sub = f"{origin}.{a.name}"
                found.add(sub if _source_file(sub) is not None else origin)
    return {m for m in found if m.split(".")[0] == top}


def code_closure(modules: Iterable[str], excluded: Iterable[str] = CODE_EXCLUDED) -> list[str]:
    """The modules in ``modules`` and every module of their package they import, transitively.

    Package ``__init__`` files are followed only when imported by name; :data:`CODE_EXCLUDED`
    modules are not followed.
    """
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        m = todo.pop()
        if m in seen or _is_excluded(m, excluded):
            continue
        path = _source_file(m)
        if path is None:
            continue
        seen[m] = path
        todo.extend(_imports(m, path) - set(seen))
    return sorted(seen)


_AST_LOCK = threading.Lock()


def _without_docstrings(tree: ast.AST) -> ast.AST:
    """``tree`` with the docstrings of its module, classes and functions removed: a docstring edit
    computes nothing differently, so it recomputes no piece."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return tree


def code_fingerprint(modules: Iterable[str], excluded: Iterable[str] = CODE_EXCLUDED) -> str:
    """16 hex digits over the ASTs of :func:`code_closure` (comments and formatting don't count).
    Parsing is serialised: CPython 3.11's ``ast.parse`` fails ("AST constructor recursion depth
    mismatch") when two threads parse at once, as two comparisons driven side by side do."""
    h = hashlib.sha256()
    with _AST_LOCK:
        for m in code_closure(modules, excluded):
            path = _source_file(m)
            tree = _without_docstrings(ast.parse(path.read_text()))
            h.update(m.encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return h.hexdigest()[:16]


# --- files read while a piece is computed --------------------------------------------------------

_TRACKERS: list[dict[str, str]] = []
_LOCK = threading.Lock()
_HOOKED = False


def tracked_roots() -> list[Path]:
    """Directories whose files a piece depends on when it reads them: shipped data and recipes."""
    pkg = Path(__file__).resolve().parent
    return [pkg / "data", pkg / "recipes"]


def _untracked(path: Path) -> bool:
    # the verdict rules and profiles are not inputs of a measurement (profiles enter as options)
    return path.name == "verdicts.yaml" or "profiles" in path.parts


def _audit(event: str, args) -> None:
    if event != "open" or not _TRACKERS:
        return
    target, mode, flags = args[0], args[1], args[2]
    if not isinstance(target, (str, bytes, os.PathLike)):
        return
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return
    if mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR):
        return
    try:
        p = Path(os.fsdecode(target)).resolve()
    except (OSError, ValueError):
        return
    for root in tracked_roots():
        root = root.resolve()
        if root in p.parents and not _untracked(p.relative_to(root)):
            key = f"{root.name}/{p.relative_to(root).as_posix()}"
            with _LOCK:
                for t in _TRACKERS:
                    t.setdefault(key, "")
            return


@contextlib.contextmanager
def track_reads() -> Iterator[dict[str, str]]:
    """Record the tracked files opened for reading inside the block: ``{path: sha256}``.

    The parsed-file caches of :mod:`vsteer.data` are cleared first, so a file parsed earlier in
    the process is read (and recorded) again.
    """
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True
    _clear_data_caches()
    reads: dict[str, str] = {}
    with _LOCK:
        _TRACKERS.append(reads)
    try:
        yield reads
    finally:
        with _LOCK:  # by identity: two trackers may hold equal dicts
            del _TRACKERS[next(i for i, t in enumerate(_TRACKERS) if t is reads)]
        for key in list(reads):
            path = _resolve_read(key)
            reads[key] = file_digest(path) if path is not None else ""


def note_reads(reads: Mapping[str, str]) -> None:
    """Record ``reads`` (tracked files another process read for the piece being computed here)
    in every active :func:`track_reads` block."""
    with _LOCK:
        for t in _TRACKERS:
            t.update({k: "" for k in reads})  # digested when the block ends


def _clear_data_caches() -> None:
    for name, mod in list(sys.modules.items()):
        if name == "vsteer.data" or name.startswith("vsteer.data."):
            for obj in list(vars(mod).values()):
                if callable(getattr(obj, "cache_clear", None)):
                    obj.cache_clear()


def _resolve_read(key: str) -> Path | None:
    """The file of a recorded read (``data/<relative>`` or ``recipes/<relative>``), if it exists."""
    root_name, _, rel = key.partition("/")
    for root in tracked_roots():
        if root.name == root_name and (root / rel).is_file():
            return root / rel
    return None


def _reads_unchanged(reads: dict[str, str]) -> bool:
    for key, digest in reads.items():
        path = _resolve_read(key)
        if path is None or file_digest(path) != digest:
            return False
    return True


class PieceCache:
    """Finished pieces under ``root/<kind>-<hash>/`` with a ``piece.json`` written last."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits: list[str] = []
        self.misses: list[str] = []

    def path(self, kind: str, inputs: dict) -> Path:
        return self.root / piece_key(kind, inputs)

    def get(self, kind: str, inputs: dict) -> dict | None:
        """The finished piece, or None when missing, unreadable or computed from files since changed."""
        done = self.path(kind, inputs) / DONE
        if not done.is_file():
            return None
        try:
            piece = json.loads(done.read_text())
        except json.JSONDecodeError:
            return None
        return piece if _reads_unchanged(piece.get("reads", {})) else None

    def run(self, kind: str, inputs: dict, compute: Callable[[Path], dict]) -> tuple[dict, Path]:
        """Return the finished piece for these inputs, computing it (into a temp dir) if missing.

        ``compute(workdir)`` writes any files into ``workdir`` and returns a JSON-able dict.
        """
        final = self.path(kind, inputs)
        found = self.get(kind, inputs)
        if found is not None:
            self.hits.append(final.name)
            note_reads(found.get("reads", {}))  # an enclosing piece depends on what this one read
            return found, final
        self.misses.append(final.name)
        work = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{final.name}{temp_infix()}"))
        try:
            with track_reads() as reads:
                result = compute(work)
            piece = {"inputs": inputs, "reads": reads, "result": result}
            (work / DONE).write_text(json.dumps(piece, default=str))
            theirs = self.get(kind, inputs)
            if theirs is not None:  # another process published this piece meanwhile: keep its files
                shutil.rmtree(work, ignore_errors=True)  # and numbers together, not ours beside them
                return theirs, final
            if final.exists():  # an incomplete leftover, or a piece whose files changed
                shutil.rmtree(final)
            share(work)  # mkdtemp made it owner-only; a piece gets the modes of mkdir and open
            os.replace(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return json.loads(json.dumps(piece, default=str)), final

    def adopt(
        self, kind: str, inputs: dict, result: dict, workdir=None, reads: Mapping[str, str] | None = None
    ) -> tuple[dict, Path]:
        """Store as a piece a ``result`` computed in another process: the files it wrote into
        ``workdir`` move into the piece (``workdir`` is removed), ``reads`` are the tracked files
        that process read. Returns what :meth:`run` returns."""

        def compute(work: Path) -> dict:
            if workdir is not None:
                for p in Path(workdir).iterdir():
                    shutil.move(str(p), work / p.name)
            note_reads(reads or {})
            return result

        try:
            return self.run(kind, inputs, compute)
        finally:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)

    def clean_partial(self) -> int:
        """Remove temporary directories left by killed runs: those whose owner process is gone
        (a run working beside this one keeps its work in progress)."""
        n = 0
        for p in self.root.glob(".*"):
            if p.is_dir() and not _owner_alive(p.name):
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n


_PID = re.compile(r"\.pid(\d+)\.")


def temp_infix() -> str:
    """The part of a temporary directory's name that names its owner process."""
    return f".pid{os.getpid()}."


def _owner_alive(name: str) -> bool:
    m = _PID.search(name)
    if m is None:
        return False  # written before owners were recorded: a leftover
    from vsteer.files import pid_alive

    return pid_alive(int(m.group(1)))  # this process's own count as alive: possibly in use
