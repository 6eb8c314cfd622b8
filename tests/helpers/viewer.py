"""A real viewer in a real browser for tests: OHIF (npm `@ohif/app`, served by devtools/ohif_server.py in
front of Orthanc's DICOMweb) in Debian's chromium, headless, driven by Playwright for Python.

Nothing downloads a browser: Playwright is pointed at /usr/bin/chromium (never `playwright install`).
Every missing piece (chromium, the OHIF build, Playwright) fails the test with what to install.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devtools.ohif_server import OHIF_DIST, OhifServer
from devtools.ports import free_port
from tests.conftest import require_tool

# Headless chromium as root needs --no-sandbox; WebGL without a GPU needs SwiftShader through ANGLE; the
# rest keeps the browser from calling home (component updates, sync, background networking).
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
# OHIF's first-run tour overlay swallows clicks; marking it shown before the app starts skips it.
SKIP_TOUR = "window.localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"
SCREENSHOT_DIR_ENV = "VIEWER_SCREENSHOT_DIR"  # set (e.g. docs/images) to keep a copy of the screenshots
TIMEOUT_MS = 90_000  # the first WebGL render on SwiftShader on a busy 2-core box takes seconds


def ohif_server(orthanc_url: str, log_path: Path) -> OhifServer:
    """The OHIF viewer in front of Orthanc; fails when the OHIF build is missing."""
    if not (OHIF_DIST / "index.html").is_file():
        pytest.fail(f"no OHIF build at {OHIF_DIST}: run scripts/fetch-ohif.sh (part of `make setup`)")
    return OhifServer(orthanc_url, free_port(), log_path=log_path).start()


class Browser:
    """Debian's chromium under Playwright with a fresh profile; each test drives its own tab (`open_tab`):
    OHIF keeps per-tab session state, and a tab that opened one eye's SR drew no measurements for the
    other eye's SR after a reload (seen with 3.13.2)."""

    def __init__(self, profile_dir: Path) -> None:
        executable = require_tool("chromium")
        from playwright.sync_api import sync_playwright  # the [test] extra; ImportError fails the test

        self._playwright = sync_playwright().start()
        self.context = self._playwright.chromium.launch_persistent_context(
            str(profile_dir),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1600, "height": 1000},
        )
        self.context.set_default_timeout(TIMEOUT_MS)
        self.context.add_init_script(SKIP_TOUR)
        self.console: list[str] = []
        self.page = None

    def open_tab(self):
        """A new tab, which `screenshot` then captures; its console messages go to `console`."""
        self.page = self.context.new_page()
        self.page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}"))
        self.page.on("pageerror", lambda err: self.console.append(f"pageerror: {err}"))
        return self.page

    def close(self) -> None:
        self.context.close()
        self._playwright.stop()

    def screenshot(self, path: Path) -> Path:
        """Save the whole tab to `path`, and a copy under $VIEWER_SCREENSHOT_DIR when it is set."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        keep = os.environ.get(SCREENSHOT_DIR_ENV)
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(keep) / path.name)
        return path


def pixels(png: bytes) -> np.ndarray:
    """An element screenshot as an RGB array."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def screen_text(png: bytes, work_dir: Path) -> str:
    """What a reader sees in a screenshot, by OCR (Debian tesseract), whitespace collapsed to single spaces.

    The image is made grey and doubled first: the viewer's 100 % zoom gives ~12 px glyphs, which tesseract
    reads reliably only when enlarged.
    """
    image = Image.open(io.BytesIO(png)).convert("L")
    image = image.resize((image.width * 2, image.height * 2), Image.LANCZOS)
    path = work_dir / "ocr-input.png"
    image.save(path)
    result = subprocess.run([require_tool("tesseract"), str(path), "-"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())
