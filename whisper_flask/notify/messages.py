"""What a notification says: the signed webhook body and the e-mail, with links built only on PUBLIC_URL.

A client shapes none of the e-mail: its subject and text carry the job's id, status, error code and
links, never the file name or an error message (a URL's server writes those), so the service cannot
be made to send a stranger someone else's words (ARCHITECTURE.md, "Notifications").
"""

from __future__ import annotations

import hashlib
import hmac
import json
from email.message import EmailMessage
from email.utils import make_msgid

from whisper_flask.access.control import LinkSigner
from whisper_flask.jobs.records import Job, JobView, Notification
from whisper_flask.jobs.serialize import job_body, transcript_links

SIGNATURE_HEADER = "X-Whisper-Flask-Signature"
DELIVERY_HEADER = "X-Whisper-Flask-Delivery"


def download_links(signer: LinkSigner, public_url: str, job: Job) -> dict[str, str]:
    """A completed job's signed transcript links, starting with PUBLIC_URL, in every format; none for other jobs."""
    # Never the request's Host, which a client chooses (also behind nginx, which passes it on).
    return transcript_links(job, public_url, signer.sign) if public_url else {}


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def webhook(
    notification: Notification, job: Job, links: dict[str, str], secret: str, timestamp: int
) -> tuple[bytes, dict[str, str]]:
    """The webhook's body (the job as /progress shows it) and its headers, signed with the key's secret."""
    body = json.dumps(
        {
            "event": f"job.{job.status.value}",
            "delivery_id": notification.id,
            "job": job_body(JobView(job), links),
            "links": links,
        }
    ).encode()
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        DELIVERY_HEADER: str(notification.id),
    }
    return body, headers


def mail(sender: str, notification: Notification, job: Job, links: dict[str, str]) -> EmailMessage:
    """The e-mail for an ended job; its headers refuse CR/LF, and nothing in it is the client's text."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = notification.target
    message["Subject"] = f"Transcription {job.status.value}: job {job.id}"
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    lines = [f"Transcription job {job.id} is {job.status.value}.", ""]
    if job.error_code:
        lines += [f"Error code: {job.error_code} (GET /jobs/{job.id} with your API key tells more).", ""]
    if links:
        lines += ["Download it (the links work without a key until they expire):"]
        lines += [f"  {fmt}: {url}" for fmt, url in links.items()]
        lines.append("")
    message.set_content("\n".join(lines))
    return message
