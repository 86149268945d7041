"""Logging to stderr and a rotating file that several processes may share."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from concurrent_log_handler import ConcurrentRotatingFileHandler

from whisper_flask.files import FILE_MODE

_FORMAT = "%(asctime)s %(levelname)s [%(process)d:%(threadName)s] %(name)s: %(message)s"


def escape(value: Any) -> Any:
    """Text with every non-printable character (CR, LF, ESC, NUL, bidi controls...) as a visible escape."""
    text = str(value)
    if text.isprintable():
        return value
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


class EscapeArguments(logging.Filter):
    """Escapes a record's arguments: file names, addresses and ffmpeg's messages come from clients.

    The format strings are the service's own, so a deliberate line break there (the first key's
    banner) stays; no client text can start a forged line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's arguments in place; never drops a record."""
        if isinstance(record.args, tuple):
            record.args = tuple(arg if isinstance(arg, int | float) else escape(arg) for arg in record.args)
        return True


def configure_logging(log_dir: Path, logger_name: str) -> None:
    """Send the package's records to stderr and LOG_DIR/whisper_flask.log (10 MB x 5)."""
    logger = logging.getLogger(logger_name)
    for handler in [h for h in logger.handlers if getattr(h, "_whisper_flask", False)]:
        # A second create_app in one process (tests) replaces the handlers instead of doubling them.
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(_FORMAT)
    handlers: list[logging.Handler] = [
        logging.StreamHandler(sys.stderr),
        # chmod: the log (and its lock and rotated files) are made 0600 whatever the umask; the
        # first start's admin key is written here.
        ConcurrentRotatingFileHandler(
            str(log_dir / "whisper_flask.log"), maxBytes=10 * 1024 * 1024, backupCount=5, chmod=FILE_MODE
        ),
    ]
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(EscapeArguments())
        handler._whisper_flask = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
