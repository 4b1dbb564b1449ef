"""``python -m bezoar.generate``: synthetic data and bulk LLM calls through the client pool.

Subcommands come from the modules in COMMAND_MODULES, each exposing ``add_command(subparsers)``
that registers its parser with ``func(args) -> exit code``. A listed module that does not exist
(yet) is skipped, so a new scheme is added by writing its module, not by editing this file.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from bezoar.generate.request import GenerateError

COMMAND_MODULES = (
    "bezoar.generate.cli",  # requests
    "bezoar.generate.lamini",
    "bezoar.generate.evol",
    "bezoar.generate.orca",
    "bezoar.generate.judge",  # filter
)
HTTP_CLIENT_LOGGERS = ("httpx", "httpx2")  # the SDKs' HTTP client, under its upstream and its fork's name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bezoar.generate",
                                     description="Generate data with LLMs through the bezoar client pool.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every retry")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        module = importlib.import_module(name)
        if hasattr(module, "add_command"):
            module.add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s",
                        stream=sys.stderr)
    if not args.verbose:
        # The HTTP client under the openai and anthropic SDKs logs every request at INFO: a line
        # per call would bury the progress line and the warnings.
        for name in HTTP_CLIENT_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    from bezoar.signals import terminate_as_interrupt

    try:
        with terminate_as_interrupt():  # a SIGTERM stores the answers in flight, as Ctrl-C does
            return int(args.func(args) or 0)
    except GenerateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
