"""Settings: environment variables work, invalid values fail at start naming the setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from grok_pacs.config import Peer, SettingsError, load_settings

ENV_NAMES = (
    "GROK_PACS_AE_TITLE",
    "GROK_PACS_PORT",
    "GROK_PACS_DATA_DIR",
    "GROK_PACS_ALLOWED_AES",
    "GROK_PACS_BROKER_URL",
    "GROK_PACS_DESTINATION",
    "GROK_PACS_BUNDLE",
    "GROK_PACS_CONFIG",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GROK_PACS_AE_TITLE", "EYE_AI")
    monkeypatch.setenv("GROK_PACS_PORT", "11200")
    monkeypatch.setenv("GROK_PACS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GROK_PACS_ALLOWED_AES", "PACS1, PACS2 ,MODALITY")
    monkeypatch.setenv("GROK_PACS_BROKER_URL", "redis://127.0.0.1:6390/0")
    monkeypatch.setenv("GROK_PACS_DESTINATION", "ARCHIVE@pacs.example:104")
    monkeypatch.setenv("GROK_PACS_BUNDLE", str(tmp_path / "bundle"))
    settings = load_settings()
    assert settings.ae_title == "EYE_AI"
    assert settings.port == 11200
    assert settings.data_dir == tmp_path / "data"
    assert settings.allowed_aes == ["PACS1", "PACS2", "MODALITY"]
    assert settings.resolved_broker_url == "redis://127.0.0.1:6390/0"
    assert settings.destination == Peer(ae_title="ARCHIVE", host="pacs.example", port=104)
    assert settings.bundle == tmp_path / "bundle"


def test_default_broker_is_embedded_sqlite_in_data_dir(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    assert settings.resolved_broker_url == f"sqla+sqlite:///{(tmp_path / 'broker.sqlite').resolve()}"


@pytest.mark.parametrize(
    ("name", "value", "setting"),
    [
        ("GROK_PACS_PORT", "70000", "port"),
        ("GROK_PACS_PORT", "eleven", "port"),
        ("GROK_PACS_AE_TITLE", "A_TITLE_LONGER_THAN_16", "ae_title"),
        ("GROK_PACS_ALLOWED_AES", "GOOD,BAD\\AE", "allowed_aes"),
        ("GROK_PACS_DESTINATION", "no-port-here", "destination"),
    ],
)
def test_invalid_value_names_the_setting(monkeypatch: pytest.MonkeyPatch, name: str, value: str, setting: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=setting):
        load_settings()


def test_toml_file_is_read_and_environment_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "grok.toml"
    config.write_text('ae_title = "FROM_FILE"\nport = 11300\nquiet_period = 2.5\n')
    monkeypatch.setenv("GROK_PACS_PORT", "11301")
    settings = load_settings(config)
    assert (settings.ae_title, settings.port, settings.quiet_period) == ("FROM_FILE", 11301, 2.5)


def test_missing_config_file_and_unknown_key_fail(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "absent.toml")
    config = tmp_path / "typo.toml"
    config.write_text("quiet_perod = 3\n")
    with pytest.raises(SettingsError, match="quiet_perod"):
        load_settings(config)


def test_cli_start_fails_with_message_naming_setting(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "GROK_PACS_PORT": "0", "GROK_PACS_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "grok_pacs.cli", "listen"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 2
    assert "port" in done.stderr and "invalid settings" in done.stderr
    assert not (tmp_path / "incoming").exists()
