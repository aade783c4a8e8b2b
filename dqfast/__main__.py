"""Command line: ``python -m dqfast <command>``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dqfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run every op with every available backend and print a table")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from dqfast.demo import main as demo_main

        return demo_main()
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
