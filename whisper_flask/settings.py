"""Every setting a deployment may change, declared once: type, default, bounds and one line of doc.

`Settings.from_environment` reads each WHISPER_FLASK_<NAME> variable's text (then test_config's typed
values), checks each against its declaration and returns one frozen Settings; a bad value stops the
start with a one-line ConfigError. The README's configuration table is `settings_table()` (a test keeps
the two equal). A frozen dataclass, not pydantic-settings: the checks are few, and nothing else in the
service needs pydantic.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import whisper

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
PREFIX = "WHISPER_FLASK_"


class ConfigError(ValueError):
    """A setting that the service cannot start with; the message names it."""


def _model(name: str, value: Any) -> str:
    model = str(value)
    if model in whisper.available_models():
        return model
    path = Path(model).expanduser()
    if path.suffix != ".pt" or not path.is_file():
        raise ConfigError(
            f"{PREFIX}MODEL {model!r} is neither a Whisper model name "
            f"({', '.join(whisper.available_models())}) nor an existing .pt checkpoint"
        )
    return str(path.resolve())


def parse_networks(items: Iterable[Any]) -> tuple[IPNetwork, ...]:
    """Networks from their text (a bare address is a network of one); ValueError names a bad one."""
    return tuple(ipaddress.ip_network(str(item).strip(), strict=False) for item in items if str(item).strip())


def _networks(name: str, value: Any) -> tuple[IPNetwork, ...]:
    try:
        return parse_networks(value.split(",") if isinstance(value, str) else value)
    except (ValueError, TypeError):
        raise ConfigError(f"{PREFIX}URL_ALLOW must list IP networks or addresses, got {value!r}") from None


def _public_url(name: str, value: Any) -> str:
    text = str(value).strip()
    if not text:
        return ""
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError on a port that is not a number
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # a bad port or IPv6 literal
        valid = False
    # Links are this text plus a path and a signed query: a user, a query or a fragment would break them.
    if not valid or "@" in text or "?" in text or "#" in text or any(not c.isprintable() or c.isspace() for c in text):
        raise ConfigError(
            f"{PREFIX}PUBLIC_URL must be an absolute http(s) URL without user, query or fragment"
            f" (https://speech.example.org), got {value!r}"
        )
    return text.rstrip("/")


def _service_url(schemes: tuple[str, ...]) -> Callable[[str, Any], str]:
    """A parser of a database or broker URL of one of `schemes`; its error never repeats the URL (a password)."""

    def parse(name: str, value: Any) -> str:
        text = str(value).strip()
        if not text:
            return ""
        try:
            parts = urlsplit(text)
            _ = parts.port
            valid = parts.scheme in schemes
        except ValueError:
            valid = False
        if not valid:
            raise ConfigError(f"{PREFIX}{name} must be a URL starting {' or '.join(s + '://' for s in schemes)}")
        return text

    return parse


def _flag(value: Any) -> bool:
    """A switch as a bool, or as the text an environment variable holds; ValueError otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(value)


def _on_off(name: str, value: Any) -> bool:
    # "on"/"off" as the README writes them; true/false too, as the other switches take them.
    if isinstance(value, str) and value.strip().lower() in ("on", "off"):
        return value.strip().lower() == "on"
    try:
        return _flag(value)
    except ValueError:
        raise ConfigError(f"{PREFIX}{name} must be on or off, got {value!r}") from None


