"""How a command shows the library's log: `cxrjax`, `python -m cxrjax.bench` and the quick
benchmark call `show_library_logs` once, before they start work."""

from __future__ import annotations

import logging
import sys


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def show_library_logs() -> None:
    """The library logs through `logging` under "cxrjax"; a command shows its INFO lines on
    stdout as plain text and its warnings on stderr. Other libraries' logs are left as they are."""
    log = logging.getLogger("cxrjax")
    for handler in [h for h in log.handlers if getattr(h, "cxrjax_cli", False)]:
        log.removeHandler(handler)
    info, warnings = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    info.addFilter(_Below(logging.WARNING))
    info.setFormatter(logging.Formatter("%(message)s"))
    warnings.setLevel(logging.WARNING)
    warnings.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    for handler in (info, warnings):
        handler.cxrjax_cli = True
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
