"""The systemd units pass `systemd-analyze verify` (against an alternate root) and are hardened."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.conftest import require_tool
from tests.helpers.deploy_files import UNITS, VENV_BIN


def _systemd_root(tmp_path: Path) -> Path:
    """An alternate root with the system units, the grok-pacs units and an executable at ExecStart."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(unit, unit_dir / unit.name)
        exec_start = re.search(r"^ExecStart=(\S+)", unit.read_text(), re.M)[1]
        target = root / exec_start.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(VENV_BIN / "grok-pacs", target)  # the real entry point, where the units expect it
    return root


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze")
    root = _systemd_root(tmp_path)
    units = [f"/etc/systemd/system/{unit.name}" for unit in UNITS]
    result = subprocess.run(
        [tool, "verify", "--man=no", f"--root={root}", *units], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys and unparsable values but prints them: any output is a failure.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_systemd_verify_reports_a_misspelt_directive(tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze")
    root = _systemd_root(tmp_path)
    unit = root / "etc/systemd/system/grok-pacs-listener.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    result = subprocess.run(
        [tool, "verify", "--man=no", f"--root={root}", "/etc/systemd/system/" + unit.name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ProtectSytem" in result.stderr


def test_systemd_units_are_hardened(tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze")
    root = _systemd_root(tmp_path)
    for unit in UNITS:
        text = unit.read_text()
        for directive in (
            "User=grok-pacs",
            "ProtectSystem=strict",
            "ReadWritePaths=/var/lib/grok-pacs",
            "Restart=on-failure",
            "NoNewPrivileges=yes",
            "ProtectHome=yes",
        ):
            assert re.search(rf"^{re.escape(directive)}$", text, re.M), f"{unit.name}: no {directive}"
        result = subprocess.run(
            [tool, "security", "--offline=yes", f"--root={root}", f"/etc/systemd/system/{unit.name}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        level = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout + result.stderr)
        assert level, result.stdout + result.stderr
        assert float(level[1]) <= 3.0, f"{unit.name}: exposure {level[1]} (0 safe .. 10 unsafe)"
