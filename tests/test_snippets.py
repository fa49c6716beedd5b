"""Every Python sample in README.md and docs/*.md runs, and every ``vsteer.x.y`` name they cite exists.

Samples run as written (on the embedded model, so they are marked slow), one fresh namespace
each, in an empty working directory: a sample that needs something it does not define fails.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from test_serve import served  # noqa: F401  (the server a client sample talks to)

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
# `vsteer.a.b` in inline code or a sample; file names such as vsteer.json are not names
NAME = re.compile(r"\bvsteer(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
FILE_SUFFIXES = {"json", "yaml", "yml", "md", "py", "gguf", "safetensors", "cli"}


def _samples() -> list:
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 2
            out.append(pytest.param(m.group(1), id=f"{doc.name}:{line}", marks=pytest.mark.slow))
    return out


def _names() -> list[str]:
    names = set()
    for doc in DOCS:
        for name in NAME.findall(doc.read_text()):
            if name.rsplit(".", 1)[-1] not in FILE_SUFFIXES:
                names.add(name)
    return sorted(names)


def resolve(dotted: str):
    """The object ``dotted`` names, importing modules on the way (as ``import a.b`` would)."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def test_the_docs_have_samples():
    assert len(_samples()) >= 3


@pytest.mark.parametrize("name", _names())
def test_every_cited_name_exists(name):
    resolve(name)


def test_a_cited_module_function_is_reached_through_its_module():
    """The documented ``vsteer.steering.per_row`` form works (the module is not hidden by ``vsteer.steer``)."""
    import vsteer

    assert resolve("vsteer.steering.per_row") is resolve("vsteer.per_row")
    assert resolve("vsteer.extraction.caa_pairs")
    assert callable(vsteer.steer) and not hasattr(vsteer.steer, "per_row")


SERVER_URL = "http://127.0.0.1:8000/v1"


@pytest.mark.parametrize("code", _samples())
def test_sample_runs(code, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    if SERVER_URL in code:
        # a client sample talks to a real `vsteer serve` on 127.0.0.1 (test_serve's tiny server,
        # which has the adapter and vectors the sample names), on its free port and key
        from test_serve import KEY

        served = request.getfixturevalue("served")
        code = code.replace(SERVER_URL, f"{served['url']}/v1").replace('api_key="KEY"', f'api_key="{KEY}"')
    exec(compile(code, "<sample>", "exec"), {"__name__": "__sample__"})
