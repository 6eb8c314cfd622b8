"""`grok-pacs report FILE.dcm`: print an SR as indented text, then the study's PDF report beside it (path
and text); or an Encapsulated PDF's text (grok_pacs.report.render does the work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grok_pacs.cli.main import EXIT_OK, EXIT_USAGE


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register `grok-pacs report`."""
    parser = subparsers.add_parser(
        "report",
        help="print a DICOM SR (e.g. one grok-pacs wrote under <data>/sr/) and the PDF report as text",
        description="Print the header and the content tree of a DICOM Structured Report as indented text, "
        "then the path and text of the study's PDF report when it lies beside the SR (grok-pacs writes both "
        "under <data>/sr/<study>/). Given an Encapsulated PDF, print its header and text.",
    )
    parser.add_argument("file", type=Path, help="the SR (or Encapsulated PDF) file (.dcm)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grok_pacs.report.render import render

    try:
        sys.stdout.write(render(args.file))
    except ValueError as exc:
        print(f"grok-pacs report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
