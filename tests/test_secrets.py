"""Secrets and files at rest: the link secret, the modes of the service's files, the first key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import FakeEngine, base_config
from whisper_flask import create_app
from whisper_flask.extension import get_service
from whisper_flask.settings import ConfigError


@pytest.mark.parametrize("size", [0, 31, 33])
def test_a_link_secret_of_the_wrong_length_refuses_the_start(tmp_path: Path, size: int) -> None:
    secret = tmp_path / "transcripts" / "link-secret"
    secret.parent.mkdir()
    secret.write_bytes(b"k" * size)
    with pytest.raises(ConfigError, match=f"link-secret holds {size} bytes, not 32: delete it") as info:
        create_app(base_config(tmp_path), engine=FakeEngine())
    assert "\n" not in str(info.value) and "stops working" in str(info.value)


def test_a_link_secret_is_made_once_and_kept(tmp_path: Path) -> None:
    secrets = []
    for _ in range(2):
        get_service(create_app(base_config(tmp_path), engine=FakeEngine())).stop()
        secrets.append((tmp_path / "transcripts" / "link-secret").read_bytes())
    assert len(secrets[0]) == 32 and secrets[0] == secrets[1]
