"""Audio from a URL: checked, resolved once, fetched from that address, bounded in size and time.

ARCHITECTURE.md, "Audio from a URL", says which addresses are refused and why.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from whisper_flask.exceptions import AddressRefused, FetchFailed, InvalidOption, StorageFull
from whisper_flask.files import FILE_MODE, disk_full
from whisper_flask.settings import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_CHARS = 2048
MAX_REDIRECTS = 5
CHUNK_BYTES = 64 * 1024
REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class FetchLimits:
    """How much and how long one fetch may take."""

    max_bytes: int
    total_s: float
    connect_s: float = 10.0
    idle_s: float = 30.0  # the longest wait for the next bytes


def check_url(url: str, field: str = "url") -> str:
    """The URL if its form is acceptable (http or https, a host, no credentials); InvalidOption otherwise."""
    if len(url) > MAX_URL_CHARS:
        raise InvalidOption(field, f"at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise InvalidOption(field, "not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidOption(field, "must be an http or https URL with a host")
    if parts.username is not None or parts.password is not None:
        # They would be stored in the job record and shown with it.
        raise InvalidOption(field, "must not contain a user name or password")
    if not url.isascii() or any(ord(char) < 0x21 or ord(char) == 0x7F for char in url):
        raise InvalidOption(field, "must be ASCII without spaces or control characters (percent-encode the rest)")
    return url


def url_filename(url: str) -> str:
    """The last segment of the URL's path, as the job's file name (cleaned by the caller)."""
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1])


def refusal(address: IPAddress, allowed: Sequence[IPNetwork]) -> str | None:
    """Why the service may not connect to `address`, or None if it may."""
    if any(address in network for network in allowed):
        return None
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:  # ::ffff:127.0.0.1, 64:ff9b::a00:1 (NAT64), 2002:7f00:1:: (6to4) ...
            return refusal(inner, allowed)
        if address.is_site_local:
            return f"{address} is not a public address"
    # is_global is False for loopback, private, link-local (169.254.169.254, the cloud metadata
    # address, among them), shared (100.64/10), reserved and unspecified addresses.
    if not address.is_global or address.is_multicast:
        return f"{address} is not a public address"
    return None


#: IPv6 ranges whose last 32 bits are an IPv4 address the packets reach: NAT64 (well-known and
#: local-use prefixes), IPv4-compatible, and SIIT's IPv4-translated addresses.
_EMBEDS_IPV4 = [ipaddress.IPv6Network(net) for net in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96")]


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if any(address in network for network in _EMBEDS_IPV4) and int(address) > 1:  # not :: or ::1
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


class UrlFetcher:
    """Fetches one URL to a file; every hop is resolved once and connected to the address it checked."""

    def __init__(self, allowed: Sequence[IPNetwork], limits: FetchLimits) -> None:
        self._allowed = allowed
        self._limits = limits

    def fetch(self, url: str, destination: Path, check: Callable[[], None]) -> None:
        """Write the body at `url` (after at most MAX_REDIRECTS redirects) to `destination`; FetchFailed says why not.

        `check` is called between reads and raises to stop (a cancelled job, a stopping service).
        """
        deadline = time.monotonic() + self._limits.total_s
        for _ in range(MAX_REDIRECTS + 1):
            connection, response = open_checked(check_url(url), self._allowed, self._limits, deadline)
            try:
                if response.status in REDIRECTS and response.getheader("Location"):
                    url = urljoin(url, response.getheader("Location", ""))
                    continue
                if response.status != 200:
                    raise FetchFailed(f"the server answered {response.status} {response.reason}")
                self._save(response, destination, deadline, check)
                return
            except (OSError, http.client.HTTPException) as exc:
                raise FetchFailed(f"the download broke off: {_reason(exc)}") from None
            finally:
                connection.finish()
        raise FetchFailed(f"more than {MAX_REDIRECTS} redirects")

    def _save(
        self, response: http.client.HTTPResponse, destination: Path, deadline: float, check: Callable[[], None]
    ) -> None:
        limit = self._limits.max_bytes
        declared = response.getheader("Content-Length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise FetchFailed(f"the file is larger than the {limit // 2**20} MB upload limit")
        try:
            self._write(response, destination, deadline, check)
        except OSError as exc:
            if disk_full(exc):  # the job waits for space instead of failing
                raise StorageFull("the upload directory is full; the audio could not be fetched") from exc
            raise

    def _write(
        self, response: http.client.HTTPResponse, destination: Path, deadline: float, check: Callable[[], None]
    ) -> None:
        limit = self._limits.max_bytes
        written = 0
        # 0600 whatever the umask, as uploads are; truncated if a resumed job fetches again.
        with open(os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "wb") as out:
            os.fchmod(out.fileno(), FILE_MODE)
            while chunk := response.read1(CHUNK_BYTES):
                written += len(chunk)
                if written > limit:
                    raise FetchFailed(f"the file is larger than the {limit // 2**20} MB upload limit")
                if time.monotonic() > deadline:
                    raise FetchFailed(f"the download took longer than {self._limits.total_s:g} s")
                check()
                out.write(chunk)
            if time.monotonic() > deadline:  # the deadline's timer cut the body short
                raise FetchFailed(f"the download took longer than {self._limits.total_s:g} s")
            out.flush()
            os.fsync(out.fileno())
        if written == 0:
            raise FetchFailed("the server sent an empty body")


def open_checked(
    url: str,
    allowed: Sequence[IPNetwork],
    limits: FetchLimits,
    deadline: float,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[BoundedConnection, http.client.HTTPResponse]:
    """Send one request to `url` through a socket connected to the address that was checked; FetchFailed if not."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as exc:
        raise FetchFailed(f"{host} could not be resolved: {_reason(exc)}") from None
    why = refusal(ipaddress.ip_address(address[0]), allowed)
    if why is not None:
        raise AddressRefused(f"refused to connect to {host}: {why} (URL_ALLOW lists the exceptions)")
    connection = BoundedConnection(host, port, timeout=limits.idle_s)
    connection.cut_off_at(deadline)
    try:
        # Connected here, to the address just checked: http.client would resolve the name again.
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(min(limits.connect_s, max(0.1, deadline - time.monotonic())))
        connection.sock = connection.guarded = sock
        sock.connect(address)
        sock.settimeout(limits.idle_s)
        if parts.scheme == "https":
            connection.sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        connection.guarded = connection.sock
        target = parts.path or "/"
        connection.request(
            method,
            f"{target}?{parts.query}" if parts.query else target,
            body,
            {"User-Agent": "whisper_flask", "Accept-Encoding": "identity", **(headers or {})},
        )
        return connection, connection.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        connection.finish()
        raise FetchFailed(f"could not reach {host}: {_reason(exc)}") from None


class BoundedConnection(http.client.HTTPConnection):
    """A connection cut at a deadline, whatever the peer sends meanwhile.

    Socket timeouts bound each read, not a peer that keeps sending: endless "100 Continue"
    lines, trailers, or headers a byte at a time. A timer shuts the socket down instead.
    """

    _timer: threading.Timer | None = None
    #: The socket the timer shuts. Not self.sock: getresponse() clears that (close()) as soon as
    #: a response says "Connection: close", while the response goes on reading the socket.
    guarded: socket.socket | None = None

    def cut_off_at(self, deadline: float) -> None:
        """Shut the socket down at `deadline` (time.monotonic()) if it is still open."""
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._cut)
        self._timer.daemon = True
        self._timer.start()

    def _cut(self) -> None:
        if self.guarded is not None:
            with contextlib.suppress(OSError):  # already closed: nothing to cut
                self.guarded.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        """Stop the timer and close: the caller is done with the connection and its response."""
        if self._timer is not None:
            self._timer.cancel()
        self.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
