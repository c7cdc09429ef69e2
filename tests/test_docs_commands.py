"""Every command line the docs show is parsed by the current CLI, so the docs cannot drift
from it: `cxrjax ...`, `python -m cxrjax...` and `python benchmarks|launch/*.py` in
README.md, docs/*.md, benchmarks/README.md and launch/README.md.

A command in a code block must parse as written (required arguments, types, choices;
`train`/`demo` overrides are also loaded into their recipe). An inline `cxrjax ...` in
prose must parse too, unless it is a fragment that leaves out required arguments
(`cxrjax evaluate --checkpoint`): then its subcommand and every option it names must exist. `[...]` marks optional arguments: they are parsed too.
Nothing is executed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/README.md"]
DOCS.append(ROOT / "launch/README.md")
SCRIPTS = re.compile(r"^(benchmarks|launch)/[\w.-]+\.py$")
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
# A line that may run a command (a tree listing such as `cxrjax/auc.py  ...` does not).
CANDIDATE = re.compile(r"(^|[\s;&|(])(cxrjax\s|python3?\s+(-m\s+cxrjax|benchmarks/|launch/))")


def _command(tokens: list[str]) -> list[str] | None:
    """The cxrjax/python command a shell segment runs (from its program on), or None."""
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] == "cxrjax":
        if len(tokens) > 1 and tokens[1].endswith(":"):  # an error message shown in a block
            return None
        return tokens
    if tokens[0] in ("python", "python3") and len(tokens) > 1:
        if tokens[1] == "-m" and len(tokens) > 2 and tokens[2].split(".")[0] == "cxrjax":
            return tokens
        if SCRIPTS.match(tokens[1]):
            return tokens
    return None


def _segments(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segments, current = [], []
    for token in lexer:
        if token in SEPARATORS or set(token) <= set("&|;()"):
            segments.append(current)
            current = []
        elif token.startswith(">") or token.startswith("2>"):
            break  # redirections end the arguments
        else:
            current.append(token)
    return [*segments, current]


def documented_commands() -> list[tuple[str, list[str], bool]]:
    """(where, argv, strict) for every command line in the docs."""
    found = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        in_block, lang, pending, start = False, "", "", 0
        for number, line in enumerate(lines, 1):
            fence = re.match(r"^\s*```(\w*)", line)
            if fence:
                in_block, lang = not in_block, fence.group(1)
                continue
            where = f"{doc.relative_to(ROOT)}:{start if pending else number}"
            if in_block:
                if lang not in ("", "bash", "sh", "shell"):
                    continue
                text = line.strip()
                start = start if pending else number
                pending = f"{pending} {text}" if pending else text
                if pending.endswith("\\"):
                    pending = pending[:-1]
                    continue
                text, pending = pending, ""
                if not CANDIDATE.search(text):
                    continue
                for tokens in _segments(text.replace("[", " ").replace("]", " ")):
                    cmd = _command(tokens)
                    if cmd:
                        found.append((where, cmd, True))
            else:
                for span in re.findall(r"`([^`]+)`", line):
                    if not CANDIDATE.match(span):
                        continue
                    cmd = _command(shlex.split(span.replace("[", " ").replace("]", " ")))
                    if cmd:
                        found.append((where, cmd, False))
    return found


class _Parsed(Exception):
    def __init__(self, args):
        self.args_ = args


def _unknown_options(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    options = _known_options(parser)
    unknown = [a for a in argv if a.startswith("--") and a.split("=")[0] not in options]
    return f"unknown options {unknown}" if unknown else None


def _parse_script_main(main, argv: list[str], strict: bool) -> str | None:
    """Run a script's `main(argv)` only until its parser parses: the error, or None.
    Not strict (a fragment in prose): only the options it names are checked."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        if not strict:
            raise _Parsed(_unknown_options(self, argv))
        original(self, args, namespace)
        raise _Parsed(None)

    err = io.StringIO()
    argparse.ArgumentParser.parse_args = parse_and_stop
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(argv)
    except _Parsed as parsed:
        return parsed.args_
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "exit"
    finally:
        argparse.ArgumentParser.parse_args = original
    return "main() returned without parsing its arguments"


def _script_main(path: Path):
    spec = importlib.util.spec_from_file_location(f"_doc_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _known_options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _check_cxrjax(argv: list[str], strict: bool, load: bool = True) -> str | None:
    """Parse with the CLI's parser; `load`: also load train/demo overrides into the recipe."""
    from cxrjax.cli import build_parser
    from cxrjax.config import load_config

    parser = build_parser()
    if not strict:
        sub = _subparsers(parser).get(argv[0]) if argv else None
        if sub is None:
            return f"no subcommand {argv[:1]}"
        return _unknown_options(sub, [a for a in argv[1:] if not a.startswith("--config.")])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args, extra = parser.parse_known_args(argv)
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1]
    if extra and not getattr(args, "accepts_overrides", False):
        return f"unrecognized arguments: {extra}"
    if load and getattr(args, "accepts_overrides", False):
        try:
            with contextlib.chdir(ROOT):
                load_config(args.config, extra)
        except SystemExit as e:
            return str(e)
    return None


COMMANDS = documented_commands()


def test_the_docs_show_commands_for_every_subcommand():
    """The extraction works: a change that found nothing would pass vacuously."""
    # Strict: shown in a command block, so parsed exactly (prose is parsed leniently).
    strictly = {argv[1] for _, argv, strict in COMMANDS if strict and argv[0] == "cxrjax" and len(argv) > 1}
    assert {"demo", "prepare", "train", "evaluate", "leaderboard", "predict", "gradcam", "import-weights"} <= strictly


FRAGMENT = ("arguments are required", "expected one argument")


def _problem(argv: list[str], strict: bool) -> str | None:
    if not strict:  # prose: parsed as written, unless it is a fragment (`cxrjax evaluate --checkpoint`)
        problem = _problem_of_fragment(argv, strict=True, load=False)
        fragment = problem and any(f in problem for f in FRAGMENT)
        return _problem_of_fragment(argv) if fragment else problem
    return _problem_of_fragment(argv, strict=True)


@pytest.mark.parametrize("where, argv, strict", COMMANDS, ids=[f"{w} {' '.join(a[:3])}" for w, a, _ in COMMANDS])
def test_documented_command_parses(where, argv, strict):
    problem = _problem(argv, strict)
    assert problem is None, f"{where}: `{shlex.join(argv)}` does not parse: {problem}"


def _problem_of_fragment(argv: list[str], strict: bool = False, load: bool = True) -> str | None:
    if argv[0] == "cxrjax":
        problem = _check_cxrjax(argv[1:], strict, load)
    elif argv[1] == "-m":
        module = argv[2]
        if module == "cxrjax.cli":
            problem = _check_cxrjax(argv[3:], strict, load)
        else:
            main = importlib.import_module(module if module != "cxrjax.bench" else "cxrjax.bench.__main__").main
            problem = _parse_script_main(main, argv[3:], strict)
    else:
        problem = _parse_script_main(_script_main(ROOT / argv[1]), argv[2:], strict)
    return problem
