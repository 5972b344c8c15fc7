"""TLS settings of both ends: what a server presents and asks for, what a client trusts and presents.

One home for the three things every service and client needs:

* :func:`server_context` turns ``--tls-cert``/``--tls-key`` (and
  ``--tls-client-ca`` for mutual TLS) into an :class:`ssl.SSLContext`,
  checking at start-up that the files exist, parse and belong together, so
  an operator's mistake is one line and exit 2, never a traceback at the
  first connection.
* :func:`client_session` turns ``--ca-file`` (default: the system's trust
  store) and ``--client-cert``/``--client-key`` into a
  :class:`requests.Session` that verifies the server's certificate and host
  name, checking the files the same way.
* :func:`tls_problem` names, in our own words, why a connection's TLS failed
  (unknown CA, expired certificate, wrong host name, client certificate
  required), from the exception chain requests raises; callers put that in
  their log line instead of OpenSSL's text.

Plain HTTP is possible only when asked for: :func:`check_url_scheme` refuses
an ``http://`` URL unless ``--insecure-http`` was given (see
:data:`INSECURE_FLAG`).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

INSECURE_FLAG = "--insecure-http"
PLAIN_HTTP_WARNING = ("serving plain HTTP (--insecure-http): anyone on the network can read and change what this "
                      "service and its clients exchange; give --tls-cert and --tls-key to serve HTTPS")


class TLSConfigError(ValueError):
    """A TLS option that cannot be used (missing, unreadable or mismatched files): exit 2."""


# ------------------------------------------------------------------ servers


@dataclass(frozen=True)
class ServerTLS:
    """What a server presents (``cert``, ``key``) and, for mutual TLS, the CA its clients' certificates need."""

    cert: Path
    key: Path
    client_ca: Path | None = None


def server_tls_of(cert: str | None, key: str | None, client_ca: str | None) -> ServerTLS | None:
    """The server TLS options of a command line, or None for none; TLSConfigError for half a pair."""
    if cert is None and key is None:
        if client_ca is not None:
            raise TLSConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise TLSConfigError("--tls-cert and --tls-key go together: give both or neither")
    return ServerTLS(Path(cert), Path(key), Path(client_ca) if client_ca else None)


