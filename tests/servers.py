"""Real gunicorn and nginx on free loopback ports, serving the shipped deploy/ files; for tests and benchmarks.

Tests start servers through `Servers` (the `servers` and `module_servers` fixtures), which stops every
process it started; bench/ scripts use the functions below directly.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def curl(*args: str, timeout: float = 60) -> tuple[int, bytes]:
    """Run curl; return (HTTP status, body)."""
    out = subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", str(timeout), "--write-out", "\n%{http_code}", *args],
        capture_output=True,
        check=True,
    ).stdout
    body, _, status = out.rpartition(b"\n")
    return int(status), body


def wait_until_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if curl(url, timeout=5)[0] == 200:
                return
        except subprocess.CalledProcessError:
            pass  # not listening yet
        time.sleep(0.2)
    raise AssertionError(f"{url} did not become ready:\n{log.read_text()}")


def start_gunicorn(work: Path, model_dir: Path, port: int, **settings: str) -> subprocess.Popen[bytes]:
    """gunicorn with deploy/gunicorn.conf.py serving tiny.en from `work`; returns once /readyz is 200."""
    env = {
        **os.environ,
        "WHISPER_FLASK_BIND": f"127.0.0.1:{port}",
        "WHISPER_FLASK_MODEL": "tiny.en",
        "WHISPER_FLASK_MODEL_DIR": str(model_dir),
        "WHISPER_FLASK_MODEL_DOWNLOAD": "false",
        "WHISPER_FLASK_UPLOAD_DIR": str(work / "uploads"),
        "WHISPER_FLASK_TRANSCRIPT_DIR": str(work / "transcripts"),
        "WHISPER_FLASK_LOG_DIR": str(work / "logs"),
        **{f"WHISPER_FLASK_{name}": value for name, value in settings.items()},
    }
    log = work / f"gunicorn-{port}-{time.monotonic_ns()}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(DEPLOY / "gunicorn.conf.py"), "wsgi:app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        start_new_session=True,  # its own process group, so stop() reaches the worker too
    )
    wait_until_ready(f"http://127.0.0.1:{port}/readyz", process, log)
    return process


def render_nginx(
    work: Path, upstream: int, http: int, https: int, max_body_mb: int | None = None, subpath: bool = False
) -> Path:
    """The shipped site and locations, moved to loopback ports and temporary paths, in a minimal nginx.conf.

    With `subpath`, each server also includes the shipped snippet that serves the app under /speech/.
    """
    prefix = work / "nginx"
    prefix.mkdir(exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(prefix / "key.pem"), "-out", str(prefix / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    locations = (DEPLOY / "nginx" / "whisper-flask-locations.conf").read_text()
    if subpath:
        locations += (DEPLOY / "nginx" / "whisper-flask-subpath.conf").read_text()
    if max_body_mb is not None:
        locations = re.sub(r"client_max_body_size \d+m;", f"client_max_body_size {max_body_mb}m;", locations)
    (prefix / "locations.conf").write_text(locations)
    site = (DEPLOY / "nginx" / "whisper-flask.conf").read_text()
    for shipped, local in [
        ("/etc/nginx/snippets/whisper-flask-locations.conf", str(prefix / "locations.conf")),
        ("/etc/whisper-flask/tls/fullchain.pem", str(prefix / "cert.pem")),
        ("/etc/whisper-flask/tls/privkey.pem", str(prefix / "key.pem")),
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream};"),
        ("listen 80;", f"listen 127.0.0.1:{http};"),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{https} ssl http2;"),
        ("listen [::]:80;", ""),
        ("listen [::]:443 ssl http2;", ""),
    ]:
        assert shipped in site, f"the shipped site no longer contains {shipped!r}"
        site = site.replace(shipped, local)
    (prefix / "site.conf").write_text(site)
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = "".join(f"{kind}_temp_path {prefix / kind};\n" for kind in kinds)
    conf = prefix / "nginx.conf"
    conf.write_text(
        # Workers of a root nginx would run as nobody, who cannot enter pytest's private directories.
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"pid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'};\nevents {{}}\n"
        + f"http {{\ninclude /etc/nginx/mime.types;\naccess_log {prefix / 'access.log'};\n{temp}"
        + f"include {prefix / 'site.conf'};\n}}\n"
    )
    return conf


def start_nginx(conf: Path, http: int) -> subprocess.Popen[bytes]:
    """nginx in the foreground with conf; returns once it proxies /healthz."""
    log = conf.parent / "stderr.log"
    process = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(conf.parent), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        start_new_session=True,  # its own process group, so stop() reaches the workers too
    )
    wait_until_ready(f"http://127.0.0.1:{http}/healthz", process, log)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    """Kill a server and every process it started (a killed master would leave its workers running)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)  # SIGKILL cannot be caught: only a process stuck in the kernel outlives this


class Started(NamedTuple):
    """A server that answers on `port`; unpacks as (port, process)."""

    port: int
    process: subprocess.Popen[bytes]


class Servers:
    """Starts real gunicorn (and nginx in front of it) serving files in `work`; stops every one it started.

    gunicorn always gets the same port: a restarted server comes back where its clients look for it,
    as under systemd.
    """

    def __init__(self, work: Path, model_dir: Path) -> None:
        self.work = work
        self.model_dir = model_dir
        self.port = free_port()
        self._processes: list[subprocess.Popen[bytes]] = []

    def gunicorn(self, **settings: str) -> Started:
        """gunicorn with deploy/gunicorn.conf.py and WHISPER_FLASK_<name>=value settings, once /readyz is 200."""
        self._processes.append(start_gunicorn(self.work, self.model_dir, self.port, **settings))
        return Started(self.port, self._processes[-1])

    def nginx(self, max_body_mb: int | None = None, subpath: bool = False) -> Started:
        """The shipped nginx site in front of this gunicorn, on a port of its own, once it proxies /healthz."""
        http = free_port()
        conf = render_nginx(self.work, self.port, http, free_port(), max_body_mb=max_body_mb, subpath=subpath)
        self._processes.append(start_nginx(conf, http))
        return Started(http, self._processes[-1])

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """Stop one server now, as `close` would (and not again: its pid may belong to another process by then)."""
        self._processes.remove(process)
        stop(process)

    def close(self) -> None:
        """Stop every server started, newest first (nginx before the gunicorn behind it)."""
        for process in reversed(self._processes):
            stop(process)
        self._processes.clear()

    def __enter__(self) -> Servers:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
