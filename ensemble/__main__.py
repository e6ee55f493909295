"""``python -m ensemble`` (and the ``ensemble`` command)."""

from __future__ import annotations

import argparse
import logging
import sys

from ._demo import main as run_demo


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chosen command.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="ensemble", description="Ensemble: a realtime server on Trio in the actor model.")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("demo", help="run the embedded actor demo (the default)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.CRITICAL)
    if args.command in (None, "demo"):
        run_demo()


if __name__ == "__main__":
    main()