def _readable(path: Path, flag: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise TLSConfigError(f"{flag} {path}: cannot read it: {e.strerror or e}") from None


def server_context(tls: ServerTLS) -> ssl.SSLContext:
    """A server context for ``tls``: TLS 1.2 or later, and client certificates required when ``client_ca`` is set."""
    _readable(tls.cert, "--tls-cert")
    _readable(tls.key, "--tls-key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except ssl.SSLError as e:
        raise TLSConfigError(f"--tls-cert {tls.cert} and --tls-key {tls.key}: {_pair_problem(e)}") from None
    if tls.client_ca is not None:
        _load_cas(context, tls.client_ca, "--tls-client-ca")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _pair_problem(e: ssl.SSLError) -> str:
    reason = (getattr(e, "reason", None) or "").upper()
    if "KEY_VALUES_MISMATCH" in reason:
        return "the key does not belong to the certificate"
    return "not a PEM certificate and its PEM private key (unencrypted)"


# ------------------------------------------------------------------ clients


@dataclass(frozen=True)
class ClientTLS:
    """What a client trusts (``ca_file``, else the system's store) and, for mutual TLS, the certificate it presents."""

    ca_file: Path | None = None
    cert: Path | None = None
    key: Path | None = None


def client_tls_of(ca_file: str | None, cert: str | None, key: str | None) -> ClientTLS:
    """The client TLS options of a command line; TLSConfigError for half a pair or unusable files."""
    if (cert is None) != (key is None):
        raise TLSConfigError("--client-cert and --client-key go together: give both or neither")
    tls = ClientTLS(Path(ca_file) if ca_file else None, Path(cert) if cert else None, Path(key) if key else None)
    check_client_tls(tls)
    return tls


def _load_cas(context: ssl.SSLContext, path: Path, flag: str) -> None:
    """Trust the CA certificates of ``path`` (given as ``flag``); TLSConfigError naming both when it cannot."""
    _readable(path, flag)
    try:
        context.load_verify_locations(cafile=str(path))
    except ssl.SSLError:
        raise TLSConfigError(f"{flag} {path}: not a PEM file of CA certificates") from None


def check_client_tls(tls: ClientTLS) -> None:
    """Load the files of ``tls`` once, so a mistake shows at start-up rather than at the first connection."""
    context = ssl.create_default_context()
    if tls.ca_file is not None:
        _load_cas(context, tls.ca_file, "--ca-file")
    if tls.cert is not None and tls.key is not None:
        _readable(tls.cert, "--client-cert")
        _readable(tls.key, "--client-key")
        try:
            context.load_cert_chain(tls.cert, tls.key)
        except ssl.SSLError as e:
            raise TLSConfigError(f"--client-cert {tls.cert} and --client-key {tls.key}: {_pair_problem(e)}") from None


class _PinnedSession(requests.Session):
    """A session whose CA file wins over ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``.

    requests lets those variables replace a session's ``verify`` at every
    request, which would silently trust the system's CAs instead of the one
    ``--ca-file`` names: a man in the middle with a certificate from any
    public CA would then pass.
    """

    def __init__(self, ca_file: str) -> None:
        super().__init__()
        self.verify = ca_file
        self.pinned_ca = ca_file

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any,
                                   cert: Any) -> Any:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        settings["verify"] = self.pinned_ca
        return settings


def client_session(tls: ClientTLS | None = None) -> requests.Session:
    """A session that verifies servers against ``tls.ca_file`` (else the system store) and presents its certificate."""
    session = _PinnedSession(str(tls.ca_file)) if tls is not None and tls.ca_file is not None else requests.Session()
    if tls is not None and tls.cert is not None and tls.key is not None:
        session.cert = (str(tls.cert), str(tls.key))
    return session


# ------------------------------------------------------------------ plain HTTP


class PlainHttpRefused(ValueError):
    """An ``http://`` URL without ``--insecure-http``."""


def check_url_scheme(url: str, what: str, insecure_http: bool) -> None:
    """Refuse an ``http://`` ``url`` unless ``insecure_http``; ``what`` names the option in the message."""
    if url.lower().startswith("http://") and not insecure_http:
        raise PlainHttpRefused(f"{what} is plain HTTP: use an https:// URL, or give {INSECURE_FLAG} to accept an "
                               "unencrypted, unauthenticated connection")


# ------------------------------------------------------------------ errors


# OpenSSL's X509_V_ERR_* codes we name (stable across OpenSSL versions).
_VERIFY_CODES = {
    9: "the server's certificate is not valid yet",
    10: "the server's certificate has expired",
    18: "the server's certificate is self-signed and not trusted",
    19: "the server's certificate chain ends in a CA that is not trusted (check --ca-file)",
    20: "the server's certificate was issued by a CA that is not trusted (check --ca-file)",
    21: "the server's certificate was issued by a CA that is not trusted (check --ca-file)",
    62: "the server's certificate is not for this host name (its subjectAltName must name the host in the URL)",
    64: "the server's certificate is not for this IP address (its subjectAltName must name the address in the URL)",
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps (cause, context, args, urllib3's ``reason``), each once."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(x for x in (e.__cause__, e.__context__, getattr(e, "reason", None), *e.args)
                    if isinstance(x, BaseException))


def tls_problem(exc: BaseException) -> str | None:
    """Why TLS failed, in our words (None when ``exc`` is not a TLS failure)."""
    for e in _chain(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            code = getattr(e, "verify_code", None)
            known = _VERIFY_CODES.get(code) if isinstance(code, int) else None
            return known or f"the server's certificate was refused (verification error {code})"
    for e in _chain(exc):
        if isinstance(e, ssl.SSLError):
            reason = (getattr(e, "reason", None) or "").upper()
            if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
                return "the server requires a client certificate (give --client-cert and --client-key)"
            if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason:
                return "the server refused our client certificate (not issued by the CA it trusts)"
            if "CERTIFICATE_EXPIRED" in reason:
                return "the server refused our client certificate as expired"
            if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER_FAILURE" in reason:
                return "the server does not speak TLS on this port (is it plain HTTP?)"
            if isinstance(e, ssl.SSLEOFError):
                break
            return f"TLS failed ({reason.lower() or type(e).__name__})"
    for e in _chain(exc):
        if isinstance(e, ssl.SSLEOFError):
            return ("the server closed the connection during TLS (does it require a client certificate? give "
                    "--client-cert and --client-key)")
    return None