def _setting(
    default: Any,
    doc: str,
    *,
    low: float = 0,
    above: bool = False,
    choices: tuple[str, ...] = (),
    shown: str = "",
    parse: Callable[[str, Any], Any] | None = None,
) -> Any:
    """A field of Settings: its default, README line, lowest number (or above it), allowed words or own parser."""
    meta = {"doc": doc, "low": low, "above": above, "choices": choices, "shown": shown, "parse": parse}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """The service's settings, validated; WHISPER_FLASK_<NAME> overrides each (README, "Configuration")."""

    MODEL: str = _setting(
        "base", "Whisper model name (`tiny`, `tiny.en`, `base`, ...) or a path to a `.pt` checkpoint", parse=_model
    )
    MODEL_DIR: Path = _setting(Path("~/.cache/whisper"), "where checkpoints are kept")
    MODEL_DOWNLOAD: bool = _setting(True, "try OpenAI's CDN before the offline packs")
    DEVICE: str = _setting("auto", "`cpu`, `cuda` or `auto`", choices=("auto", "cpu", "cuda"))
    UPLOAD_DIR: Path = _setting(Path("uploads"), "uploaded audio (relative paths are from the working directory)")
    TRANSCRIPT_DIR: Path = _setting(Path("transcriptions"), "transcripts and the job database `jobs.sqlite3`")
    MAX_WORKERS: int = _setting(
        2,
        "jobs transcribing at once; their windows are decoded together, so raise it (up to `BATCH_SIZE`) for"
        " throughput if memory allows (a job holds its spectrogram: a 2-hour file measured about 300 MB, see"
        " Performance)",
        low=1,
    )
    BATCH_SIZE: int = _setting(8, "most windows in one decoder step; more wait, in order, for a place", low=1)
    BATCH_WAIT_MS: float = _setting(
        50,
        "longest a decoder step waits for a window's next tokens (they come within a millisecond unless its"
        " thread stalls)",
        low=0,
    )
    SKIP_NON_SPEECH_S: float = _setting(
        30,
        "stretches at least this long in which Silero VAD hears no speech are not transcribed (faster, and Whisper"
        " writes no text into them); `0` transcribes everything",
        low=0,
    )
    QUANTIZE: str = _setting(
        "auto",
        "`int8`: int8 Linear layers on the CPU (faster, see Performance); `bf16`: a bf16 encoder (oneDNN) and an fp32"
        " decoder on the CPU; `fp16`: an fp32 encoder and a decoder whose weights stay in fp16, as Whisper's"
        " checkpoints store them (fbgemm: the same results as fp32, half the bytes read); `none`: Whisper's fp32"
        " (fp16 on CUDA); `auto`: the encoder and the decoder each take the fastest of these measured on this CPU at"
        " the first start, file jobs' encoder also of fbgemm's int8 with one scale a window (`int8-fbgemm`, `auto`"
        " only; live sessions lose words with it, so where it is chosen they run an fp32 copy of the encoder);"
        " int8 and bf16 only for `base`, where"
        " their accuracy was measured; bf16 only where the CPU has oneDNN's bf16 kernels, AVX512-BW/VL/DQ or"
        " AVX-NE-CONVERT; kept in MODEL_DIR/arithmetic.json",
        choices=("auto", "none", "int8", "bf16", "fp16"),
    )
    MAX_QUEUED_JOBS: int = _setting(100, "pending + running; beyond it uploads get 503 with `Retry-After`", low=1)
    MAX_UPLOAD_MB: int = _setting(1024, "larger bodies get 413", low=1)
    BODY_TIMEOUT_S: float = _setting(
        60,
        "a request body must arrive within this, plus 1 s per 16 KiB received; slower ones get 408"
        " `body_timeout` and the connection closes",
        low=0,
        above=True,
    )
    MAX_AUDIO_HOURS: float = _setting(
        12, "longer audio is refused when probed (400 `audio_too_long`)", low=0, above=True
    )
    MAX_DETECTIONS: int = _setting(
        2, "`POST /detect-language` requests at once; more get 503 `busy` with `Retry-After`", low=1
    )
    MAX_WAITING_REQUESTS: int = _setting(
        8,
        "`/v1/audio` requests waiting for their jobs at once (each holds an HTTP thread: keep it below"
        " `WHISPER_FLASK_HTTP_THREADS`); more get 503 `busy`",
        low=1,
    )
    MAX_LIVE_SESSIONS: int = _setting(
        4,
        "live sessions (`/ws/transcribe`, `/v1/realtime`) at once; each holds an HTTP thread (keep it and"
        " `MAX_WAITING_REQUESTS` below `WHISPER_FLASK_HTTP_THREADS`); more are refused with 503 `busy`",
        low=1,
    )
    LIVE_IDLE_S: float = _setting(
        30, "a live session that sends nothing for this long is closed (`idle`)", low=0, above=True
    )
    LOG_DIR: Path = _setting(Path("logs"), "rotating log `whisper_flask.log` (also on stderr)")
    KEEP_UPLOADS: bool = _setting(False, "keep the audio after its job ends")
    RETENTION_DAYS: float = _setting(
        7, "transcripts and records are deleted this long after the job ended", low=0, above=True
    )
    EXPIRED_KEEP_DAYS: float = _setting(30, "an expired id answers 410 this long, then 404", low=0, above=True)
    SWEEP_INTERVAL_S: float = _setting(600, "how often the retention sweep runs", low=0, above=True)
    AUTH: bool = _setting(
        True,
        "`off` serves the API without keys (closed networks only; warned at every start)",
        shown="`on`",
        parse=_on_off,
    )
    MAX_JOBS_PER_KEY: int = _setting(
        20, "pending + running jobs one key may have; beyond it 429 with `Retry-After`", low=1
    )
    AUTH_FAILURES_PER_MINUTE: int = _setting(10, "wrong keys one address may send per minute before it waits", low=1)
    DOWNLOAD_LINK_TTL_S: int = _setting(86400, "how long a signed download link stays valid", low=1)
    PROXY_FIX: int = _setting(
        0,
        "reverse proxies in front whose `X-Forwarded-*` headers to trust (the systemd unit sets 1 for nginx);"
        " leave 0 unless gunicorn is reachable only through them",
        low=0,
    )
    URL_ALLOW: tuple[IPNetwork, ...] = _setting(
        (),
        "networks URL intake and webhooks may reach although not public, e.g. `10.0.0.0/8,127.0.0.1`",
        shown="(empty)",
        parse=_networks,
    )
    URL_FETCH_TIMEOUT_S: float = _setting(600, "longest download of a job's URL", low=0, above=True)
    PUBLIC_URL: str = _setting(
        "",
        "how clients reach the service (`https://speech.example.org`, a sub-path allowed): the start of links in"
        " webhooks and e-mails; empty: `callback_url` and `email` are refused",
        shown="(empty)",
        parse=_public_url,
    )
    SMTP_HOST: str = _setting("", "the mail server for `email` notifications; without it an `email` field is refused",
                              shown="(empty)")  # fmt: skip
    SMTP_PORT: int = _setting(587, "the mail server's port", low=1)
    SMTP_SECURITY: str = _setting("starttls", "`starttls`, `tls` or `none`", choices=("starttls", "tls", "none"))
    SMTP_USER: str = _setting("", "the mail server's user name", shown="(empty)")
    SMTP_PASSWORD: str = _setting("", "the mail server's password (set it in the environment)", shown="(empty)")
    SMTP_FROM: str = _setting("whisper-flask@localhost", "the sender of notification e-mails")
    NOTIFY_RETRY_BASE_S: float = _setting(
        30, "first wait after a failed webhook or e-mail; it doubles up to an hour", low=0, above=True
    )
    NOTIFY_MAX_ATTEMPTS: int = _setting(12, "attempts before a notification is given up (`failed`)", low=1)
    NOTIFY_PER_KEY_PER_HOUR: int = _setting(
        60,
        "webhooks and e-mails one key may ask for in any hour (counted as its jobs are accepted); beyond it 429"
        " `too_many_notifications` with `Retry-After`",
        low=1,
    )
    NOTIFY_CONCURRENCY: int = _setting(
        4, "webhooks and e-mails sent at once, at most one per key at a time, keys served in turn", low=1
    )

    DATABASE_URL: str = _setting(
        "",
        "`postgresql://user:password@host/db`: jobs, keys and the notification outbox on PostgreSQL (cluster mode,"
        " see Cluster); empty: SQLite in TRANSCRIPT_DIR",
        shown="(empty)",
        parse=_service_url(("postgresql", "postgres")),
    )
    BROKER_URL: str = _setting(
        "",
        "`redis://host:6379/0`: this process is an API node that stores and enqueues jobs for Celery workers and loads"
        " no model (needs DATABASE_URL); empty: jobs run in this process",
        shown="(empty)",
        parse=_service_url(("redis", "rediss", "amqp", "amqps")),
    )
    LEASE_S: float = _setting(
        30,
        "cluster mode: a worker renews its jobs' leases every third of this; a job whose lease ran out (its worker"
        " died) runs again on another worker",
        low=1,
    )

    @property
    def max_upload_bytes(self) -> int:
        """MAX_UPLOAD_MB in bytes (Flask's MAX_CONTENT_LENGTH)."""
        return self.MAX_UPLOAD_MB * 1024 * 1024

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], overrides: Mapping[str, Any]) -> Settings:
        """The WHISPER_FLASK_<NAME> variables' text, then `overrides` (test_config), over the defaults; checked."""
        # The text as written, not JSON-parsed as Flask's from_prefixed_env would: a password "1.50"
        # stays "1.50", and each setting reads its own type from the text.
        given = {
            spec.name: environ[PREFIX + spec.name] for spec in dataclasses.fields(cls) if PREFIX + spec.name in environ
        }
        return cls.load({**given, **overrides})

    @classmethod
    def load(cls, config: Mapping[str, Any]) -> Settings:
        """The settings in `config` (names without the prefix; missing ones take their defaults), checked."""
        values = {}
        for spec in dataclasses.fields(cls):
            value = config.get(spec.name, spec.default)
            values[spec.name] = _check(spec, value)
        if values["BROKER_URL"] and not values["DATABASE_URL"]:
            raise ConfigError(f"{PREFIX}BROKER_URL needs {PREFIX}DATABASE_URL: the API nodes and workers share it")
        return cls(**values)

    def to_config(self) -> dict[str, Any]:
        """The settings as Flask config keys (plus MAX_CONTENT_LENGTH, which Flask itself enforces)."""
        return {**{spec.name: getattr(self, spec.name) for spec in dataclasses.fields(self)},
                "MAX_CONTENT_LENGTH": self.max_upload_bytes}  # fmt: skip


