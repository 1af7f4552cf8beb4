"""The ``devmodel`` command line.

Each subcommand lives in its own module under :mod:`devmodel.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable taking
the parsed arguments and returning an exit code. Keeping them apart lets each layer own
its commands without touching a shared file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

import devmodel.commands


def build_parser() -> argparse.ArgumentParser:
    """Collect every command module's parser into one ``devmodel`` parser."""
    parser = argparse.ArgumentParser(
        prog="devmodel",
        description="IOMMU fault-path workbench: vfio-user device model, emulated SMMUv3, "
        "simulated iommufd, guest vIOMMU.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (repeat for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(devmodel.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"devmodel.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m devmodel``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
