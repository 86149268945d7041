"""Servers on free loopback ports for tests and benchmarks.

Real gunicorn and nginx serving the shipped deploy/ files: tests start them through `Servers` (the
`servers` and `module_servers` fixtures), which stops every process it started; bench/ scripts use the
functions below directly. In-process HTTP servers (webhook receivers, `AudioSite`) run inside `serving`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
FIXTURES = ROOT / "tests" / "fixtures"

ServerT = TypeVar("ServerT", bound=socketserver.BaseServer)


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


def service_env(work: Path, model_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of a server or worker serving tiny.en from `work`, with WHISPER_FLASK_<name>=value settings."""
    return {
        **os.environ,
        "WHISPER_FLASK_MODEL": "tiny.en",
        "WHISPER_FLASK_MODEL_DIR": str(model_dir),
        "WHISPER_FLASK_MODEL_DOWNLOAD": "false",
        "WHISPER_FLASK_UPLOAD_DIR": str(work / "uploads"),
        "WHISPER_FLASK_TRANSCRIPT_DIR": str(work / "transcripts"),
        "WHISPER_FLASK_LOG_DIR": str(work / "logs"),
        **{f"WHISPER_FLASK_{name}": value for name, value in settings.items()},
    }


def start_gunicorn(work: Path, model_dir: Path, port: int, **settings: str) -> subprocess.Popen[bytes]:
    """gunicorn with deploy/gunicorn.conf.py serving tiny.en from `work`; returns once /readyz is 200."""
    env = service_env(work, model_dir, BIND=f"127.0.0.1:{port}", **settings)
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


def start_worker(
    work: Path, model_dir: Path, name: str, cpus: list[int] | None = None, **settings: str
) -> subprocess.Popen[bytes]:
    """A cluster worker as deployed (`celery -A whisper_flask.worker worker`); returns once Celery says it is ready.

    With `cpus`, it runs on those cores alone, with as many torch threads: a machine of its own, in small.
    """
    log = work / f"worker-{name}-{time.monotonic_ns()}.log"
    env = service_env(work, model_dir, **settings)
    pinned: list[str] = []
    if cpus is not None:
        pinned = ["taskset", "-c", ",".join(map(str, cpus))]
        env["OMP_NUM_THREADS"] = str(len(cpus))
    process = subprocess.Popen(
        [*pinned, sys.executable, "-m", "celery", "-A", "whisper_flask.worker", "worker", "--hostname",
         f"{name}@%h", "--loglevel", "INFO"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"), start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while b" ready." not in log.read_bytes():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
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


def _postgres_bin() -> Path:
    """The newest Debian PostgreSQL's programs (initdb and pg_ctl are not on PATH there)."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    assert versions, "PostgreSQL is not installed: deploy/system-packages.sh installs it"
    return versions[-1].parent


def _as_postgres(*command: str) -> list[str]:
    # PostgreSQL refuses to run as root: as root, run it as Debian's postgres user.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


class Postgres:
    """A real PostgreSQL on a free loopback port, its data in a temporary directory; `url` is a database for tests."""

    def __init__(self) -> None:
        self.port = free_port()
        # Not under pytest's directories: they are root's alone (0700), and the server runs as postgres.
        self.data = Path(tempfile.mkdtemp(prefix="whisper-flask-postgres-"))
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres")
        bin_dir = _postgres_bin()
        self._pg_ctl = str(bin_dir / "pg_ctl")
        subprocess.run(
            _as_postgres(str(bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"),
            check=True, capture_output=True,
        )  # fmt: skip
        self.start()
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-c", "CREATE DATABASE whisper"],
            check=True, capture_output=True,
        )  # fmt: skip
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/whisper"

    def start(self) -> None:
        """Start (or start again) the server; returns once it accepts connections."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.data} -c fsync=on"
        subprocess.run(
            _as_postgres(self._pg_ctl, "-D", str(self.data), "-l", str(self.data / "server.log"), "-o", options,
                         "-w", "-t", "60", "start"),
            check=True, capture_output=True,
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`immediate` is a crash: no checkpoint, clients cut off)."""
        subprocess.run(
            _as_postgres(self._pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"),
            check=True, capture_output=True,
        )  # fmt: skip

    def close(self) -> None:
        """Stop the server and delete its data."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.data, ignore_errors=True)

    def reset(self) -> None:
        """Empty the test database: every table dropped, as a new deployment finds it."""
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "whisper", "-c",
             "DROP SCHEMA public CASCADE; CREATE SCHEMA public"],
            check=True, capture_output=True,
        )  # fmt: skip


