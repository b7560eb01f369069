"""Mutual TLS for the migration connection, and who may migrate which image.

Both sides speak TLS 1.3 only (``ssl``, over ``tlsstream.TLSStream``). A receiver
given a CA requires a client certificate signed by it; a sender always
verifies the receiver's certificate against the host it connects to (or
``--tls-hostname``). Authorisation is per image name: ``--tls-allow
SUBJECT[:NAME-GLOB]`` admits a client whose certificate names SUBJECT (its
common name, or a DNS or URI subject alternative name) for the image names
matching the glob (any name without one). A receiver with a CA and no
``--tls-allow`` admits every client its CA signed, for every name.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import ssl
from dataclasses import dataclass

from migrated.errors import TlsSetupError


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: this side's certificate and key, and the CA that signs the peer's."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key or self.ca)


_GLOB = re.compile(r"[A-Za-z0-9._*?!\[\]-]+")


@dataclass(frozen=True)
class Allow:
    """One ``--tls-allow`` entry: a certificate subject and the image names it may migrate."""

    subject: str
    names: str = "*"

    @classmethod
    def parse(cls, text: str) -> Allow:
        """``SUBJECT`` or ``SUBJECT:NAME-GLOB``. A subject with ':' in it (a
        URI) takes its glob after the last ':', when what follows it looks
        like a name glob (letters, digits, '.', '_', '-', '*', '?', '[]');
        give one explicitly (``urn:uuid:…:*``) where it could be read so."""
        subject, sep, names = text.rpartition(":")
        if not sep or not _GLOB.fullmatch(names):
            subject, sep, names = text, "", ""
        if not subject or (sep and not names) or text.endswith(":"):
            raise ValueError(f"{text!r}: use SUBJECT or SUBJECT:NAME-GLOB")
        return cls(subject, names or "*")

    def admits(self, identities: list[str], name: str) -> bool:
        return self.subject in identities and fnmatch.fnmatchcase(name, self.names)


def _context(purpose: ssl.Purpose, files: TlsFiles, side: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        if files.cert or files.key:
            if not (files.cert and files.key):
                raise TlsSetupError(f"{side}: --tls-cert and --tls-key go together")
            ctx.load_cert_chain(files.cert, files.key)
        if files.ca:
            ctx.load_verify_locations(cafile=files.ca)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"{side}: cannot load the TLS files: {getattr(exc, 'strerror', None) or exc}") from None
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The receiver's context: its certificate, and with a CA, a required
    and verified client certificate."""
    if not (files.cert and files.key):
        raise TlsSetupError("receive: TLS needs --tls-cert and --tls-key")
    ctx = _context(ssl.Purpose.CLIENT_AUTH, files, "receive")
    ctx.verify_mode = ssl.CERT_REQUIRED if files.ca else ssl.CERT_NONE
    return ctx


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """The sender's context: the receiver's certificate is verified against
    --tls-ca (or the system's CAs), and the host name checked."""
    ctx = _context(ssl.Purpose.SERVER_AUTH, files, "send")
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def identities(cert: dict | None) -> list[str]:
    """What a verified peer certificate (``getpeercert()``) names: its DNS
    names and URIs, or where it has neither, its common names (RFC 6125:
    a certificate with subject alternative names is not read for a CN)."""
    if not cert:
        return []
    names = [value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "URI")]
    if names:
        return names
    return [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
