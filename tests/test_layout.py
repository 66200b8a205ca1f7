"""The package's floors: every import points down (or stays inside its own package).

    4  cli, demo, cocoa/__init__           the commands
    3  train, eval                         the applications
    2  datagen, curation, tiny, testing    teacher synthesis, curation, the embedded backbone, fixtures
    1  sources, prompts, model             source datasets, templates, the method library
    0  _version, errors < records < fs < config, progress < shards < metrics   the ground floor (in that order)
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cocoa"
FLOOR = {
    "_version": 0.0, "errors": 0.0, "records": 0.1, "fs": 0.2, "config": 0.3, "progress": 0.3, "shards": 0.35, "metrics": 0.4,
    "sources": 1, "prompts": 1, "model": 1,
    "datagen": 2, "curation": 2, "tiny": 2, "testing": 2,
    "train": 3, "eval": 3,
    "cli": 4, "demo": 4, "": 4,
}


def _unit(module: str) -> str:
    """``cocoa.train.run`` -> ``train``; ``cocoa`` -> ``''``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _edges():
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = module if rel.name == "__init__" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if t == "cocoa" or t.startswith("cocoa."):
                    yield module, t, path, node.lineno


def test_every_unit_has_a_floor():
    units = {_unit(m) for m, _, _, _ in _edges()} | {_unit(t) for _, t, _, _ in _edges()}
    assert units <= set(FLOOR), f"give these a floor in tests/test_layout.py: {sorted(units - set(FLOOR))}"


def test_every_import_points_down():
    bad = []
    for module, target, path, line in _edges():
        a, b = _unit(module), _unit(target)
        if a == b or (a == "" and target == "cocoa"):
            continue
        if not FLOOR[b] < FLOOR[a]:
            bad.append(f"{path.relative_to(PKG.parent)}:{line}: {module} (floor {FLOOR[a]}) imports {target} (floor {FLOOR[b]})")
    assert not bad, "imports that do not point down:\n" + "\n".join(bad)


def test_every_package_says_its_job():
    for init in PKG.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 6, f"{init.relative_to(PKG.parent)}: its docstring must say the package's one job"


@pytest.mark.parametrize("library", ["cocoa.model", "cocoa.sources", "cocoa.shards"])
def test_the_library_does_not_import_the_applications(library):
    code = (
        "import importlib, pkgutil, sys\n"
        f"m = importlib.import_module('{library}')\n"
        "for s in pkgutil.walk_packages(getattr(m, '__path__', []), m.__name__ + '.'):\n"
        "    importlib.import_module(s.name)\n"
        "print(sorted({n.split('.')[1] for n in sys.modules if n.startswith('cocoa.')}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))
    assert not loaded & {"train", "eval", "datagen", "curation", "cli", "demo", "tiny"}, loaded
