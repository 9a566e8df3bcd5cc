"""TLS for every violin-snapshot API: server contexts from a certificate and key, client contexts that verify.

Standard library only (the CLI imports it). A client always verifies the server's certificate and name:
against ``ca_file`` (or ``$VIOLIN_CA_FILE``) when given, else against the system's CAs. There is no
switch to turn verification off.
"""

import os
import ssl
from typing import Optional

CA_FILE_ENV = "VIOLIN_CA_FILE"
HANDSHAKE_TIMEOUT = 10.0  # seconds a server waits for a client's TLS handshake


class TlsError(ValueError):
    """A certificate, key or CA file that cannot be used; the message says which and why."""


def ca_file_from(ca_file: Optional[str], environ=os.environ) -> Optional[str]:
    return ca_file or environ.get(CA_FILE_ENV) or None


def client_context(ca_file: Optional[str] = None) -> ssl.SSLContext:
    """A verifying client context: ``ca_file`` (or $VIOLIN_CA_FILE), else the system's trust store."""
    ca_file = ca_file_from(ca_file)
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as error:
        raise TlsError("cannot use CA file %s: %s" % (ca_file, _strerror(error))) from None


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context serving ``cert_file`` (PEM, the chain after the certificate) with ``key_file``."""
    if not cert_file or not key_file:
        raise TlsError("HTTPS needs both a certificate and its key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as error:
        raise TlsError("cannot use certificate %s with key %s: %s" % (cert_file, key_file, _strerror(error))) from None
    return context


def wrap_listener(sock, context: ssl.SSLContext):
    """The listening socket wrapped so that each accepted connection does its handshake when first used
    (in its own thread: see ``handshake``), not in the accept loop."""
    return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)


def handshake(conn) -> Optional[str]:
    """Complete an accepted connection's handshake; None, or why it failed (plain HTTP, a client that
    does not trust the certificate, a timeout). Never raises."""
    if not isinstance(conn, ssl.SSLSocket):
        return None
    previous = conn.gettimeout()
    try:
        conn.settimeout(HANDSHAKE_TIMEOUT)
        conn.do_handshake()
        conn.settimeout(previous)
        return None
    except ssl.SSLError as error:
        return "TLS handshake failed: %s" % (error.reason or error.strerror or error)
    except OSError as error:
        return "TLS handshake failed: %s" % (error.strerror or type(error).__name__)


def describe(error: BaseException, url: str = "") -> Optional[str]:
    """A reason for a person for a TLS failure of a client (None if ``error`` is no TLS failure)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return ("the server's certificate is not trusted (%s); give the CA that signed it with --ca-file or %s"
                % (error.verify_message or error.reason, CA_FILE_ENV))
    if isinstance(error, ssl.SSLError):
        reason = error.reason or error.strerror or str(error)
        if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE") or "wrong version number" in str(error):
            return "TLS handshake failed (%s): is the server serving plain HTTP? use an http:// URL" % reason
        return "TLS failed: %s" % reason
    return None


def _strerror(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError):
        return error.reason or str(error)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)
