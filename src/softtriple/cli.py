"""The ``softtriple`` command line."""

from __future__ import annotations

import argparse
import sys

from softtriple import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softtriple",
        description="Deep metric learning with the SoftTriple loss (Qian et al., ICCV 2019).")
    parser.add_argument("--version", action="version", version=f"softtriple {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "demo", help="train a small embedding on scikit-learn digits and show retrieval gains",
        description="Train an MLP embedding with SoftTripleLoss on digits 0-4 and print "
                    "Recall@1/2/4/8, MAP@R and NMI on the unseen digits 5-9, before and after.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from softtriple import demo
        demo.main()
        return 0
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
