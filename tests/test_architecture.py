"""Import boundaries, read from the source with `ast` (every import, also those inside
functions): training and evaluation never import each other; `cxrjax.experiment` is
where they meet."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cxrjax"


def imported_modules(path: Path, root: Path) -> set[str]:
    """Absolute names of every module `path` (under `root`, the folder holding the
    package) imports, anywhere in the file."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names.add(base)
            # `from cxrjax import eval` imports the package cxrjax.eval.
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def crossings(source: str, target: str, package: Path = PACKAGE) -> list[str]:
    """'file: module' for every import of `cxrjax.<target>` from `cxrjax/<source>/`."""
    found = []
    for path in sorted((package / source).rglob("*.py")):
        for name in sorted(imported_modules(path, package.parent)):
            if name == f"cxrjax.{target}" or name.startswith(f"cxrjax.{target}."):
                found.append(f"{path.relative_to(package.parent)}: {name}")
    return found


@pytest.mark.parametrize("source, target", [("train", "eval"), ("eval", "train")])
def test_train_and_eval_do_not_import_each_other(source, target):
    assert crossings(source, target) == []


def test_the_train_package_is_where_it_is_looked_for():
    assert len(list((PACKAGE / "train").glob("*.py"))) > 5 and len(list((PACKAGE / "eval").glob("*.py"))) > 5


def test_the_check_sees_lazy_relative_and_package_imports(tmp_path):
    package = tmp_path / "cxrjax"
    (package / "train").mkdir(parents=True)
    sources = {
        "lazy.py": "def f():\n    from cxrjax.eval.metrics import roc_auc\n",
        "relative.py": "from ..eval import evaluate\n",
        "package.py": "from cxrjax import eval\n",
        "method.py": "class A:\n    def m(self):\n        import cxrjax.eval.inference as i\n",
        "similar_name.py": "import cxrjax.evaluation\nfrom cxrjax.train import eval\n",
    }
    for name, text in sources.items():
        (package / "train" / name).write_text(text)
    offending = {line.split(":")[0] for line in crossings("train", "eval", package)}
    assert offending == {f"cxrjax/train/{n}" for n in ("lazy.py", "relative.py", "package.py", "method.py")}
