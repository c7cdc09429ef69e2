"""`python -m cxrjax.bench ...`: the same arguments as `cxrjax bench`."""

import argparse
import sys

from cxrjax.bench.args import add_arguments, run
from cxrjax.bench.gpu_target import ensure_plugin_registered
from cxrjax.logs import show_library_logs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ensure_plugin_registered()
    show_library_logs()
    parser = argparse.ArgumentParser(prog="python -m cxrjax.bench", description=__doc__)
    add_arguments(parser)
    return run(parser, parser.parse_args(argv), "python -m cxrjax.bench")


if __name__ == "__main__":
    sys.exit(main())
