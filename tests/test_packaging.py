"""Packaging: module layers, names that do not collide, one version, the lock, a wheel that runs.

The layer test reads the imports of every module with ``ast`` (module-level and inside
functions alike): a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import vsteer

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vsteer"

# Layer of each module (a package name covers its submodules). A module imports only from its
# own layer or lower ones: the core knows no capability, capabilities know no experiment, and
# nothing below the command line imports it.
LAYERS = {
    "core": 0,
    "capability": 1,
    "experiment": 2,
    "interface": 3,
}
MODULE_LAYER = {
    "vsteer.errors": "core",
    "vsteer.files": "core",
    "vsteer.sites": "core",
    "vsteer.arch": "core",
    "vsteer.hooks": "core",
    "vsteer.encoding": "core",
    "vsteer.models": "core",
    "vsteer.data": "core",
    "vsteer.evaluate": "core",
    "vsteer.metrics": "core",
    "vsteer.verdicts": "core",
    "vsteer.pool": "core",  # worker processes with pinned threads (compare, run)
    "vsteer.lora": "capability",
    "vsteer.recipes": "capability",
    "vsteer.train": "capability",
    "vsteer.lm_head": "capability",  # TRL trainer patch used by vsteer.train
    "vsteer.vectors": "capability",
    "vsteer.extraction": "capability",
    "vsteer.steering": "capability",
    "vsteer.gguf_io": "capability",
    "vsteer.gguf_lora": "capability",  # value-only LoRA -> llama.cpp LoRA GGUF
    "vsteer.pieces": "capability",
    "vsteer.monitor": "capability",
    "vsteer.interventions": "capability",
    "vsteer.compare": "experiment",  # arms x budgets x lr grid, built on the experiments
    "vsteer.compare_eval": "experiment",
    "vsteer.compare_stats": "experiment",
    "vsteer.compare_result": "experiment",
    "vsteer.serve": "capability",
    "vsteer.experiments": "experiment",
    "vsteer.report": "experiment",
    "vsteer.run": "experiment",
    "vsteer.profiles": "experiment",
    "vsteer.cli": "interface",
    "vsteer.commands": "interface",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def _layer_of(module: str) -> str | None:
    while module:
        if module in MODULE_LAYER:
            return MODULE_LAYER[module]
        module = module.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> list[tuple[str, int, list[str]]]:
    """``(imported module, line, names)`` for every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [a.name for a in node.names]
            found.append((base, node.lineno, names))
            # ``from vsteer import data`` imports the submodule vsteer.data
            found += [(f"{base}.{n}", node.lineno, []) for n in names if f"{base}.{n}" in _modules()]
    return [f for f in found if f[0] == "vsteer" or f[0].startswith("vsteer.")]


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if m != "vsteer" and _layer_of(m) is None]
    assert not missing, f"give these modules a layer in MODULE_LAYER: {missing}"


def test_modules_import_only_their_own_layer_or_lower_ones():
    bad = []
    for module, path in _modules().items():
        own = _layer_of(module)
        if own is None:
            continue
        for target, line, _ in _imports(module, path):
            theirs = _layer_of(target)
            if theirs is not None and LAYERS[theirs] > LAYERS[own]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {target} ({theirs})")
    assert not bad, "\n".join(bad)


def test_private_names_do_not_cross_modules():
    bad = []
    for module, path in _modules().items():
        for target, line, names in _imports(module, path):
            if target.partition(".")[0] != "vsteer" or target == module:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {', '.join(private)} from {target}")
    assert not bad, "make these public names of their module:\n" + "\n".join(bad)


def test_no_import_cycle_between_capability_or_core_modules():
    graph: dict[str, set[str]] = {}
    mods = _modules()
    for module, path in mods.items():
        if _layer_of(module) not in ("core", "capability"):
            continue
        graph[module] = {
            t for t, _, _ in _imports(module, path) if t in mods and t != module and t != "vsteer"
        }

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_public_name_of_the_package_hides_a_submodule():
    """``import vsteer.X as m`` must give the module X, never a function of the same name."""
    clashes = []
    for info in pkgutil.iter_modules(vsteer.__path__):
        module = importlib.import_module(f"vsteer.{info.name}")
        if getattr(vsteer, info.name) is not module:
            clashes.append(info.name)
            continue
        exec_globals: dict = {}
        exec(f"import vsteer.{info.name} as m", exec_globals)
        if exec_globals["m"] is not module:
            clashes.append(info.name)
    assert not clashes, f"package attributes that hide submodules: {clashes}"


def test_documented_top_level_api_resolves():
    for name in vsteer.__all__:
        assert getattr(vsteer, name) is not None, name
    assert callable(vsteer.steer) and callable(vsteer.extract) and callable(vsteer.per_row)