class Redis:
    """A real redis-server on a free loopback port with an append-only file in `work` (a restart keeps its data)."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.dir = work / "redis"
        self.dir.mkdir()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self, *, persistent: bool = True) -> None:
        """Start the server; without `persistent` it keeps nothing on disk, so a restart loses every message."""
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes" if persistent else "no", "--save", "", "--protected-mode", "yes"],
            stdout=(self.dir / "server.log").open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.dir / "server.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.1)
        raise AssertionError(f"redis-server did not start:\n{(self.dir / 'server.log').read_text()}")

    def kill(self) -> None:
        """SIGKILL the server (what it had not written to its file is gone)."""
        if self.process is not None:
            stop(self.process)
            self.process = None


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

    def worker(self, name: str, **settings: str) -> subprocess.Popen[bytes]:
        """A cluster worker on the same files, with WHISPER_FLASK_<name>=value settings, once Celery is ready."""
        self._processes.append(start_worker(self.work, self.model_dir, name, **settings))
        return self._processes[-1]

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


# -- in-process HTTP servers -------------------------------------------------------------------


@contextlib.contextmanager
def serving(server: ServerT) -> Iterator[ServerT]:
    """Run `server` on a daemon thread for the block; then shut it down, close its socket and join the thread.

    serve_forever polls every 0.05 s: shutdown() waits for its next poll, 0.5 s by default, after every test.
    """
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class Receiver(ThreadingHTTPServer):
    """A webhook receiver on loopback that answers the scripted statuses in turn, then 200, each after `delay_s`."""

    daemon_threads = True

    def __init__(self, statuses: list[int], delay_s: float = 0) -> None:
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)
        self.statuses = statuses
        self.delay_s = delay_s
        self.released = threading.Event()  # set after the test: a slow receiver answers at once
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.answered: list[float] = []  # time.monotonic() of each answer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks/whisper"

    def shutdown(self) -> None:
        self.released.set()
        super().shutdown()


class _ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.calls.append((dict(self.headers), body))
        self.server.released.wait(self.server.delay_s)
        self.send_response(self.server.statuses.pop(0) if self.server.statuses else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.server.answered.append(time.monotonic())


class AudioSite(ThreadingHTTPServer):
    """A loopback web server with audio (/fox.wav, /lj001-0001.flac), redirects, errors and bodies that never end."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _AudioHandler)
        self.requests: list[str] = []
        self.stopping = threading.Event()
        self.hung_up = threading.Event()  # a client closed a streamed body before its end

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.server_address[1]}{path}"

    def shutdown(self) -> None:
        self.stopping.set()  # bodies that never end end now
        super().shutdown()


class _AudioHandler(BaseHTTPRequestHandler):
    server: AudioSite

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        if self.path in ("/fox.wav", "/lj001-0001.flac"):
            self._send(200, (FIXTURES / self.path.lstrip("/")).read_bytes())
        elif self.path == "/page.html":
            self._send(200, b"<html>not audio</html>")
        elif self.path == "/redirect":
            self._redirect("/fox.wav")
        elif self.path == "/redirect-private":
            self._redirect(self.server.url("/fox.wav", host="127.0.0.2"))
        elif self.path == "/endless":
            self._stream(bytes(64 * 1024), pause=0)
        elif self.path == "/slow":
            self._stream(b"\0", pause=0.2)
        elif self.path == "/stall":
            self._stream(b"", pause=0.2)  # headers with "Connection: close", then silence
        elif self.path == "/continue-forever":
            self._continue_forever()
        else:
            self._send(404, b"not here")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _continue_forever(self) -> None:
        """Interim responses without end: http.client reads them in a loop no socket timeout ends."""
        for _ in range(100_000):
            if self.server.stopping.is_set():
                return
            try:
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.01)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream(self, chunk: bytes, pause: float) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")  # no length: the body ends when the server says so
        self.end_headers()
        for _ in range(100_000):  # bounded; the client hangs up long before
            if self.server.stopping.is_set():
                return
            try:
                self.wfile.write(chunk)
                self.wfile.flush()
            except OSError:
                self.server.hung_up.set()
                return
            time.sleep(pause)
