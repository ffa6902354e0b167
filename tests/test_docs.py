"""The docs and docstrings name what exists: every dotted ``anyflow.*`` / ``weights_convert.*`` name resolves
to a module or an attribute, and every path of a project file exists.

CHANGELOG.md (history) and the tables of moved module paths (``anyflow.MOVED_MODULES``) are left out.
"""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOTTED = re.compile(r"(?<![\w./-])((?:anyflow|weights_convert)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
PATH = re.compile(r"(?<![\w./-])((?:anyflow|weights_convert|scripts|tests|docs)/[\w./-]*\w)")
SOURCES = sorted([ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("anyflow/**/*.py"),
                  *ROOT.glob("weights_convert/*.py"), *ROOT.glob("scripts/*.py")])


def resolves(name: str) -> bool:
    """Whether ``name`` is a module, or an attribute (chain) of the longest module prefix of it."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def names_in(path: pathlib.Path):
    text = path.read_text()
    for table in ("MOVED_MODULES = {", "report_moved_modules({"):  # the old paths, named on purpose
        if table in text:
            text = text[:text.index(table)]
    for match in DOTTED.finditer(text):
        name = match.group(1).rstrip(".")
        if name.endswith((".py", ".md", ".toml", ".json", ".safetensors", ".pt")):
            continue
        yield name
    for match in PATH.finditer(text):
        yield "/" + match.group(1)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_name_and_path_a_doc_gives_exists(path):
    missing = []
    for name in sorted(set(names_in(path))):
        if name.startswith("/"):
            relative = name[1:]
            if "*" in relative or "{" in relative or relative.startswith("tests/artifacts/"):  # (made by the tests)
                continue
            if not (ROOT / relative).exists():
                missing.append(relative)
        elif not resolves(name):
            missing.append(name)
    assert not missing, f"{path.relative_to(ROOT)} names what does not exist: {missing}"