def test_importing_vsteer_loads_no_heavy_library():
    code = (
        "import sys, vsteer, vsteer.cli; "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets', 'sklearn', 'matplotlib')"
        " if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_version_lives_in_one_place():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vsteer.__version__"}
    literal = re.compile(r"\b\d+\.\d+\.\d+\b")
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        hits = [line for line in path.read_text().splitlines() if "version" in line and literal.search(line)]
        assert not hits, f"{path}: version literal outside vsteer/__init__.py: {hits}"
    out = subprocess.run(
        [sys.executable, "-m", "vsteer.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"vsteer {vsteer.__version__}"


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"requirements.lock: {line!r} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_the_lock_pins_every_dependency_within_the_declared_ranges():
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock()
    for text in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(text)
        assert req.specifier, f"{text}: give a compatible range"
        assert any(s.operator == "<" for s in req.specifier), f"{text}: cap it below the next major"
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name == "torch":  # the Makefile installs the CPU build, pinned there
            assert "torch" not in pins
            continue
        assert name in pins, f"{req.name} is not in requirements.lock"
        assert req.specifier.contains(pins[name]), (
            f"lock pins {req.name}=={pins[name]}, outside {req.specifier}"
        )


def test_the_lock_is_closed_under_dependencies():
    """Every requirement of a pinned package (for this Python) is pinned too, or is torch."""
    from importlib import metadata

    from packaging.requirements import Requirement

    pins = _lock()
    missing = []
    for name in pins:
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            missing.append(f"{name} (pinned but not installed here)")
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = re.sub(r"[-_.]+", "-", req.name).lower()
            if dep != "torch" and dep not in pins:
                missing.append(f"{dep} (needed by {name})")
    assert not missing, "requirements.lock lacks: " + ", ".join(sorted(set(missing)))


def test_make_install_uses_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "scripts/install.sh" in makefile
    script = (ROOT / "scripts" / "install.sh").read_text()
    assert "-r requirements.lock" in script
    assert re.search(r"install .*--no-deps .*-e \.", script), "install vsteer itself without resolving again"
    # every uv step falls back to pip, so a machine without uv still gets the locked versions
    assert re.search(r'"\$py" -m pip install -q "\$@"', script)


# ---- a wheel, installed in a fresh environment, runs the main job from an empty directory ----
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a clean copy of the checkout (the files git would commit), so stale
    ``build/`` output or ignored files of this working tree cannot leak into it."""
    import shutil

    src = tmp_path_factory.mktemp("src")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        source, target = ROOT / rel, src / rel
        if not source.is_symlink() and not source.is_file():
            continue  # deleted in the working tree
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (found,) = out.glob("vsteer-*.whl")
    return found


@pytest.mark.slow
def test_the_wheel_ships_the_recipes_and_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in (PACKAGE / "recipes").rglob("*.yaml"):
        assert f"vsteer/{recipe.relative_to(PACKAGE)}" in names
    assert any(n.startswith("vsteer/data/sst2/") for n in names)
    assert not any(n.startswith("tests/") for n in names)


@pytest.mark.slow
def test_a_fresh_wheel_install_runs_the_main_job_from_an_empty_directory(wheel, tmp_path):
    """A new venv holding only the wheel runs ``vsteer run claims`` from an empty directory.

    The dependencies come from this environment's site-packages through a ``.pth`` file (so
    nothing is downloaded); the editable checkout is not on the path, so recipes and data
    must come from the installed package.
    """
    import site
    import sysconfig

    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = [p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    # .pth lines go after the venv's own site-packages: the installed vsteer wins, and the
    # checkout's editable-install hook (a .pth inside those directories) is not run
    (Path(purelib) / "zz_vsteer_test_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    where = subprocess.run(
        [str(python), "-c", "import vsteer; print(vsteer.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(purelib), f"imported vsteer from {where}, not from the wheel"
    overrides = [x for o in _smoke_overrides() for x in ("--set", o)]
    run = subprocess.run(
        [str(bindir / "vsteer"), "run", "claims", *overrides, "--only", "probes", "--no-progress"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    reports = list(work.rglob("report.md"))
    assert reports, f"no report.md under {work}: {run.stdout[-500:]}"
    assert "probe" in reports[0].read_text().lower()


def _smoke_overrides() -> list[str]:
    from vsteer.errors import RecipeError
    from vsteer.run import load_run_spec

    try:
        load_run_spec("claims", ["profile=smoke"])
        return ["profile=smoke"]
    except RecipeError:  # no smoke profile: shrink the probes by hand
        return [f"options.probes.{k}={v}" for k, v in {"n_train": 40, "n_test": 20, "n_layers": 2}.items()]


# ---- quiet by default, library logs under --verbose -------------------------------------------
_LOG_PROBE = """
import os, sys
for var in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS",
            "HF_DATASETS_DISABLE_PROGRESS_BARS"):
    os.environ.pop(var, None)
from vsteer.cli import configure_logging
configure_logging(sys.argv[1] == "verbose")
import logging
import transformers, datasets
from huggingface_hub.utils import are_progress_bars_disabled
print(transformers.logging.get_verbosity(), datasets.logging.get_verbosity(),
      are_progress_bars_disabled(), datasets.is_progress_bar_enabled(), logging.getLogger("trl").level)
"""


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("quiet", [40, 40, True, False, 40]),  # logging.ERROR = 40, INFO = 20
        ("verbose", [20, 20, False, True, 0]),
    ],
)
def test_libraries_are_quiet_unless_verbose(mode, expected):
    out = subprocess.run(
        [sys.executable, "-c", _LOG_PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(x) for x in expected], (mode, out)


def test_verbose_is_accepted_before_and_after_the_command():
    from vsteer.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["--verbose", "run", "claims"]).verbose is True
    assert parser.parse_args(["run", "claims", "--verbose"]).verbose is True
    assert parser.parse_args(["run", "claims"]).verbose is False
