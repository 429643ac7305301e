"""The package's shape: no import circles, no imports back up to the package, a cheap ``import embedpipe``."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import embedpipe

ROOT = Path(__file__).resolve().parents[1]


def _structure() -> object:
    spec = importlib.util.spec_from_file_location("structure", ROOT / "scripts" / "structure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_circles_and_no_imports_of_the_package_from_inside() -> None:
    structure = _structure()
    package = Path(embedpipe.__file__).parent
    names = {structure.module_name(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in names.items():
        graph[name] = structure.imports(ast.parse(path.read_text()), name, path.name == "__init__.py", set(names))
    assert structure.cycles(graph) == []
    assert [m for m, deps in graph.items() if "embedpipe" in deps and m != "embedpipe"] == []
    # The check itself can fail: a made-up circle is found.
    assert structure.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_import_embedpipe_loads_neither_torch_nor_timm() -> None:
    code = "import sys, embedpipe; print(sorted(m for m in ('torch', 'timm', 'sklearn', 'h5py') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert callable(embedpipe.fit_head) and embedpipe.FineTuneResult.__name__ == "FineTuneResult"  # loaded on first use
    assert callable(embedpipe.cache_verify) and callable(embedpipe.cache.read_attrs)


def test_named_backbone_lists_ship_inside_the_package() -> None:
    from embedpipe.bench import resolve_backbones

    listed = Path(embedpipe.__file__).parent / "bench" / "backbones.json"
    assert listed.is_file()
    assert "tf_efficientnet_lite0" in resolve_backbones("offline")
