"""PNG files given on the command line → image ids and model-size uint8 pictures,
preprocessed exactly as `cxrjax prepare` and the training loader do."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxrjax.data.images import ImageError, decode_to_gray8
from cxrjax.eval.model_source import InferenceError


def collect_pngs(paths: list[str | Path]) -> list[tuple[str, Path]]:
    """(image id, file) for PNG files and every *.png below given folders, in the order
    given (folders sorted). The id is the file name, as in the NIH release, so it must be
    unique."""
    found: dict[str, Path] = {}
    for given in map(Path, paths):
        if given.is_dir():
            files = sorted(p for p in given.rglob("*") if p.suffix.lower() == ".png" and p.is_file())
            if not files:
                raise InferenceError(f"{given}: folder holds no .png files")
        elif given.is_file():
            files = [given]
        else:
            raise InferenceError(f"{given}: no such file or folder")
        for path in files:
            if path.name in found and found[path.name].resolve() != path.resolve():
                raise InferenceError(
                    f"image id {path.name!r} names two files ({found[path.name]} and {path}); "
                    "ids are file names and must be unique"
                )
            found.setdefault(path.name, path)
    return list(found.items())


def read_gray(path: Path) -> np.ndarray:
    """The file as uint8 [H, W]; any unreadable file raises ImageError naming it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror})") from e
    return decode_to_gray8(data, str(path))
