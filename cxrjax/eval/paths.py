"""Output paths built from untrusted names (image ids, run names) stay inside one folder."""

from __future__ import annotations

from pathlib import Path

from cxrjax.errors import InputError


class UnsafePathError(InputError):
    """A name that would write outside the output folder."""


def safe_child(out_dir: str | Path, name: str) -> Path:
    """`out_dir / name`, or raise if `name` is absolute, empty or climbs out (`../x.png`).

    Symlinks are resolved on both sides, so a link inside `out_dir` that points
    elsewhere is refused too.
    """
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise UnsafePathError(f"unusable output name {name!r}")
    if Path(name).is_absolute() or "\\" in name:
        raise UnsafePathError(f"output name {name!r} must be a relative path inside {out_dir}")
    root = Path(out_dir).resolve()
    child = (root / name).resolve()
    if child == root or not child.is_relative_to(root):
        raise UnsafePathError(f"output name {name!r} escapes the output folder {root}")
    return child
