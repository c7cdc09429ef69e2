"""The training recipes. Each file's `get_config(variant)` returns an ml_collections
ConfigDict; its docstring shows the command that runs it. They ship inside the package as
`cxrjax.configs` (pyproject maps this folder there), so `--config chexnet` works from any
folder after `pip install cxrjax`, and `--config path/to/file.py` runs any other file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def recipe_names() -> list[str]:
    return sorted(
        p.name[:-3]
        for p in resources.files(__name__).iterdir()
        if p.name.endswith(".py") and not p.name.startswith("_")
    )


def resolve(spec: str) -> str:
    """`NAME[:variant]` of a shipped recipe, or `path.py[:variant]`, as a file path with
    the variant kept, for ml_collections' config_flags."""
    path, colon, variant = spec.partition(":")
    if path.endswith(".py") or Path(path).exists():
        return spec
    recipe = resources.files(__name__) / f"{path}.py"
    if not recipe.is_file():
        raise ValueError(f"--config {spec}: no recipe {path!r} (shipped: {', '.join(recipe_names())}) and no such file")
    return str(recipe) + colon + variant
