"""``python -m mktme_sandbox.bench [SUITE ...] [--json]``: run benchmark suites.

Results go to stdout (a table, or JSON with ``--json``), progress to stderr.
Exit status 0 when the suites ran (a missed goal shows as MISS, not as a
failure), 2 for an unknown suite.
"""

from __future__ import annotations

import argparse
import sys

from mktme_sandbox.bench import SUITES, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mktme_sandbox.bench", description=__doc__)
    parser.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=f"suites to run (default: all of {', '.join(SUITES)})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    unknown = [name for name in args.suites if name not in SUITES]
    if unknown:
        parser.error(f"unknown suite {', '.join(unknown)} (suites: {', '.join(SUITES)})")
    run(args.suites or None, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