def _check(spec: dataclasses.Field[Any], value: Any) -> Any:
    """`value` as the setting `spec` declares it, or ConfigError naming the variable and the value.

    A value is the environment's text or test_config's typed value; either is taken.
    """
    name, kind, meta = spec.name, _TYPES[spec.name], spec.metadata
    if meta["parse"] is not None:
        return meta["parse"](name, value)
    if kind is bool:
        try:
            return _flag(value)
        except ValueError:
            raise ConfigError(f"{PREFIX}{name} must be true or false, got {value!r}") from None
    if kind is Path:
        return _writable_dir(name, value)
    if kind is int or kind is float:
        return _number(name, kind, value, meta["low"], meta["above"])
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{PREFIX}{name} must be one of {', '.join(meta['choices'])}, got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(f"{PREFIX}{name} must be text, got {value!r}")
    return value


def _number(name: str, kind: type, value: Any, low: float, above: bool) -> Any:
    if isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            pass  # refused below, with the text as given
    number = (
        isinstance(value, int | float) and not isinstance(value, bool) and (kind is float or isinstance(value, int))
    )
    if not number or value < low or (above and value == low):
        raise ConfigError(f"{PREFIX}{name} must be {_number_words(kind, low, above)}, got {value!r}")
    return value


def _number_words(kind: type, low: float, above: bool) -> str:
    if kind is int:
        return "a positive integer" if low >= 1 else "a whole number (0 or more)"
    return "a positive number" if above else "a number (0 or more)"


def _writable_dir(name: str, value: Any) -> Path:
    path = Path(str(value)).expanduser().resolve()
    try:
        # Made the service user's alone: file names are job ids, and a job id with a key opens a transcript.
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A probe write, because os.access ignores read-only mounts and ACLs.
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{PREFIX}{name} {str(path)!r} is not a writable directory: {exc.strerror}") from None
    return path


def settings_table() -> str:
    """The README's configuration table, one row per setting, from the declarations above."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for spec in dataclasses.fields(Settings):
        default = spec.metadata["shown"] or f"`{_shown(spec.default)}`"
        rows.append(f"| `{PREFIX}{spec.name}` | {default} | {spec.metadata['doc']} |")
    return "\n".join(rows) + "\n"


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


_TYPES: dict[str, Any] = typing.get_type_hints(Settings)

if __name__ == "__main__":
    sys.stdout.write(settings_table())
