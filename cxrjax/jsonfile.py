"""Reading JSON that a person or an earlier run wrote: one reader, one kind of message.

`read_json(path, SomeError)` returns the file's value, or raises `SomeError` (an
`InputError`) with one line that names the file and says what is wrong with it: not found,
unreadable, not valid JSON, or not the JSON type expected (an object, by default).
"""

from __future__ import annotations

import json
from pathlib import Path

from cxrjax.errors import InputError

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "true or false", type(None): "null"}


def json_type(value) -> str:
    """What a JSON value is, in JSON's words ("an object", "a number", ...)."""
    return _JSON_TYPES.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


def parse_json(text: str, source: str | Path, error: type[InputError] = InputError):
    """`text` as JSON; `source` names it in the error (a file, or "file, line 3")."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{source}: not valid JSON: {e}") from e


def read_json(
    path: str | Path, error: type[InputError] = InputError, *, missing: str | None = None, shape: type | None = dict
):
    """The JSON value in `path`, checked to be a `shape` (None: any value).

    `missing` is the whole message when the file does not exist (say, which command writes
    it); by default "PATH: not found"."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(missing or f"{path}: not found") from None
    except OSError as e:
        raise error(f"{path}: unreadable ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise error(f"{path}: not valid JSON: not UTF-8 text ({e.reason} at byte {e.start})") from e
    value = parse_json(text, path, error)
    if shape is not None and not isinstance(value, shape):
        raise error(f"{path}: expected {_JSON_TYPES.get(shape, shape.__name__)} at the top, got {json_type(value)}")
    return value
