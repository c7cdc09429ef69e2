"""`cxrjax.jsonfile.read_json`: the one JSON-file reader. Each way a file can be wrong is
one line that names the file, raised as the caller's own InputError subclass."""

import json

import pytest

from cxrjax.errors import InputError
from cxrjax.jsonfile import json_type, parse_json, read_json


class PartError(InputError):
    pass


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "{path}: not found"),
        (b"{not json", "{path}: not valid JSON: Expecting property name"),
        (b"\xff\xfe{}", "{path}: not valid JSON: not UTF-8 text (invalid start byte at byte 0)"),
        (b"[1, 2]", "{path}: expected an object at the top, got an array"),
        (b'"text"', "{path}: expected an object at the top, got a string"),
        (b"3.5", "{path}: expected an object at the top, got a number"),
        (b"null", "{path}: expected an object at the top, got null"),
    ],
)
def test_each_fault_is_one_line_naming_the_file_in_the_callers_class(tmp_path, content, expected):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PartError) as e:
        read_json(path, PartError)
    message = str(e.value)
    assert message.startswith(expected.format(path=path)) and "\n" not in message, message


def test_a_folder_in_place_of_the_file_is_unreadable(tmp_path):
    with pytest.raises(PartError, match=f"^{tmp_path}: unreadable \\(Is a directory\\)$"):
        read_json(tmp_path, PartError)


def test_the_missing_message_and_the_shape_are_the_callers():
    with pytest.raises(PartError, match="^run `cxrjax prepare` first$"):
        read_json("/nonexistent/manifest.json", PartError, missing="run `cxrjax prepare` first")


def test_values_come_back_as_json_gives_them(tmp_path):
    path = tmp_path / "x.json"
    value = {"a": [1, 2.5, None, True], "b": {"c": "é"}}
    path.write_text(json.dumps(value), encoding="utf-8")
    assert read_json(path) == value
    path.write_text("[1]")
    assert read_json(path, shape=list) == [1] and read_json(path, shape=None) == [1]
    assert parse_json('{"x": 1}', "somewhere") == {"x": 1}
    with pytest.raises(InputError, match=r"^f.jsonl, line 3: not valid JSON: "):
        parse_json("{", "f.jsonl, line 3")


def test_json_types_are_named_in_json_words():
    assert [json_type(v) for v in ({}, [], "", 1, 1.5, True, None)] == [
        "an object",
        "an array",
        "a string",
        "a number",
        "a number",
        "true or false",
        "null",
    ]
