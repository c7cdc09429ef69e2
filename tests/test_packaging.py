"""What `pip install cxrjax` ships: every package, and the recipes by name.
(tests/test_demo.py runs the demo from a wheel installed outside the checkout.)"""

import tomllib
from pathlib import Path

import pytest

from cxrjax.config import load_config, recipe_names, resolve

REPO = Path(__file__).resolve().parents[1]


def test_the_explicit_package_list_names_every_package():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "cxrjax").rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"cxrjax.configs"}
    assert setuptools["package-dir"] == {"cxrjax.configs": "configs"}


def test_recipes_load_by_name_or_path():
    assert recipe_names() == sorted(p.stem for p in (REPO / "configs").glob("[!_]*.py"))
    by_name = load_config("chexnet:smoke", ["--config.seed=3"])
    by_path = load_config(str(REPO / "configs" / "chexnet.py:smoke"), ["--config.seed=3"])
    assert by_name.to_dict() == by_path.to_dict() and by_name.seed == 3
    assert resolve("configs/chexnet.py") == "configs/chexnet.py"  # a path stays a path


def test_an_unknown_recipe_names_the_shipped_ones():
    with pytest.raises(SystemExit, match="no recipe 'chexnett' .shipped: chexnet, demo, fisher2025, full1024"):
        load_config("chexnett", [])
