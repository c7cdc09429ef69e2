"""Import boundaries, read from the source with `ast` (every import, also those inside
functions): training and evaluation never import each other (`cxrjax.experiment` is
where they meet), and nothing imports the command line (`cxrjax.cli`), the top layer."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cxrjax"


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


def importers(target: str, files: list[Path], root: Path) -> list[str]:
    """'file: module' for every import of the module `target` (or one inside it) by `files`
    (under `root`, the folder holding the package)."""
    found = []
    for path in files:
        for name in sorted(imported_modules(path, root)):
            if name == target or name.startswith(f"{target}."):
                found.append(f"{path.relative_to(root)}: {name}")
    return found


def crossings(source: str, target: str, package: Path = PACKAGE) -> list[str]:
    """'file: module' for every import of `cxrjax.<target>` from `cxrjax/<source>/`."""
    return importers(f"cxrjax.{target}", sorted((package / source).rglob("*.py")), package.parent)


def below_the_command_line(repo: Path = REPO) -> list[Path]:
    """The files that must not import `cxrjax.cli`: the package but cli.py itself, the
    recipes (shipped as cxrjax.configs) and the launcher."""
    package = sorted(p for p in (repo / "cxrjax").rglob("*.py") if p != repo / "cxrjax" / "cli.py")
    return package + sorted((repo / "configs").rglob("*.py")) + sorted((repo / "launch").rglob("*.py"))


def module_name(path: Path) -> str:
    """The module a file of this checkout is imported as (configs/ ships as cxrjax.configs)."""
    parts = path.relative_to(REPO).with_suffix("").parts
    parts = ("cxrjax", *parts) if parts[0] == "configs" else parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("source, target", [("train", "eval"), ("eval", "train")])
def test_train_and_eval_do_not_import_each_other(source, target):
    assert crossings(source, target) == []


def test_nothing_imports_the_command_line():
    assert importers("cxrjax.cli", below_the_command_line(), REPO) == []


def test_the_checks_read_every_module_of_the_package():
    """Every module Python finds in the imported package is a file the checks read: a
    check that read a wrong or empty folder would pass vacuously."""
    import cxrjax.configs  # configs/, mapped into the package: not under cxrjax.__path__

    names = {
        m.name
        for package in (cxrjax, cxrjax.configs)
        for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")
    }
    assert {"cxrjax.train.loop", "cxrjax.eval.evaluate", "cxrjax.bench.quick", "cxrjax.configs.chexnet"} <= names
    for source in ("train", "eval"):
        read = {module_name(p) for p in (PACKAGE / source).rglob("*.py")}
        assert {n for n in names if n.startswith(f"cxrjax.{source}.")} <= read, source
    read = {module_name(p) for p in below_the_command_line() if not p.is_relative_to(REPO / "launch")}
    assert names - {"cxrjax.cli"} <= read and "cxrjax.cli" not in read
    assert REPO / "launch" / "node.py" in below_the_command_line()


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


def test_the_check_sees_every_import_of_the_command_line(tmp_path):
    sources = {
        "cxrjax/cli.py": "from cxrjax.cli import main\n",  # the command line itself may
        "cxrjax/bench/quick.py": "from cxrjax.cli import show_library_logs\n",
        "cxrjax/eval/lazy.py": "def f():\n    from .. import cli\n",
        "cxrjax/logs.py": "from . import cli\n",
        "cxrjax/train/aliased.py": "import cxrjax.cli as c\n",
        "cxrjax/data/inner.py": "from cxrjax.cli import _add_bench as a\n",
        "configs/recipe.py": "def get_config():\n    from cxrjax.cli import load_config\n",
        "launch/node.py": "class N:\n    def main(self):\n        from cxrjax.cli import load_config\n",
        "cxrjax/similar_name.py": "import cxrjax.client\nfrom cxrjax.config import load_config\nfrom cxrjax import clip\n",
    }
    for name, text in sources.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    offending = {line.split(":")[0] for line in importers("cxrjax.cli", below_the_command_line(tmp_path), tmp_path)}
    assert offending == set(sources) - {"cxrjax/cli.py", "cxrjax/similar_name.py"}
