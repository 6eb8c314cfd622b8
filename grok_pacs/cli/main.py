"""`grok-pacs`: the command line. Subcommands come from the modules in `COMMAND_MODULES`.

To add commands, write a module in `grok_pacs/cli/` (runtime modules never import the CLI) with

    def register(subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser("worker", help="...", description="...")
        parser.set_defaults(func=run_worker)      # run_worker(args) -> int exit status

and append its name to `COMMAND_MODULES`. Modules are imported when the CLI starts, so keep heavy
imports (torch, onnxruntime, celery) inside the command functions; shared options are in `options`.
`settings_from_args(args)` loads Settings
from `--config`, the environment and any `args.overrides`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from grok_pacs.config import Settings, SettingsError, load_settings
from grok_pacs.ops.logs import configure_logging
from grok_pacs.store.db import DatabaseError

#: Modules that contribute subcommands, in help order. Each defines `register(subparsers)`.
COMMAND_MODULES: list[str] = [
    "grok_pacs.cli.ingest",  # listen, echo, send, studies
    "grok_pacs.cli.jobs",  # serve (listener + embedded worker, one box), worker (one per GPU)
    "grok_pacs.cli.report",  # report FILE.dcm
    "grok_pacs.cli.database",  # db upgrade, db current
    "grok_pacs.cli.retention",  # purge [--dry-run]
    "grok_pacs.cli.withdraw",  # withdraw STUDY_UID --reason quality|safety
    "grok_pacs.cli.review",  # review (the clinicians' page), reviewer add
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # bad arguments or invalid settings


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Settings from --config, GROK_PACS_* and explicit overrides (None values are ignored)."""
    return load_settings(getattr(args, "config", None), **overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grok-pacs",
        description="GROK ophthalmic AI for PACS: receives colour fundus photographs and OCT by DICOM "
        "C-STORE, analyses each study, and returns a DICOM Structured Report. Settings come from "
        "--config (TOML) and GROK_PACS_* environment variables (see grok_pacs/config.py).",
    )
    parser.add_argument(
        "--config",
        type=_path,
        default=None,
        metavar="FILE",
        help="TOML settings file (default: $GROK_PACS_CONFIG if set)",
    )
    parser.add_argument(
        "--log-level", default="INFO", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (default INFO)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _path(text: str):
    from pathlib import Path

    return Path(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_logging(args.log_level)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return int(args.func(args) or EXIT_OK)
    except SettingsError as exc:
        print(f"grok-pacs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DatabaseError as exc:  # down or unreachable at start: say so in one line (the URL may hold a password)
        print(f"grok-pacs: database_url: {type(exc).__name__}: {str(exc.args[0]).strip()}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
