"""One base class for bad input: every error cxrjax raises about a file, row or option
derives from it, and catching it imports nothing heavy."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

from cxrjax.errors import InputError

PACKAGE = Path(__file__).resolve().parents[1] / "cxrjax"
NOT_INPUT = {"TrainingDiverged"}  # a run that went wrong, not a file that is wrong


def error_classes():
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Diverged")):
                yield module, node.name


def test_every_input_error_derives_from_the_one_base_class():
    found = list(error_classes())
    assert len(found) >= 12
    for module, name in found:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, InputError) != (name in NOT_INPUT), f"{module}.{name}"


def test_catching_input_errors_imports_nothing_heavy():
    code = (
        "import sys; import cxrjax.errors, cxrjax.cli; "
        "heavy = {'jax', 'orbax', 'matplotlib', 'flax', 'grain', 'pandas'} & {m.split('.')[0] for m in sys.modules}; "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
