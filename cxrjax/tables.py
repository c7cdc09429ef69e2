"""Markdown tables and the numbers in them, for every report cxrjax writes (evaluation,
leaderboard, benchmarks, figure titles). Imports nothing heavy.

An undefined number (None, or NaN from a table) is written as a marker, never as a number.
"""

from __future__ import annotations

import math

NA = "n/a"


def undefined(value) -> bool:
    """None, or a float NaN (pandas' missing cell)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def number(value, spec: str = ".3f", scale: float = 1.0, na: str = NA) -> str:
    """`value * scale` in the format `spec` (".1f", ".1%", ...), or `na` when undefined."""
    return na if undefined(value) else format(value * scale, spec)


def fmt(value, digits: int = 3) -> str:
    """A metric with `digits` decimals; an int (a count) stays whole; undefined is 'n/a'."""
    if isinstance(value, int) and not undefined(value):
        return str(value)
    return number(value, f".{digits}f")


def signed(value, digits: int = 3) -> str:
    """A difference, always signed, never "-0.000"; undefined is 'n/a'."""
    return NA if undefined(value) else f"{round(value, digits) + 0.0:+.{digits}f}"


def fmt_ci(ci, digits: int = 3) -> str:
    """A confidence interval `[low, high]`; None (or empty) is 'n/a'."""
    return NA if ci is None or len(ci) == 0 else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def md_cell(text) -> str:
    """Text from files (run names, paths) must not break a Markdown table row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def table_lines(header: list[str], rows) -> list[str]:
    """A Markdown table, one line per row; the cells are strings already."""
    lines = [row_line(header), "|" + "---|" * len(header)]
    return lines + [row_line(cells) for cells in rows]


def row_line(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def table(header: list[str], rows) -> str:
    return "\n".join(table_lines(header, rows))


def section(title: str, *paragraphs: str, level: int = 2) -> list[str]:
    """A Markdown heading and its paragraphs, each followed by a blank line."""
    lines = [f"{'#' * level} {title}", ""]
    for text in paragraphs:
        lines += [text, ""]
    return lines
