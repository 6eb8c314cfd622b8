"""Argument blocks shared by several commands, written once: where a process listens and keeps its data."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_data_dir(parser: argparse.ArgumentParser, help_text: str = "data directory") -> None:
    parser.add_argument(
        "--data-dir", type=Path, default=None, help=f"{help_text} (overrides GROK_PACS_DATA_DIR / data_dir)"
    )


def add_listener_options(parser: argparse.ArgumentParser) -> None:
    """--port, --ae-title, --bind and --data-dir: what `listen` and `serve` accept."""
    parser.add_argument("--port", type=int, default=None, help="DICOM port (overrides GROK_PACS_PORT)")
    parser.add_argument("--ae-title", default=None, help="our AE title (overrides GROK_PACS_AE_TITLE)")
    parser.add_argument("--bind", default=None, help="bind address (overrides GROK_PACS_BIND_ADDRESS)")
    add_data_dir(parser)


def listener_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The Settings overrides given by `add_listener_options` (None: not given, keep the configured value)."""
    return {"port": args.port, "ae_title": args.ae_title, "bind_address": args.bind, "data_dir": args.data_dir}
