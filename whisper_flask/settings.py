"""Configuration defaults and start-up validation (ARCHITECTURE.md, "Configuration")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import whisper

from whisper_flask.audio.fetch import parse_networks

#: Every setting a deployment may change; WHISPER_FLASK_<NAME> overrides each one.
DEFAULTS: dict[str, Any] = {
    "MODEL": "base",
    "MODEL_DIR": "~/.cache/whisper",
    "MODEL_DOWNLOAD": True,
    "DEVICE": "auto",
    "UPLOAD_DIR": "uploads",
    "TRANSCRIPT_DIR": "transcriptions",
    "MAX_WORKERS": 2,
    "MAX_QUEUED_JOBS": 100,
    "MAX_UPLOAD_MB": 1024,
    "LOG_DIR": "logs",
    "KEEP_UPLOADS": False,
    # Number of reverse proxies in front (nginx: 1) whose X-Forwarded-* headers to trust.
    # Leave 0 unless gunicorn is reachable only through them.
    "PROXY_FIX": 0,
    # A finished job's files and record are deleted RETENTION_DAYS after it ended; its id
    # then answers 410 for EXPIRED_KEEP_DAYS more, then 404. The sweep runs every SWEEP_INTERVAL_S.
    "RETENTION_DAYS": 7,
    "EXPIRED_KEEP_DAYS": 30,
    "SWEEP_INTERVAL_S": 600,
    # Windows of concurrent jobs decode together, up to BATCH_SIZE per decoder step; a step waits
    # at most BATCH_WAIT_MS for a decoding window's next tokens. Only with MAX_WORKERS > 1.
    "BATCH_SIZE": 8,
    "BATCH_WAIT_MS": 50,
    # "int8": int8 weights and activations in Linear layers (CPU only); "none": Whisper's fp32;
    # "auto": int8 on the CPU for the models measured as accurate with it (quantize.INT8_MODELS).
    "QUANTIZE": "auto",
    # Stretches at least this long that the voice detector hears no speech in are not transcribed
    # (ARCHITECTURE.md, "The engine"); 0 transcribes everything.
    "SKIP_NON_SPEECH_S": 30,
    # Every API route needs a key (README, "API keys"); "off" opens the API to anyone who reaches
    # it, for closed networks only. Each key may have MAX_JOBS_PER_KEY jobs pending or running.
    "AUTH": "on",
    "MAX_JOBS_PER_KEY": 20,
    # Wrong keys from one address per minute before it must wait.
    "AUTH_FAILURES_PER_MINUTE": 10,
    # How long a signed download link in a response stays valid.
    "DOWNLOAD_LINK_TTL_S": 86400,
    # Longer audio is refused when probed: a job's spectrogram takes 230 MB per two hours.
    "MAX_AUDIO_HOURS": 12,
    # POST /detect-language requests running at once (each holds an HTTP thread); more get 503.
    "MAX_DETECTIONS": 2,
    # /v1/audio requests waiting for their jobs at once (each holds an HTTP thread until its job
    # ends); more get 503. Keep it below gunicorn's threads (WHISPER_FLASK_HTTP_THREADS, 16).
    "MAX_WAITING_REQUESTS": 8,
    # Audio from a URL: only public addresses unless URL_ALLOW names networks ("10.0.0.0/8,
    # 127.0.0.1"); at most MAX_UPLOAD_MB, within URL_FETCH_TIMEOUT_S.
    "URL_ALLOW": "",
    "URL_FETCH_TIMEOUT_S": 600,
    # Links in webhooks and e-mails start with PUBLIC_URL ("https://speech.example.com");
    # empty: with the address the job was submitted to.
    "PUBLIC_URL": "",
    # E-mail when a job ends (the `email` field) needs SMTP_HOST; SMTP_SECURITY is starttls,
    # tls or none; set the password as WHISPER_FLASK_SMTP_PASSWORD in the environment.
    "SMTP_HOST": "",
    "SMTP_PORT": 587,
    "SMTP_SECURITY": "starttls",
    "SMTP_USER": "",
    "SMTP_PASSWORD": "",
    "SMTP_FROM": "whisper-flask@localhost",
    # A failed webhook or e-mail is tried again after NOTIFY_RETRY_BASE_S, doubling up to an
    # hour, NOTIFY_MAX_ATTEMPTS times in all (12: about five hours).
    "NOTIFY_RETRY_BASE_S": 30,
    "NOTIFY_MAX_ATTEMPTS": 12,
}

DEVICES = ("auto", "cpu", "cuda")
QUANTIZATIONS = ("auto", "none", "int8", "bf16")


class ConfigError(ValueError):
    """A setting that the service cannot start with; the message names it."""


def validate_config(config: dict[str, Any]) -> None:
    """Normalise paths and limits in place, or raise ConfigError with a one-line reason."""
    limits = (
        ("MAX_WORKERS", 1),
        ("MAX_QUEUED_JOBS", 1),
        ("MAX_UPLOAD_MB", 1),
        ("PROXY_FIX", 0),
        ("BATCH_SIZE", 1),
        ("MAX_JOBS_PER_KEY", 1),
        ("AUTH_FAILURES_PER_MINUTE", 1),
        ("DOWNLOAD_LINK_TTL_S", 1),
        ("MAX_DETECTIONS", 1),
        ("MAX_WAITING_REQUESTS", 1),
        ("SMTP_PORT", 1),
        ("NOTIFY_MAX_ATTEMPTS", 1),
    )
    for name, low in limits:
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            kind = "a positive integer" if low else "a whole number (0 or more)"
            raise ConfigError(f"WHISPER_FLASK_{name} must be {kind}, got {value!r}")
    for name, zero_ok in (
        ("RETENTION_DAYS", False),
        ("EXPIRED_KEEP_DAYS", False),
        ("SWEEP_INTERVAL_S", False),
        ("MAX_AUDIO_HOURS", False),
        ("URL_FETCH_TIMEOUT_S", False),
        ("NOTIFY_RETRY_BASE_S", False),
        ("BATCH_WAIT_MS", True),
        ("SKIP_NON_SPEECH_S", True),
    ):
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or (value == 0 and not zero_ok):
            kind = "a number (0 or more)" if zero_ok else "a positive number"
            raise ConfigError(f"WHISPER_FLASK_{name} must be {kind}, got {value!r}")
    for name in ("MODEL_DOWNLOAD", "KEEP_UPLOADS"):
        if not isinstance(config[name], bool):
            raise ConfigError(f"WHISPER_FLASK_{name} must be true or false, got {config[name]!r}")
    if config["QUANTIZE"] not in QUANTIZATIONS:
        raise ConfigError(
            f"WHISPER_FLASK_QUANTIZE must be one of {', '.join(QUANTIZATIONS)}, got {config['QUANTIZE']!r}"
        )
    # from_prefixed_env reads "false" as False and "off" as text: both mean off.
    auth = {True: "on", False: "off"}.get(config["AUTH"], config["AUTH"])
    if auth not in ("on", "off"):
        raise ConfigError(f"WHISPER_FLASK_AUTH must be on or off, got {config['AUTH']!r}")
    config["AUTH"] = auth
    if config["SMTP_SECURITY"] not in ("starttls", "tls", "none"):
        raise ConfigError(f"WHISPER_FLASK_SMTP_SECURITY must be starttls, tls or none, got {config['SMTP_SECURITY']!r}")
    if config["DEVICE"] not in DEVICES:
        raise ConfigError(f"WHISPER_FLASK_DEVICE must be one of {', '.join(DEVICES)}, got {config['DEVICE']!r}")

    model = str(config["MODEL"])
    if model not in whisper.available_models():
        path = Path(model).expanduser()
        if path.suffix != ".pt" or not path.is_file():
            raise ConfigError(
                f"WHISPER_FLASK_MODEL {model!r} is neither a Whisper model name "
                f"({', '.join(whisper.available_models())}) nor an existing .pt checkpoint"
            )
        model = str(path.resolve())
    config["MODEL"] = model

    for name in ("MODEL_DIR", "UPLOAD_DIR", "TRANSCRIPT_DIR", "LOG_DIR"):
        config[name] = _writable_dir(name, config[name])
    config["MAX_CONTENT_LENGTH"] = config["MAX_UPLOAD_MB"] * 1024 * 1024
    allow = config["URL_ALLOW"]
    try:
        config["URL_ALLOW"] = parse_networks(allow.split(",") if isinstance(allow, str) else allow)
    except (ValueError, TypeError):
        raise ConfigError(f"WHISPER_FLASK_URL_ALLOW must list IP networks or addresses, got {allow!r}") from None


def _writable_dir(name: str, value: Any) -> Path:
    path = Path(str(value)).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A probe write, because os.access ignores read-only mounts and ACLs.
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"WHISPER_FLASK_{name} {str(path)!r} is not a writable directory: {exc.strerror}") from None
    return path
