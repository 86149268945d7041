"""create_app refuses to start with settings it cannot honour."""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path

import pytest

from tests.helpers import FakeEngine, base_config
from whisper_flask import create_app
from whisper_flask.extension import get_service
from whisper_flask.settings import ConfigError, Settings, settings_table


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("MODEL", "enormous-v9", "WHISPER_FLASK_MODEL 'enormous-v9' is neither"),
        ("MODEL", "/nowhere/model.pt", "is neither a Whisper model name"),
        ("DEVICE", "tpu", "WHISPER_FLASK_DEVICE must be one of"),
        ("MAX_WORKERS", 0, "WHISPER_FLASK_MAX_WORKERS must be a positive integer"),
        ("MAX_QUEUED_JOBS", -5, "WHISPER_FLASK_MAX_QUEUED_JOBS must be a positive integer"),
        ("MAX_UPLOAD_MB", "big", "WHISPER_FLASK_MAX_UPLOAD_MB must be a positive integer"),
        ("KEEP_UPLOADS", "sometimes", "WHISPER_FLASK_KEEP_UPLOADS must be true or false"),
        ("QUANTIZE", "int4", "WHISPER_FLASK_QUANTIZE must be one of auto, none, int8"),
        ("BATCH_SIZE", 0, "WHISPER_FLASK_BATCH_SIZE must be a positive integer"),
        ("BATCH_WAIT_MS", -1, "WHISPER_FLASK_BATCH_WAIT_MS must be a number .0 or more."),
        ("SKIP_NON_SPEECH_S", -1, "WHISPER_FLASK_SKIP_NON_SPEECH_S must be a number .0 or more."),
        ("AUTH", "maybe", "WHISPER_FLASK_AUTH must be on or off"),
        ("MAX_JOBS_PER_KEY", 0, "WHISPER_FLASK_MAX_JOBS_PER_KEY must be a positive integer"),
        ("DOWNLOAD_LINK_TTL_S", -1, "WHISPER_FLASK_DOWNLOAD_LINK_TTL_S must be a positive integer"),
        ("MAX_WAITING_REQUESTS", 0, "WHISPER_FLASK_MAX_WAITING_REQUESTS must be a positive integer"),
    ],
)
def test_invalid_settings_refuse_to_start(tmp_path: Path, setting: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_app({**base_config(tmp_path), setting: value}, engine=FakeEngine())


def test_unwritable_directory_refuses_to_start(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="WHISPER_FLASK_TRANSCRIPT_DIR .* is not a writable directory"):
        create_app({**base_config(tmp_path), "TRANSCRIPT_DIR": blocker / "sub"}, engine=FakeEngine())


def test_reasons_fit_on_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        create_app({**base_config(tmp_path), "MODEL": "nope"}, engine=FakeEngine())
    assert "\n" not in str(info.value)


def test_the_readme_lists_every_setting_as_declared() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert settings_table() in readme, "regenerate the README's table: python -m whisper_flask.settings"


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("AUTH", "off", False),
        ("AUTH", False, False),
        ("AUTH", "on", True),
        ("URL_ALLOW", "10.0.0.0/8, 127.0.0.1", (ip_network("10.0.0.0/8"), ip_network("127.0.0.1/32"))),
        ("URL_ALLOW", "", ()),
        ("BATCH_WAIT_MS", 0, 0),
    ],
)
def test_settings_take_the_forms_the_environment_gives(
    tmp_path: Path, setting: str, value: object, expected: object
) -> None:
    settings = Settings.load({**base_config(tmp_path), setting: value})
    assert getattr(settings, setting) == expected


def test_relative_directories_become_absolute_and_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.load({**base_config(tmp_path), "UPLOAD_DIR": "audio/in"})
    assert settings.UPLOAD_DIR == tmp_path / "audio" / "in" and settings.UPLOAD_DIR.is_dir()


def test_environment_text_is_read_as_each_setting_declares_it_so_a_password_keeps_its_characters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, text in {"SMTP_PASSWORD": "1.50", "SMTP_USER": "true", "SMTP_FROM": "null", "MAX_WORKERS": "3",
                       "AUTH": "off", "KEEP_UPLOADS": "yes", "BATCH_WAIT_MS": "12.5"}.items():  # fmt: skip
        monkeypatch.setenv(f"WHISPER_FLASK_{name}", text)
    app = create_app(base_config(tmp_path), engine=FakeEngine())
    settings = get_service(app).settings
    assert (settings.SMTP_PASSWORD, settings.SMTP_USER, settings.SMTP_FROM) == ("1.50", "true", "null")
    assert (settings.MAX_WORKERS, settings.AUTH, settings.KEEP_UPLOADS, settings.BATCH_WAIT_MS) == (
        3,
        False,
        True,
        12.5,
    )
