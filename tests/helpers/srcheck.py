"""Checks every SR the project writes must pass: dciodvfy (no Error line) and DCMTK dsr2html rendering."""

from __future__ import annotations

import html
import re
import subprocess
from pathlib import Path

from tests.conftest import require_tool


def dciodvfy_errors(path: Path) -> list[str]:
    """The Error lines dicom3tools' dciodvfy prints for `path` (empty list = valid)."""
    tool = require_tool("dciodvfy")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def dsr2html_text(path: Path) -> str:
    """DCMTK's HTML rendering of the SR, reduced to whitespace-normalised plain text."""
    tool = require_tool("dsr2html")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"dsr2html failed on {path}: {proc.stderr}"
    text = html.unescape(re.sub(r"<[^>]+>", " ", proc.stdout))
    return re.sub(r"\s+", " ", text)


def assert_valid_sr(path: Path, *expected_texts: str) -> str:
    """dciodvfy reports no Error and dsr2html renders every expected text; returns the rendering."""
    errors = dciodvfy_errors(path)
    assert errors == [], f"dciodvfy errors in {path}: {errors}"
    rendered = dsr2html_text(path)
    for text in expected_texts:
        assert re.sub(r"\s+", " ", text.strip()) in rendered, f"dsr2html of {path} lacks {text!r}"
    return rendered


def sr_eye(ds) -> str:
    """ "R" or "L": the laterality of the SR's finding site (what a reader sees as "Laterality: Right")."""
    found = set()

    def walk(items):
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if name and name[0].CodeValue == "272741003" and item.get("ConceptCodeSequence"):
                found.add({"24028007": "R", "7771000": "L"}.get(item.ConceptCodeSequence[0].CodeValue, "?"))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    assert len(found) == 1, f"SR {ds.SOPInstanceUID}: finding site lateralities {found}"
    return found.pop()


def pdf_text(document: bytes) -> str:
    """The text of a PDF as a reader would copy it (pypdf extraction), whitespace normalised."""
    import io

    import pypdf

    reader = pypdf.PdfReader(io.BytesIO(bytes(document)))
    return re.sub(r"\s+", " ", " ".join(page.extract_text() for page in reader.pages))
