"""The ``--comm`` channels' URLs: checked whole before a run starts (so a typo costs one line, not a run), and
shown or stored only with any password taken out."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from cai_bench.comm.frames import CommError
from cai_bench.core import aws
from cai_bench.core.errors import UserError, redact

SCHEMES = ("direct", "redis", "s3")
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
# A user and password as RFC 3986 allows them: unreserved, sub-delims, ":" and %XX; anything else is percent-encoded
_USERINFO = re.compile(r"([A-Za-z0-9._~!$&'()*+,;=:-]|%[0-9A-Fa-f]{2})*")


def _port(text: str, url: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or not 0 < int(text) < 65536:
        raise CommError(f"--comm {redact(url)!r}: the port must be a number from 1 to 65535")
    return int(text)


def parse_direct_url(url: str) -> tuple[str, int]:
    """``direct://HOST:PORT`` or ``direct://[IPV6]:PORT`` as (host, port)."""
    body = url[len("direct://") :].rstrip("/") if url.startswith("direct://") else ""
    bracketed = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)", body)
    if bracketed:
        host, port = bracketed.groups()
    else:
        host, _, port = body.rpartition(":")
        if ":" in host or (host and not _HOST.fullmatch(host)):
            host = ""
    if not host or not port:
        raise CommError(
            f"--comm {redact(url)!r}: write direct://HOST:PORT or direct://[IPV6]:PORT (the rendezvous server, "
            "cai-bench comm rendezvous)"
        )
    return host, _port(port, url)


def check_redis_url(url: str) -> None:
    """``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, DB a whole number; a password percent-encoded where it
    holds "@", "/", "?", "#", "%" or a space (else the URL's host would be read from inside it)."""
    parts = urlsplit(url)
    userinfo, after_host = parts.netloc.rpartition("@")[0], url.split(parts.netloc, 1)[1]
    if "@" in after_host or not _USERINFO.fullmatch(userinfo):  # "@" past the host: a "/", "?" or "#" came first
        raise CommError(
            f"--comm {redact(url)!r}: the user or password holds a character a URL cannot carry as it is: "
            "percent-encode it (@ as %40, / as %2F, # as %23, ? as %3F, % as %25, a space as %20)"
        )
    try:
        port = parts.port
    except ValueError:
        port = -1
    host = parts.hostname or ""
    if port == -1 or (port is not None and not 0 < port < 65536):
        raise CommError(f"--comm {redact(url)!r}: the port must be a number from 1 to 65535")
    if not host or (not _HOST.fullmatch(host) and ":" not in host):
        raise CommError(f"--comm {redact(url)!r}: write redis://HOST:PORT/DB")
    db = parts.path.strip("/")
    if db and not (db.isascii() and db.isdigit() and len(db) <= 10 and int(db) < 2**31):
        raise CommError(
            f"--comm {redact(url)!r}: the database ({db!r}) must be a whole number, as in redis://HOST:6379/0"
        )
    if parts.query or parts.fragment:
        raise CommError(f"--comm {redact(url)!r}: a Redis channel takes no query or fragment")


def check_s3_url(url: str) -> None:
    """``s3://BUCKET/PREFIX``: a bucket name S3 would take (an empty one included: ``s3://`` is refused)."""
    try:
        aws.parse_s3_url(url)
    except UserError as exc:
        raise CommError(f"--comm {redact(url)!r}: {exc}") from None


def check_urls(urls: list[str]) -> list[str]:
    """``urls`` checked without connecting anything: their schemes (each at most once) and every part of each."""
    seen = []
    for url in urls:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme not in SCHEMES:
            raise CommError(
                f"--comm {redact(url)!r}: a channel is direct://HOST:PORT, redis://HOST:PORT/DB or s3://BUCKET/PREFIX"
            )
        if scheme in seen:
            raise CommError(f"--comm: {scheme} given twice; give each channel once")
        {"direct": parse_direct_url, "redis": check_redis_url, "s3": check_s3_url}[scheme](url)
        seen.append(scheme)
    if not urls:
        raise CommError("--comm needs at least one channel")
    return seen


def split_urls(text: str) -> list[str]:
    """The channels of a ``--comm`` value."""
    return [u.strip() for u in str(text).split(",") if u.strip()]
