"""`grok-pacs report FILE.dcm`: print an SR as indented text (grok_pacs.report.render does the work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grok_pacs.cli.main import EXIT_OK, EXIT_USAGE


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register `grok-pacs report`."""
    parser = subparsers.add_parser(
        "report", help="print a DICOM SR (e.g. one grok-pacs wrote under <data>/sr/) as readable text",
        description="Print the header and the content tree of a DICOM Structured Report as indented text.",
    )
    parser.add_argument("file", type=Path, help="the SR file (.dcm)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grok_pacs.report.render import render

    try:
        sys.stdout.write(render(args.file))
    except ValueError as exc:
        print(f"grok-pacs report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
