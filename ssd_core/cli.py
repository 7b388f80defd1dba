"""The `ssd` command. Each sub-command lives in `ssd_core/commands/<name>.py`, which defines
`register(subparsers)`; heavy imports happen inside the handlers so `ssd --help` is instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Sub-command modules, in the order `ssd --help` lists them.
COMMAND_MODULES = [
    "ssd_core.commands.data",
    "ssd_core.commands.train",
    "ssd_core.commands.eval",
    "ssd_core.commands.predict",
    "ssd_core.commands.export",
    "ssd_core.commands.quantize",
    "ssd_core.commands.detect",
    "ssd_core.commands.query",
    "ssd_core.commands.compact",
    "ssd_core.commands.bench",
    "ssd_core.commands.weights",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssd", description="SSD object detection pipeline")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # sub-command not built yet
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        # User errors: one clear line, no traceback (use -v to see it).
        if args.verbose:
            raise
        print(f"ssd {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
