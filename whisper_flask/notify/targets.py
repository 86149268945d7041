"""Whom a job asks to tell when it ends: `callback_url` and `email`, checked before the job is accepted."""

from __future__ import annotations

from collections.abc import Mapping
from email.headerregistry import Address

from whisper_flask.audio.fetch import check_url
from whisper_flask.exceptions import InvalidOption
from whisper_flask.jobs.records import NotifyTargets

#: The request fields that ask to be told when a job ends; api/describe.py documents these.
TARGET_FIELDS = ("callback_url", "email")
MAX_EMAIL_CHARS = 254
_NO_PUBLIC_URL = "this server cannot send notifications: its PUBLIC_URL, the start of every link in them, must be set"


def parse_targets(sources: list[Mapping[str, str]], public_url: str, email_enabled: bool) -> NotifyTargets:
    """`callback_url` and `email` from form fields, JSON or the query; InvalidOption names a bad one."""
    fields = {name: next((s[name] for s in sources if s.get(name)), None) for name in TARGET_FIELDS}
    callback_url, email = fields["callback_url"], fields["email"]
    if callback_url is not None:
        if not public_url:
            raise InvalidOption("callback_url", _NO_PUBLIC_URL)
        check_url(callback_url, field="callback_url")
    if email is not None:
        if not email_enabled:
            raise InvalidOption("email", "this server sends no e-mail (its SMTP_HOST is not set)")
        if not public_url:
            raise InvalidOption("email", _NO_PUBLIC_URL)
        check_email(email)
    return NotifyTargets(callback_url, email)


def check_email(email: str) -> None:
    """Raise InvalidOption unless `email` is one address at a domain name (no IP address or address literal)."""
    try:
        address = Address(addr_spec=email)
    except Exception:  # email's parser raises HeaderParseError, AttributeError, ... on odd input
        address = None
    if address is None or not address.domain or len(email) > MAX_EMAIL_CHARS:
        raise InvalidOption("email", "not an e-mail address")
    if not _is_domain_name(address.domain):
        # `a@[127.0.0.1]`, `a@127.0.0.1` or `a@localhost` would have the mail server deliver to a host the
        # client picked, or to itself.
        raise InvalidOption("email", "the address must be at a domain name such as example.org, not an IP address")


def _is_domain_name(domain: str) -> bool:
    labels = domain.rstrip(".").split(".")
    if len(labels) < 2 or not all(0 < len(label) <= 63 for label in labels):
        return False
    if not all(char.isalnum() or char == "-" for label in labels for char in label):
        return False  # brackets (an address literal), colons, ...
    # Top-level domains start with a letter: this refuses dotted, hex and octal IPv4 forms (127.1, 0x7f.1).
    return labels[-1][0].isalpha()
